"""What a site sends after a round, and which parameters it may send."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import torch


#: what a site's dataset.json may show outside the site (setup message, model folders): the description every
#: site shares and nnU-Net's predictor and evaluation need; no number of cases, no file list
SHARED_DATASET_JSON_KEYS = ("channel_names", "labels", "file_ending", "regions_class_order",
                            "overwrite_image_reader_writer", "name", "description")


def shared_dataset_json(dataset_json: Mapping) -> dict:
    """``dataset_json`` restricted to ``SHARED_DATASET_JSON_KEYS`` (nnU-Net's ``labels`` order kept)."""
    return {k: v for k, v in dataset_json.items() if k in SHARED_DATASET_JSON_KEYS}


@dataclass
class Update:
    """A site's contribution to one round.

    ``arrays`` holds the shared parameters only (state-dict name -> array); ``num_examples`` is the
    number of training cases at the site (the FedAvg weight); ``metrics`` holds scalars or lists of
    scalars (train loss, pseudo Dice, seconds, ...).
    """

    site: str
    arrays: dict[str, np.ndarray]
    num_examples: int
    metrics: dict = field(default_factory=dict)


#: the normalisation layers of nnU-Net's networks (instance norm by default; batch, group and layer norm in
#: other architectures): local under FedBN
NORMALIZATION_LAYERS = (torch.nn.modules.instancenorm._InstanceNorm, torch.nn.modules.batchnorm._BatchNorm,
                        torch.nn.GroupNorm, torch.nn.LayerNorm)


class SharingPolicy:
    """Names the local (personal) parameters of a network; everything else is shared.

    ``local_patterns`` are regular expressions matched against state-dict names from their start
    (``re.match``); ``local_modules`` are module types whose parameters and buffers are local wherever they
    sit (FedBN: the normalisation layers). Local parameters never leave the site.
    """

    def __init__(self, local_patterns: Iterable[str] = (), local_modules: tuple = ()):
        self.local_patterns = tuple(local_patterns)
        self.local_modules = tuple(local_modules)
        self._compiled = [re.compile(p) for p in self.local_patterns]

    def is_local(self, name: str) -> bool:
        return any(p.match(name) for p in self._compiled)

    def shared_names(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if not self.is_local(n)]

    def local_names(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if self.is_local(n)]

    def split(self, state: Mapping[str, object]) -> tuple[dict, dict]:
        shared = {k: v for k, v in state.items() if not self.is_local(k)}
        local = {k: v for k, v in state.items() if self.is_local(k)}
        return shared, local

    def classify(self, network) -> tuple[list[str], list[str]]:
        """(shared, local) names of a network's tensors, one name per tensor.

        A network's ``state_dict`` can list one tensor under several names (nnU-Net's UNets expose the
        encoder again as ``decoder.encoder`` and every conv block's layers again as ``all_modules``).
        Each tensor is sent once, under its first name; a tensor whose names are classified
        differently by the policy is an error, since sending it under one name would leak the other.
        """
        aliases = tensor_aliases(network)
        by_module = {id(t) for m in network.modules() if isinstance(m, self.local_modules)
                     for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))} if self.local_modules else set()
        state = network.state_dict(keep_vars=True)
        shared, local = [], []
        for name, names in aliases.items():
            if id(state[name]) in by_module:
                local.append(name)
                continue
            flags = {self.is_local(n) for n in names}
            if len(flags) > 1:
                raise ValueError(f"{self!r} classifies one tensor differently under its names "
                                 f"{names}: make every name of it local (or none)")
            (local if flags.pop() else shared).append(name)
        return shared, local

    def __repr__(self) -> str:
        modules = f", local_modules={[m.__name__ for m in self.local_modules]}" if self.local_modules else ""
        return f"SharingPolicy(local_patterns={list(self.local_patterns)}{modules})"


def tensor_aliases(network) -> dict[str, list[str]]:
    """For each parameter and persistent buffer of ``network``: its first state-dict name -> all its names."""
    groups: dict[int, list[str]] = {}
    for name, tensor in network.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return {names[0]: names for names in groups.values()}

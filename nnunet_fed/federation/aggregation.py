"""Server-side aggregation: validation of site updates and example-weighted averaging.

One implementation serves ``nnunet_fed simulate`` and the Flower ServerApp. Updates are consumed one
at a time (the input may be a generator that trains the sites lazily), so memory holds the global
arrays and one running sum, not one update per site.
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping

import numpy as np

from nnunet_fed.federation.update import Update

log = logging.getLogger(__name__)


class UpdateRejected(ValueError):
    """An update that must not be averaged in. The message names the site and the problem."""


class NoValidUpdates(RuntimeError):
    """Every update of a round was rejected."""


def check_update(update: Update, reference: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`UpdateRejected` unless ``update`` matches ``reference`` (names, shapes) and is finite."""
    site = update.site
    if not isinstance(update.num_examples, (int, np.integer)) or update.num_examples <= 0:
        raise UpdateRejected(f"site {site!r}: num_examples must be a positive integer, got {update.num_examples!r}")
    sent, expected = set(update.arrays), set(reference)
    if sent - expected:
        extra = sorted(sent - expected)
        raise UpdateRejected(f"site {site!r}: unexpected arrays {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                             f"(not shared parameters of the global model; local parameters must stay at the site)")
    if expected - sent:
        missing = sorted(expected - sent)
        raise UpdateRejected(f"site {site!r}: missing arrays {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, ref in reference.items():
        arr = update.arrays[name]
        if not isinstance(arr, np.ndarray):
            raise UpdateRejected(f"site {site!r}: array {name!r} is a {type(arr).__name__}, not a numpy array")
        if arr.shape != ref.shape:
            raise UpdateRejected(f"site {site!r}: array {name!r} has shape {arr.shape}, expected {ref.shape}")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise UpdateRejected(f"site {site!r}: array {name!r} contains {bad} NaN/Inf values")


class FedAvg:
    """Example-weighted federated averaging (McMahan et al. 2017).

    ``aggregate(global_arrays, updates)`` returns the new global arrays: the average of the accepted
    updates weighted by ``num_examples``. Rejected updates are logged with their reason and listed in
    ``self.rejected`` (site, reason) for the round. FedProx uses this same server rule; its proximal
    term lives in the site's optimizer.
    """

    name = "fedavg"

    def __init__(self):
        self.rejected: list[tuple[str, str]] = []
        self.accepted: list[Update] = []

    def aggregate(self, global_arrays: Mapping[str, np.ndarray], updates: Iterable[Update]) -> dict[str, np.ndarray]:
        self.rejected, self.accepted = [], []
        total = 0.0
        acc: dict[str, np.ndarray] = {}
        for update in updates:
            try:
                check_update(update, global_arrays)
            except UpdateRejected as e:
                log.warning("rejected update: %s", e)
                self.rejected.append((update.site, str(e)))
                continue
            w = float(update.num_examples)
            for name, arr in update.arrays.items():
                if name in acc:
                    acc[name] += w * arr
                else:
                    acc[name] = w * arr.astype(np.float64)
            total += w
            # keep the metadata, drop the arrays: they are folded into the running sum
            self.accepted.append(Update(update.site, {}, update.num_examples, dict(update.metrics)))
            del update  # do not hold this site's arrays while the next site trains
        if not self.accepted:
            reasons = "; ".join(r for _, r in self.rejected) or "no site answered"
            raise NoValidUpdates(f"no valid update this round: {reasons}")
        out = {}
        for name, ref in global_arrays.items():
            mean = acc[name] / total
            if np.issubdtype(ref.dtype, np.floating):
                out[name] = mean.astype(ref.dtype)
            else:  # integer buffers (e.g. counters): rounded weighted mean
                out[name] = np.rint(mean).astype(ref.dtype)
        return out


STRATEGIES = {"fedavg": FedAvg, "fedprox": FedAvg}


def make_strategy(name: str):
    try:
        return STRATEGIES[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown aggregation strategy {name!r}; choose one of {sorted(STRATEGIES)}") from None

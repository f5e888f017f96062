"""The one home of the randomness of every privacy mechanism: OS entropy, never a seed anyone else can know.

A mechanism's guarantee assumes its noise and its sampling are unknown to whoever sees its output. The noise of
the clipped gradient sum (``sanitizer``), of the unclipped count (``adaptive``) and of the case count
(``dp_trainer``), and the Poisson inclusion mask of the cases (``sampling``) are therefore drawn here, from
generators seeded by ``secrets`` (the operating system's entropy pool) in every process:

- never derived from ``--seed`` (which the server may choose and every site knows): with the seed, a stand-in
  dataset of the same size regenerates every noise tensor bit for bit and the noise can be subtracted from a
  released update;
- never saved: no checkpoint, round state or report holds their state; a resumed run draws fresh values;
- reseeded in every child after ``fork`` (augmentation workers are forked): a child never repeats its
  parent's or a sibling's draws.

Why not torch's or numpy's global generators: ``simulate`` and the Flower ClientApp seed them with ``--seed`` to
make initialisation and (for non-private trainers) augmentation reproducible.

Under DP trainers the data pipeline's own randomness (which patch of a sampled case is cut, its augmentation)
also comes from OS entropy (``use_entropy_in_this_process``): nnU-Net draws it from the global generators, case
after case, so with a known seed removing one case would shift the augmentation of every later case in the
stream, a change the per-case clip does not bound.

Floating-point caveat: the Gaussian and Laplace samples are ordinary floating-point draws (float64 for Laplace,
the parameter's dtype for the Gaussian), not a discrete or snapping mechanism (Mironov 2012, "On significance of
the least significant bits for differential privacy"); the README states this caveat.
"""
from __future__ import annotations

import os
import random
import secrets

import numpy as np
import torch

_torch_generators: dict[str, torch.Generator] = {}
_numpy_generator: np.random.Generator | None = None
_entropy_pid: int | None = None  # the process whose global generators use_entropy_in_this_process reseeded


def entropy_seed(bits: int = 63) -> int:
    """A seed from the operating system's entropy pool (``secrets.randbits``)."""
    return secrets.randbits(bits)


def _forget_after_fork() -> None:
    global _numpy_generator, _entropy_pid
    _torch_generators.clear()
    _numpy_generator = None
    _entropy_pid = None


os.register_at_fork(after_in_child=_forget_after_fork)


def torch_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """This process's privacy generator for ``device`` (seeded from OS entropy on first use)."""
    device = torch.device(device)
    key = str(device) if device.type != "cuda" else f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    gen = _torch_generators.get(key)
    if gen is None:
        gen = torch.Generator(device=key)
        gen.manual_seed(entropy_seed())
        _torch_generators[key] = gen
    return gen


def numpy_generator() -> np.random.Generator:
    """This process's numpy privacy generator (PCG64 seeded from OS entropy on first use)."""
    global _numpy_generator
    if _numpy_generator is None:
        _numpy_generator = np.random.default_rng(entropy_seed(128))
    return _numpy_generator


def gaussian_like(p: torch.Tensor, std: float) -> torch.Tensor:
    """``N(0, std^2)`` noise of ``p``'s shape, dtype and device."""
    return torch.normal(0.0, float(std), p.shape, generator=torch_generator(p.device), device=p.device, dtype=p.dtype)


def laplace_like(p: torch.Tensor, scale: float) -> torch.Tensor:
    """Laplace noise of scale ``scale`` with ``p``'s shape, dtype and device, sampled in float64 by inversion:
    ``-scale * sign(u) * log(1 - 2|u|)``, ``u`` uniform on (-1/2, 1/2) (53-bit uniforms, so the tails reach
    about ``37 * scale``; torch's own Laplace samples in the parameter's dtype, float32 for nnU-Net)."""
    gen = torch_generator(p.device)
    u = torch.rand(p.shape, generator=gen, device=p.device, dtype=torch.float64) - 0.5
    x = -float(scale) * torch.sign(u) * torch.log1p(-2.0 * u.abs())
    return x.to(p.dtype)


def gaussian_scalar(std: float) -> float:
    return float(numpy_generator().normal(0.0, float(std)))


def laplace_scalar(scale: float) -> float:
    return float(numpy_generator().laplace(0.0, float(scale)))


def poisson_mask(n: int, rate: float) -> np.ndarray:
    """Independent inclusion of ``n`` items with probability ``rate`` each (bool array)."""
    return numpy_generator().random(int(n)) < float(rate)


def global_generators_seeded() -> None:
    """Called whenever the global generators are seeded (``seed_everything``): the next
    ``use_entropy_in_this_process`` reseeds them from OS entropy again."""
    global _entropy_pid
    _entropy_pid = None


def use_entropy_in_this_process() -> None:
    """Reseed Python's, numpy's and torch's global generators of this process from OS entropy, once per process
    (again after a fork or after ``global_generators_seeded``). DP trainers call it where their data pipeline and
    their loss run (see the module docstring)."""
    global _entropy_pid
    if _entropy_pid == os.getpid():
        return
    random.seed(entropy_seed(128))
    np.random.seed(entropy_seed(32))
    torch.manual_seed(entropy_seed())
    _entropy_pid = os.getpid()

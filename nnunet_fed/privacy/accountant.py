"""Privacy accounting: Opacus's accountants on a plain-value history, noise calibration, a pure-epsilon mode.

The history is a list of ``[noise_multiplier, sample_rate, steps]`` entries (Opacus's own history format), so it
can be stored in a checkpoint, sent nowhere, and replayed by any accountant: the epsilon printed for a history
can be recomputed independently (e.g. with Google's ``dp_accounting``: ``PoissonSampledDpEvent(q,
GaussianDpEvent(sigma))`` composed ``steps`` times).

Mechanisms:

- ``gaussian`` (default): each logical step releases the sum of per-case gradients clipped to L2 norm ``C`` plus
  ``N(0, (sigma C)^2)`` noise, cases Poisson-sampled with rate ``q``: the subsampled Gaussian mechanism, accounted
  with Opacus's RDP (``rdp``, default) or PRV (``prv``) accountant; (epsilon, delta) under add/remove-one-case.
- ``laplace``: gradients clipped to L1 norm ``C`` plus Laplace noise of scale ``b * C`` per coordinate: a
  ``1/b``-DP step (pure epsilon), amplified by Poisson sampling to ``log(1 + q (e^{1/b} - 1))``, composed by
  adding (basic composition; delta = 0). ``b`` is stored where the Gaussian history stores sigma.

Besides the training steps (``history``), a site releases a few single values once (its noisy case count, its
planning summary): ``events``, each ``[mechanism, noise_multiplier, sample_rate, count]`` with ``mechanism``
"gaussian" (noise std / L2 sensitivity) or "laplace" (noise scale / L1 sensitivity, i.e. ``1 / epsilon``).
They compose with the training into one total: Gaussian events join Opacus's history; Laplace events add their
exact Renyi divergence (Mironov 2017, "Renyi differential privacy", Proposition 6; Opacus's accountants have no
Laplace mechanism) to the RDP curve, or their pure epsilon to the PRV epsilon (basic composition, an upper
bound); in the pure-epsilon (Laplace) mode every event must be Laplace and all epsilons add.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

ACCOUNTANTS = ("rdp", "prv")
MECHANISMS = ("gaussian", "laplace")
PRV_EPS_ERROR = 1e-3  # absolute accuracy of the PRV epsilon (Opacus returns an upper bound)


class BudgetError(ValueError):
    """A privacy configuration that cannot meet its target, or is invalid."""


def _merge(history: Iterable[Sequence[float]]) -> list[list]:
    out: list[list] = []
    for sigma, q, steps in history:
        if steps <= 0:
            continue
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1][2] += int(steps)
        else:
            out.append([float(sigma), float(q), int(steps)])
    return out


def laplace_step_epsilon(scale: float, sample_rate: float) -> float:
    """Pure epsilon of one Poisson-sampled Laplace step with noise scale ``scale`` (relative to the L1 clip)."""
    eps = 1.0 / scale
    if sample_rate >= 1.0:
        return eps
    return math.log1p(sample_rate * math.expm1(eps))


def laplace_rdp(eps: float, orders: Sequence[float]) -> list[float]:
    """Renyi divergence of order ``a`` of the Laplace mechanism with pure epsilon ``eps`` (Mironov 2017,
    Proposition 6): ``eps + log(1 + (a - 1) (exp((1 - 2a) eps) - 1) / (2a - 1)) / (a - 1)`` (exact)."""
    out = []
    for a in orders:
        a = float(a)
        if a <= 1:
            raise ValueError(f"Renyi order must be > 1, got {a}")
        out.append(eps + math.log1p((a - 1) * math.expm1((1 - 2 * a) * eps) / (2 * a - 1)) / (a - 1))
    return out


def _check_events(events) -> list[tuple[str, float, float, int]]:
    out = []
    for e in events:
        kind, noise, q, count = str(e[0]), float(e[1]), float(e[2]), int(e[3])
        if kind not in MECHANISMS:
            raise BudgetError(f"unknown mechanism {kind!r} in privacy event {list(e)}")
        if not noise > 0 or not 0 < q <= 1 or count < 0:
            raise BudgetError(f"invalid privacy event {list(e)}: [mechanism, noise_multiplier > 0, "
                              f"sample_rate in (0, 1], count >= 0]")
        if count:
            out.append((kind, noise, q, count))
    return out


def epsilon(history: Iterable[Sequence[float]], delta: float, accountant: str = "rdp",
            mechanism: str = "gaussian", events: Iterable[Sequence] = ()) -> float:
    """Epsilon at ``delta`` of a history of training steps (noise multiplier, sample rate, steps) of
    ``mechanism`` composed with single releases ``events`` (see the module docstring)."""
    hist = _merge(history)
    evs = _check_events(events)
    if mechanism == "laplace":
        if any(kind != "laplace" for kind, *_ in evs):
            raise BudgetError("the pure-epsilon (Laplace) mode composes Laplace releases only")
        return float(sum(steps * laplace_step_epsilon(s, q) for s, q, steps in hist)
                     + sum(n * laplace_step_epsilon(b, q) for _, b, q, n in evs))
    if mechanism != "gaussian":
        raise BudgetError(f"unknown mechanism {mechanism!r}; choose one of {MECHANISMS}")
    if accountant not in ACCOUNTANTS:
        raise BudgetError(f"unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}")
    hist = _merge(hist + [[s, q, n] for kind, s, q, n in evs if kind == "gaussian"])
    laplace = [(b, q, n) for kind, b, q, n in evs if kind == "laplace"]
    if not hist and not laplace:
        return 0.0
    if laplace and accountant == "rdp":
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis import rdp as rdp_analysis

        if any(q < 1 for _, q, _ in laplace):
            raise BudgetError("a subsampled Laplace release cannot be composed with the RDP accountant")
        orders = list(RDPAccountant.DEFAULT_ALPHAS)
        curve = sum((rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in hist),
                    start=0.0)
        for b, _, n in laplace:
            curve = curve + n * np.asarray(laplace_rdp(1.0 / b, orders))
        eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=curve, delta=delta)
        return float(eps)
    pure = float(sum(n * laplace_step_epsilon(b, q) for b, q, n in laplace))  # basic composition (PRV)
    if not hist:
        return pure
    return pure + _gaussian_epsilon(hist, delta, accountant)


def _gaussian_epsilon(hist: list[list], delta: float, accountant: str) -> float:
    if accountant == "rdp":
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
    elif accountant == "prv":
        from opacus.accountants import PRVAccountant

        acc = PRVAccountant()
    else:
        raise BudgetError(f"unknown accountant {accountant!r}; choose one of {ACCOUNTANTS}")
    acc.history = [tuple(h) for h in hist]
    if accountant == "prv":
        return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
    return float(acc.get_epsilon(delta=delta))


def schedule_history(sigmas: Sequence[float], sample_rate: float, steps_per_round: int) -> list[list]:
    return _merge([s, sample_rate, steps_per_round] for s in sigmas)


def planned_schedule(sigma0: float, sample_rate: float, steps_per_round: int, rounds: int, decay: float = 1.0,
                     extra_steps: int = 0) -> list[list]:
    """The whole planned history: round ``r`` runs ``steps_per_round`` steps at noise ``sigma0 * decay**r``;
    ``extra_steps`` after the last round (local fine-tuning) run at ``sigma0 * decay**rounds``."""
    hist = [[sigma0 * decay ** r, sample_rate, steps_per_round] for r in range(rounds)]
    if extra_steps:
        hist.append([sigma0 * decay ** rounds, sample_rate, int(extra_steps)])
    return _merge(hist)


def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps_per_round: int, rounds: int,
              accountant: str = "rdp", mechanism: str = "gaussian", decay: float = 1.0,
              max_noise_multiplier: float = 50.0, spent: Iterable[Sequence[float]] = (), extra_steps: int = 0,
              events: Iterable[Sequence] = ()) -> float:
    """Smallest base noise multiplier ``s`` so that rounds with noise ``s * decay**r`` (and ``extra_steps`` after
    them, see ``planned_schedule``; plus ``spent`` steps and the single releases ``events``) stay within
    ``target_epsilon``. Refuses (BudgetError) when the base noise would have to exceed ``max_noise_multiplier``,
    saying what epsilon the cap reaches."""
    if not target_epsilon > 0:
        raise BudgetError(f"target_epsilon must be > 0, got {target_epsilon}")
    if mechanism == "gaussian" and not 0 < delta < 1:
        raise BudgetError(f"target_delta must be in (0, 1), got {delta}")
    if not 0 < sample_rate <= 1:
        raise BudgetError(f"sampling rate must be in (0, 1], got {sample_rate}")
    if decay <= 0:
        raise BudgetError(f"noise_decay must be > 0, got {decay}")
    spent, events = list(spent), list(events)

    def eps_for(s: float) -> float:
        return epsilon(spent + planned_schedule(s, sample_rate, steps_per_round, rounds, decay, extra_steps), delta,
                       accountant, mechanism, events)

    fixed = epsilon(spent, delta, accountant, mechanism, events)
    if fixed >= target_epsilon:
        raise BudgetError(f"target epsilon {target_epsilon:g} (delta {delta:g}) cannot be met: what is already "
                          f"released or planned apart from training (planning summary, case count) spends {fixed:.4g}")
    at_cap = eps_for(max_noise_multiplier)
    if at_cap > target_epsilon:
        raise BudgetError(
            f"target epsilon {target_epsilon:g} (delta {delta:g}) cannot be met: with the noise multiplier at its cap "
            f"max_noise_multiplier={max_noise_multiplier:g} this schedule ({rounds} rounds x {steps_per_round} "
            f"steps{f' + {extra_steps} fine-tuning steps' if extra_steps else ''}, sampling rate {sample_rate:.4g}, {mechanism}) would reach epsilon {at_cap:.4g}; raise the "
            f"target, train fewer steps, sample fewer cases per step or raise the cap")
    if mechanism == "gaussian" and accountant in ACCOUNTANTS and decay == 1.0 and not spent and not events:
        # Opacus's own calibration for the constant schedule
        from opacus.accountants.utils import get_noise_multiplier

        try:
            s = float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                           steps=steps_per_round * rounds + extra_steps, accountant=accountant,
                                           epsilon_tolerance=0.005 * target_epsilon))
            if eps_for(s) <= target_epsilon and s <= max_noise_multiplier:
                return s
        except ValueError:
            pass
    lo, hi = 0.0, max_noise_multiplier
    for _ in range(60):  # bisection: eps_for decreases with the noise
        mid = (lo + hi) / 2
        if mid > 0 and eps_for(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-4 * hi:
            break
    return hi


def effective_noise_multiplier(grad_noise_multiplier: float, count_noise_multiplier: float | None) -> float:
    """Andrew et al. 2021: releasing the noisy clipped sum (noise ``sigma_g``) and the noisy unclipped count
    (noise ``sigma_b``, each case contributing +-1/2) is one Gaussian mechanism with
    ``sigma = (sigma_g^-2 + (2 sigma_b)^-2)^-1/2``."""
    if not count_noise_multiplier:
        return grad_noise_multiplier
    return (grad_noise_multiplier ** -2 + (2 * count_noise_multiplier) ** -2) ** -0.5


def gradient_noise_multiplier(noise_multiplier: float, count_noise_multiplier: float | None) -> float:
    """Inverse of ``effective_noise_multiplier``: the gradient noise that leaves a total of ``noise_multiplier``."""
    if not count_noise_multiplier:
        return noise_multiplier
    rest = noise_multiplier ** -2 - (2 * count_noise_multiplier) ** -2
    if rest <= 0:
        raise BudgetError(
            f"count_noise_multiplier={count_noise_multiplier:g} is too small for noise multiplier "
            f"{noise_multiplier:.4g}: the unclipped-count query alone would spend more than the whole budget; "
            f"use count_noise_multiplier > {noise_multiplier / 2:.4g}")
    return rest ** -0.5


def laplace_count_scale_split(scale: float, count_scale: float | None) -> float:
    """Laplace with adaptive clipping: a step releases the L1-clipped sum (scale ``b_g``) and the count of
    unclipped cases (each +-1/2, scale ``b_c``): pure epsilon ``1/b_g + 1/(2 b_c)``, which equals ``1/scale``
    for the returned ``b_g``."""
    if not count_scale:
        return scale
    rest = 1.0 / scale - 1.0 / (2 * count_scale)
    if rest <= 0:
        raise BudgetError(f"count_noise_multiplier={count_scale:g} is too small for Laplace scale {scale:.4g}: "
                          f"use count_noise_multiplier > {scale / 2:.4g}")
    return 1.0 / rest

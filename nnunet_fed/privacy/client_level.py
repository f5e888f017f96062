"""Client-level differential privacy: DP-FedAvg on site updates with adaptive clipping.

The unit of privacy here is a whole site: adding or removing one site changes the released global model
by a bounded amount. Each round (McMahan et al. 2018, "Learning differentially private recurrent language
models"; Andrew et al. 2021, "Differentially private learning with adaptive clipping")::

    delta_i   = update_i - global                     (shared parameters of site i)
    clipped_i = delta_i * min(1, C / ||delta_i||_2)   (Flower's clip_inputs_inplace)
    global'   = global + (sum_i clipped_i + N(0, (z_delta C)^2 I)) / n

with ``n`` the *expected* number of participating sites (a fixed denominator, so that one site more or
less changes the sum by at most C). Sites are weighted equally: weighting by number of cases would make
the sensitivity depend on private counts.

Adaptive clipping (``adaptive=True``): each site contributes the bit b_i = [||delta_i|| <= C]; the server
releases the noisy count sum_i (b_i - 1/2) + N(0, sigma_b^2) (sensitivity 1/2) and moves C geometrically
toward the target quantile gamma of update norms: C <- C * exp(-eta (b_bar - gamma)). By Andrew et al.,
Theorem 1, releasing both the update sum with noise multiplier z_delta and the count with sigma_b is
exactly as private as one Gaussian mechanism with multiplier z, where z^-2 = z_delta^-2 + (2 sigma_b)^-2.
The accountant therefore composes ``rounds`` Poisson-subsampled Gaussian mechanisms with multiplier ``z``
and sampling rate ``q`` (the fraction of sites taking part in a round: 1.0 when every site trains every
round) with Opacus's RDP accountant.

Only accepted rounds are released: an attempt with fewer than ``min_updates`` valid site updates (the server's
``min-sites``) raises :class:`TooFewUpdates` before any noise is drawn, so the driver can repeat it without
spending privacy, and a round beyond the ``rounds`` the noise was calibrated for is refused
(:class:`PrivacyBudgetSpent`), so the spent epsilon never passes ``target_epsilon``.

The guarantee is for a whole site. For one training case of a site (what a membership audit measures) see
:func:`case_level_epsilon`: one case can swap its site's clipped update for another one (sensitivity 2C) and
flip its unclipped bit, which doubles the sensitivity of both released quantities.

The wrapper knows nothing of transport and wraps any averaging strategy of
:mod:`nnunet_fed.federation.aggregation` (updates arrive one at a time; memory holds one running sum).
"""
from __future__ import annotations

import logging
import math
from typing import Iterable, Mapping

import numpy as np

from nnunet_fed.federation.aggregation import (FedAvg, NoValidUpdates, UpdateRejected, check_update, float_names,
                                               no_valid_updates)
from nnunet_fed.federation.trainer import nnUNetTrainerFederated
from nnunet_fed.federation.update import Update
from nnunet_fed.privacy import randomness

log = logging.getLogger(__name__)

RECORD_KEY = "client_dp"


class TooFewUpdates(NoValidUpdates):
    """A round attempt with fewer valid site updates than the wrapper's ``min_updates``. Raised before any noise is
    drawn or any state changes: the attempt releases nothing and the driver may repeat the round."""


class PrivacyBudgetSpent(RuntimeError):
    """A round beyond the number of rounds the noise multiplier was calibrated for (it would spend more than the
    target epsilon). Not a :class:`NoValidUpdates`: repeating the round cannot help."""


def client_level_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``rounds`` Poisson-subsampled Gaussian mechanisms with multiplier
    ``noise_multiplier`` (noise std / sensitivity) and sampling rate ``sample_rate`` (Mironov, Talwar and Zhang
    2019, "Renyi differential privacy of the sampled Gaussian mechanism"; Opacus's RDP accountant). With the
    multiplier of :class:`ClientLevelDP` this is the guarantee for a whole site. 0 for ``rounds <= 0``."""
    from opacus.accountants import RDPAccountant

    if rounds <= 0:
        return 0.0
    acc = RDPAccountant()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(rounds))]
    return float(acc.get_epsilon(delta=delta))


def case_level_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` for one training case of a site under client-level DP with multiplier
    ``noise_multiplier`` (z, the whole mechanism's, as recorded in ``client_dp.noise_multiplier``).

    The site-level guarantee assumes a site is added or removed: its clipped update (norm <= C) appears or not
    (sensitivity C) and its unclipped bit, centred, moves the count by 1/2. A case changes a site that takes part
    either way: its clipped update goes from one vector of norm <= C to another (sensitivity 2C) and its bit
    flips (sensitivity 1). With the update's multiplier z_u and the count's noise std sigma_b (Andrew et al.
    2021, Theorem 1: z^-2 = z_u^-2 + (2 sigma_b)^-2 for a site) a case sees (z_u / 2)^-2 + sigma_b^-2 = 4 z^-2,
    i.e. the same mechanism at multiplier z / 2 (same sampling rate, rounds and delta). Exact at
    ``sample_rate`` 1 (every site in every round, as in ``simulate`` and the Flower server). A non-adaptive
    clip (no count) gives the same z / 2.

    Larger than :func:`client_level_epsilon` at the same z: e.g. 18.8 for a case where a site has 8 (delta 1e-5,
    sampling rate 1)."""
    return client_level_epsilon(float(noise_multiplier) / 2.0, sample_rate, rounds, delta)


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    """The smallest noise multiplier (to 1 % in epsilon) that keeps ``rounds`` rounds within the target."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=rounds, accountant="rdp", epsilon_tolerance=0.005))


def clip_update(deltas: list, clip: float) -> float:
    """Clip ``deltas`` (a site's update, float64 arrays) in place to L2 norm ``clip`` over all of them (Flower's
    ``clip_inputs_inplace``) and return the unclipped bit: 1.0 if the norm was already <= ``clip``, else 0.0.
    Used by the server (plain aggregation) and by a site under secure aggregation alike."""
    from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

    norm = get_norm(deltas)
    if norm > clip:  # (Flower's helper divides by the norm: an all-zero update would fail)
        clip_inputs_inplace(deltas, clip)
        return 0.0
    return 1.0


def _check_min_updates(min_updates) -> None:
    if isinstance(min_updates, bool) or not isinstance(min_updates, (int, np.integer)) or min_updates < 1:
        raise ValueError(f"client-level DP: min_updates (fewest valid site updates per round) must be an "
                         f"integer >= 1, got {min_updates!r}")


class ClientLevelDP:
    """DP-FedAvg wrapper around an averaging strategy (``aggregate(global_arrays, updates)``).

    Give either ``noise_multiplier`` (z, the multiplier of the whole mechanism, count included) or
    ``target_epsilon`` (z is then calibrated in :meth:`start`, when the number of rounds is known).
    ``min_updates`` (>= 1; :meth:`start` may set it, e.g. the server's ``min-sites``) is the fewest valid site
    updates a round needs: an attempt with fewer raises :class:`TooFewUpdates` and releases nothing.
    With ``target_epsilon``, more rounds than :meth:`start` calibrated for raise :class:`PrivacyBudgetSpent`.
    """

    name = "client_dp"

    def __init__(self, strategy, *, noise_multiplier: float | None = None, target_epsilon: float | None = None,
                 target_delta: float = 1e-5, clip: float = 1.0, adaptive: bool = True, target_quantile: float = 0.5,
                 clip_lr: float = 0.2, count_stddev: float | None = None, sample_rate: float = 1.0,
                 min_updates: int = 1, rng: np.random.Generator | None = None):
        if not isinstance(strategy, FedAvg):
            raise ValueError(f"client-level DP needs an averaging strategy (its noise is calibrated to the sum of "
                             f"clipped updates); got {type(strategy).__name__}")
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError("client-level DP: set exactly one of client_noise_multiplier and client_target_epsilon "
                             f"(got noise multiplier {noise_multiplier}, target epsilon {target_epsilon})")
        if noise_multiplier is not None and not noise_multiplier > 0:
            raise ValueError(f"client_noise_multiplier must be > 0, got {noise_multiplier}")
        if target_epsilon is not None and not target_epsilon > 0:
            raise ValueError(f"client_target_epsilon must be > 0, got {target_epsilon}")
        if not 0 < target_delta < 1:
            raise ValueError(f"client_target_delta must lie in (0, 1), got {target_delta}")
        if not clip > 0:
            raise ValueError(f"client_clip (initial clipping norm) must be > 0, got {clip}")
        if not 0 <= target_quantile <= 1:
            raise ValueError(f"client_target_quantile must lie in [0, 1], got {target_quantile}")
        if not clip_lr > 0:
            raise ValueError(f"client_clip_lr must be > 0, got {clip_lr}")
        if count_stddev is not None and not count_stddev > 0:
            raise ValueError(f"client_count_stddev must be > 0, got {count_stddev}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate of sites must lie in (0, 1], got {sample_rate}")
        _check_min_updates(min_updates)
        self.strategy = strategy
        self.requested_noise_multiplier = noise_multiplier
        self.target_epsilon = target_epsilon
        self.delta = float(target_delta)
        self.clip = float(clip)
        self.adaptive = bool(adaptive)
        self.target_quantile = float(target_quantile)
        self.clip_lr = float(clip_lr)
        self.requested_count_stddev = count_stddev
        self.sample_rate = float(sample_rate)
        self.min_updates = int(min_updates)
        # noise must be unpredictable to whoever sees the model: OS entropy (randomness) unless a generator is given
        self.rng = rng if rng is not None else randomness.numpy_generator()
        self.num_sites: int | None = None
        self.rounds: int | None = None
        self.rounds_done = 0
        self._last: dict | None = None

    # ------------------------------------------------------------------ set-up
    def start(self, num_sites: int, rounds: int, history: Iterable[Mapping] = (),
              min_updates: int | None = None) -> None:
        """Called by the driver before the first round: federation size (the fixed denominator is
        ``sample_rate * num_sites``), schedule (for calibration), the records of rounds already completed
        (a resumed run continues with their clipping norm and privacy spent) and, if given, the fewest valid
        updates a round needs (``min_updates``, 1 <= min_updates <= num_sites: the server's ``min-sites``).
        Raises ValueError for values out of range."""
        if num_sites < 1 or rounds < 1:
            raise ValueError(f"client-level DP needs num_sites >= 1 and rounds >= 1, got {num_sites}, {rounds}")
        if min_updates is not None:
            _check_min_updates(min_updates)
        needed = self.min_updates if min_updates is None else int(min_updates)
        if needed > num_sites:
            raise ValueError(f"client-level DP: a round needs {needed} valid site updates but the federation has "
                             f"{num_sites} site(s)")
        self.min_updates = needed
        self.num_sites, self.rounds = int(num_sites), int(rounds)
        self.expected_sites = self.sample_rate * self.num_sites
        if self.target_epsilon is not None:
            self.noise_multiplier = calibrate_noise_multiplier(self.target_epsilon, self.delta, self.sample_rate,
                                                               self.rounds)
        else:
            self.noise_multiplier = float(self.requested_noise_multiplier)
        z = self.noise_multiplier
        if self.adaptive:
            # Andrew et al. recommend sigma_b = expected sites / 20; with few sites that leaves no budget for the
            # update, so the count gets at least sigma_b = sqrt(5) z (5 % of the privacy loss).
            sigma_b = self.requested_count_stddev
            if sigma_b is None:
                sigma_b = max(self.expected_sites / 20.0, math.sqrt(5.0) * z)
            from flwr.supercore.differential_privacy import compute_adaptive_noise_params

            try:
                self.count_stddev, self.update_noise_multiplier = compute_adaptive_noise_params(
                    z, self.expected_sites, sigma_b)
            except ValueError:
                raise ValueError(f"client_count_stddev={sigma_b} is too small for the noise multiplier {z:.4g}: "
                                 f"it must exceed {z / 2:.4g} (the count's noise is part of the same budget)") from None
        else:
            self.count_stddev, self.update_noise_multiplier = 0.0, z
        rows = [r[RECORD_KEY] for r in history if RECORD_KEY in r]
        self.rounds_done = len(rows)
        if rows:
            self.clip = float(rows[-1]["next_clip"])
        eps = client_level_epsilon(z, self.sample_rate, self.rounds, self.delta)
        log.info("client-level DP: noise multiplier %.4g (update %.4g, count std %.4g), %d rounds, q=%.3g: "
                 "epsilon %.4g at delta %g", z, self.update_noise_multiplier, self.count_stddev, self.rounds,
                 self.sample_rate, eps, self.delta)

    @property
    def planned_epsilon(self) -> float:
        return client_level_epsilon(self.noise_multiplier, self.sample_rate, self.rounds, self.delta)

    @property
    def epsilon(self) -> float:
        """Privacy spent so far (all completed rounds)."""
        return client_level_epsilon(self.noise_multiplier, self.sample_rate, self.rounds_done, self.delta)

    # the driver reads these after aggregate()
    @property
    def accepted(self):
        return self.strategy.accepted

    @property
    def rejected(self):
        return self.strategy.rejected

    # ------------------------------------------------------------------ one round
    def aggregate(self, global_arrays: Mapping[str, np.ndarray], updates: Iterable[Update]) -> dict[str, np.ndarray]:
        """One round: the new global arrays (same names, shapes and dtypes as ``global_arrays``) from the site
        updates, clipped to the current clip, summed, noised and divided by the expected number of sites.

        Raises :class:`PrivacyBudgetSpent` (before reading any update) when a target epsilon is set and the
        calibrated rounds are all done; :class:`NoValidUpdates` (:class:`TooFewUpdates` when some came) when
        fewer than ``min_updates`` updates are valid. Both leave the clip, ``rounds_done`` and the noise
        generator untouched: only a round that returns is released and accounted."""
        self._check_can_release()
        clip = self.clip
        floats = float_names(global_arrays)
        bits: dict[str, float] = {}

        def clipped_updates():
            for update in updates:
                try:
                    check_update(update, global_arrays)
                except UpdateRejected:
                    yield update  # the inner strategy rejects and records it
                    continue
                deltas = [update.arrays[k].astype(np.float64) - global_arrays[k] for k in floats]
                bits[update.site] = clip_update(deltas, clip)
                arrays = {k: np.array(v, copy=True) for k, v in global_arrays.items()}  # non-float buffers: global
                for k, d in zip(floats, deltas):
                    arrays[k] = global_arrays[k] + d.astype(global_arrays[k].dtype)
                # equal weights: the sum of clipped deltas, not a case-weighted mean (case counts are private)
                yield Update(update.site, arrays, 1, dict(update.metrics))

        mean = self.strategy.aggregate(global_arrays, clipped_updates())
        k = len(self.strategy.accepted)
        self._check_enough(k)
        sums = {name: k * (mean[name].astype(np.float64) - global_arrays[name]) for name in floats}
        return self._release(global_arrays, sums, sum(bits[u.site] for u in self.strategy.accepted if u.site in bits),
                             k)

    def aggregate_secure(self, global_arrays: Mapping[str, np.ndarray], total) -> dict[str, np.ndarray]:
        """One round from a securely aggregated sum (``aggregation.SecureSum``): each site clipped its own update
        to the current :attr:`clip` and added its unclipped bit inside the masked vector (:func:`clip_update`),
        with equal weights, so ``k * mean`` is the sum of the clipped deltas and of the bits over the ``k``
        contributing sites. Noise, clip adaptation, accounting and errors are those of :meth:`aggregate`."""
        self._check_can_release()
        self.strategy.rejected, self.strategy.accepted = list(total.rejected), list(total.accepted)
        k = len(total.accepted)
        if k == 0:
            raise no_valid_updates(total.rejected)
        self._check_enough(k)
        if self.adaptive and total.unclipped_fraction is None:
            raise ValueError("adaptive client-level DP needs the sites' unclipped bits in the secure sum")
        floats = float_names(global_arrays)
        sums = {n: k * np.asarray(total.mean_delta[n], np.float64) for n in floats}
        return self._release(global_arrays, sums, k * float(total.unclipped_fraction or 0.0), k)

    def _check_can_release(self) -> None:
        if self.num_sites is None:
            raise RuntimeError("ClientLevelDP.start(num_sites, rounds) must be called before the first round")
        if self.target_epsilon is not None and self.rounds_done >= self.rounds:
            raise PrivacyBudgetSpent(
                f"client-level DP: the noise was calibrated for {self.rounds} round(s) at target epsilon "
                f"{self.target_epsilon:g} and {self.rounds_done} are done (epsilon {self.epsilon:.4g}); another "
                f"round would spend more than the target")

    def _check_enough(self, k: int) -> None:
        if k < self.min_updates:  # nothing drawn, nothing moved: this attempt releases nothing
            raise TooFewUpdates(f"{k} valid site update(s), {self.min_updates} needed (min-sites); client-level DP "
                                f"releases nothing for this attempt and the round can be repeated")

    def _release(self, global_arrays: Mapping[str, np.ndarray], sums: Mapping[str, np.ndarray], unclipped_sum: float,
                 k: int) -> dict[str, np.ndarray]:
        """Noise the sum of the ``k`` clipped deltas (``sums``, float arrays by name) and the unclipped count, move
        the clip, account the round; the new global arrays."""
        clip = self.clip
        sigma = self.update_noise_multiplier * clip
        out = {k_: np.array(v, copy=True) for k_, v in global_arrays.items()}
        for name, total in sums.items():
            g = global_arrays[name].astype(np.float64)
            noisy = total + self.rng.normal(0.0, sigma, size=g.shape)
            out[name] = (g + noisy / self.expected_sites).astype(global_arrays[name].dtype)

        next_clip, unclipped = clip, None
        if self.adaptive:
            centred = unclipped_sum - 0.5 * k
            unclipped = (centred + self.rng.normal(0.0, self.count_stddev)) / self.expected_sites + 0.5
            next_clip = clip * math.exp(-self.clip_lr * (unclipped - self.target_quantile))
        self.clip = next_clip
        self.rounds_done += 1
        self._last = {
            "epsilon": self.epsilon, "delta": self.delta, "rounds_accounted": self.rounds_done,
            "noise_multiplier": self.noise_multiplier, "update_noise_multiplier": self.update_noise_multiplier,
            "count_stddev": self.count_stddev, "sample_rate": self.sample_rate, "expected_sites": self.expected_sites,
            "clip": clip, "next_clip": next_clip, "noisy_unclipped_fraction": unclipped, "noise_std": sigma,
            "accountant": "opacus rdp",
        }
        return out

    def round_record(self) -> dict:
        """What the round's metrics line records (all of it already released or public)."""
        return {RECORD_KEY: dict(self._last)} if self._last else {}


# ---------------------------------------------------------------------- trainer side
CLIENT_DP_OPTIONS = {
    "client_noise_multiplier": None,  # z of the whole mechanism (update sum + clipped count)
    "client_target_epsilon": None,  # or: calibrate z to this epsilon over all rounds
    "client_target_delta": 1e-5,
    "client_clip": 1.0,  # (initial) clipping norm of a site's update (L2, over all shared parameters)
    "client_adaptive": True,  # adapt the clipping norm to a quantile of update norms
    "client_target_quantile": 0.5,  # fraction of site updates left unclipped
    "client_clip_lr": 0.2,  # geometric step of the clipping norm per round
    "client_count_stddev": None,  # noise std of the unclipped count (default max(n/20, sqrt(5) z))
}


def wrap_client_dp(strategy, options: Mapping) -> ClientLevelDP:
    """``strategy`` wrapped with client-level DP configured from trainer options (see CLIENT_DP_OPTIONS)."""
    return ClientLevelDP(strategy, noise_multiplier=options.get("client_noise_multiplier"),
                         target_epsilon=options.get("client_target_epsilon"),
                         target_delta=float(options.get("client_target_delta", 1e-5)),
                         clip=float(options.get("client_clip", 1.0)),
                         adaptive=bool(options.get("client_adaptive", True)),
                         target_quantile=float(options.get("client_target_quantile", 0.5)),
                         clip_lr=float(options.get("client_clip_lr", 0.2)),
                         count_stddev=options.get("client_count_stddev"))


class ClientLevelDPMixin:
    """Put in front of any federated trainer to add client-level DP on the server:
    ``class MyTrainer(ClientLevelDPMixin, nnUNetTrainerFedAvg)``. Sites train as the wrapped trainer does;
    only the server's aggregation changes (a single-site run under plain nnUNetv2_train is not affected)."""

    federated_options = CLIENT_DP_OPTIONS

    @classmethod
    def resolve_options(cls, options: Mapping | None = None, environ: Mapping | None = None) -> dict:
        """Also checks the client-DP values (so that ``nnunet_fed simulate`` refuses them before writing anything).
        Whether a noise multiplier or a target epsilon is given is checked when the server strategy is made."""
        resolved = super().resolve_options(options, environ)
        check = dict(resolved)
        if check.get("client_noise_multiplier") is None and check.get("client_target_epsilon") is None:
            check["client_noise_multiplier"] = 1.0
        wrap_client_dp(FedAvg(), check)
        return resolved

    @classmethod
    def averaging_strategy(cls, options: Mapping | None = None, diagnose: bool = False):
        if diagnose:
            raise ValueError(f"{cls.__name__}: --diagnose would record properties of individual site updates, which "
                             f"client-level DP protects only after their sum is noised")
        options = cls.resolve_options(options)
        return wrap_client_dp(super().averaging_strategy(options), options)


class nnUNetTrainerClientDPBase(ClientLevelDPMixin, nnUNetTrainerFederated):
    """FedAvg with client-level DP (all parameters shared)."""

"""Private adaptive clipping (Andrew et al. 2021, "Differentially private learning with adaptive clipping").

The clipping threshold ``C`` follows a target quantile ``gamma`` of the per-case gradient norms without looking
at them directly: each logical step counts the sampled cases whose norm is at most ``C``, releases that count
with noise (each case contributes ``b_i - 1/2``, so the count's sensitivity is 1/2), and moves ``C``
geometrically::

    b = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / (q N) + 1/2        (noisy fraction of unclipped cases)
    C <- C * exp(-eta * (b - gamma))

The count and the gradient sum are released together as one Gaussian mechanism with
``sigma = (sigma_g^-2 + (2 sigma_b)^-2)^-1/2`` (see ``accountant.effective_noise_multiplier``), so the adaptive
threshold costs budget and is counted. With Laplace noise the count gets Laplace noise instead. The noise comes
from OS entropy (``randomness``).
"""
from __future__ import annotations

import math

from nnunet_fed.privacy import randomness


class AdaptiveClip:
    def __init__(self, initial: float, target_quantile: float = 0.5, learning_rate: float = 0.2,
                 count_noise_multiplier: float = 1.0, mechanism: str = "gaussian", min_clip: float = 1e-6,
                 max_clip: float = 1e6):
        if not initial > 0:
            raise ValueError(f"initial clipping threshold must be > 0, got {initial}")
        if not 0 < target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {target_quantile}")
        if not learning_rate > 0:
            raise ValueError(f"clip_lr must be > 0, got {learning_rate}")
        self.clip = float(initial)
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self.count_noise_multiplier = float(count_noise_multiplier)
        self.mechanism = mechanism
        self.min_clip, self.max_clip = min_clip, max_clip
        self.last_unclipped_fraction: float | None = None

    def noisy_unclipped_fraction(self, unclipped: int, sampled: int, expected_batch: float) -> float:
        centred = unclipped - 0.5 * sampled
        if self.mechanism == "laplace":
            noise = randomness.laplace_scalar(self.count_noise_multiplier)
        else:
            noise = randomness.gaussian_scalar(self.count_noise_multiplier)
        return (centred + noise) / expected_batch + 0.5

    def update(self, unclipped: int, sampled: int, expected_batch: float) -> float:
        """One geometric step from the noisy count; returns the new threshold."""
        frac = self.noisy_unclipped_fraction(unclipped, sampled, expected_batch)
        self.last_unclipped_fraction = frac
        self.clip = min(self.max_clip, max(self.min_clip,
                                           self.clip * math.exp(-self.learning_rate * (frac - self.target_quantile))))
        return self.clip

"""One logical DP-SGD step: clip per case, accumulate over physical batches, add noise once, average.

The logical batch (Poisson-sampled cases, see ``sampling``) is processed in physical batches (nnU-Net's batch
size). Each case's gradient is clipped to ``clip`` and added to one accumulator; after the last physical batch
the noise (Gaussian ``N(0, noise_std^2)`` or Laplace with scale ``noise_std``) is added once per coordinate and the
sum divided by the *expected* logical batch size (``q`` times the site's noisy case count, a released value, so
the division leaks nothing about the actual batch size or the exact number of cases). An empty logical batch
releases the noise alone. The noise comes from OS entropy (``randomness``), never from a seeded generator. The
sanitizer knows nothing of accounting.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from nnunet_fed.privacy import randomness
from nnunet_fed.privacy.per_sample import PerSampleClipper


class DPSanitizer:
    def __init__(self, clipper: PerSampleClipper, mechanism: str = "gaussian"):
        if mechanism not in ("gaussian", "laplace"):
            raise ValueError(f"unknown mechanism {mechanism!r}")
        if (mechanism == "laplace") != (clipper.norm_type == 1.0):
            raise ValueError("the Laplace mechanism needs L1 clipping and the Gaussian mechanism L2 clipping")
        self.clipper = clipper
        self.mechanism = mechanism

    def noise_like(self, p: torch.Tensor, std: float) -> torch.Tensor:
        """Noise of ``p``'s shape: ``N(0, std^2)``, or Laplace of scale ``std`` (sampled in float64)."""
        if self.mechanism == "laplace":
            return randomness.laplace_like(p, std)
        return randomness.gaussian_like(p, std)

    def step(self, physical_batches: Iterable[tuple[torch.Tensor, Callable]], clip: float, noise_std: float,
             expected_batch: float, multiplicity: int = 1) -> dict:
        """Set ``p.grad`` of every parameter to (sum of clipped per-case gradients + noise) / expected_batch.

        ``physical_batches`` yields (data, per_sample_losses); with ``multiplicity`` K each case appears K times in a
        row (augmentations averaged before clipping, ``PerSampleClipper.clipped_sum``'s ``group``). Returns the number of cases, the number whose
        gradient norm was at most ``clip`` (for adaptive clipping; never released without noise) and the
        sum of their losses (kept at the site)."""
        acc: dict = {}
        sampled = unclipped = 0
        loss_sum = 0.0
        for data, losses_fn in physical_batches:
            acc, norms, losses = self.clipper.clipped_sum(data, losses_fn, clip, acc, group=multiplicity)
            sampled += int(norms.numel())
            unclipped += int((norms <= clip).sum())
            loss_sum += float(losses.sum())
        for p in self.clipper.parameters:
            total = acc.get(p)
            noise = self.noise_like(p, noise_std)
            p.grad = (total.add_(noise) if total is not None else noise).div_(expected_batch)
        return {"sampled": sampled, "unclipped": unclipped, "loss_sum": loss_sum}

"""Perturbed boundary loss (PBL, FedOAP) around nnU-Net's own losses.

    L = (1 - lambda) * L_seg(z, y) + lambda * L_seg(z~, y),    z~ = z + M * eps,   eps ~ N(0, sigma^2)

``L_seg`` is nnU-Net's loss for one output (``DC_and_CE_loss`` for labels, ``DC_and_BCE_loss`` for regions);
with deep supervision, :func:`wrap_with_pbl` applies PBL at every scale inside nnU-Net's
``DeepSupervisionWrapper`` (each scale gets its own mask and noise; the scale weights are nnU-Net's).

The mask ``M`` (no gradient flows through it):

* error variant (``band = 0``, the paper's): pixels the model gets wrong by more than ``tau``.
  Labels (softmax): ``1 - p_true > tau``, where ``p_true`` is the softmax probability of the ground-truth
  class; a masked pixel gets noise on every class logit. This is the same set as
  ``max_c |softmax(z)_c - onehot(y)_c| > tau`` (for a wrong class ``p_c <= 1 - p_true``), and for two
  classes it is the paper's ``|sigmoid(z) - y| > tau``. Regions (sigmoid): ``|sigmoid(z) - y| > tau`` per
  region channel, exactly as in the paper.
* band variant (``band = b > 0``): pixels within ``b`` pixels (chessboard distance, at the output's own
  resolution, so lower deep-supervision scales get a relatively wider band) of a ground-truth boundary,
  i.e. whose ``(2b+1)``-neighbourhood holds more than one label (per channel for regions).

Pixels with nnU-Net's ignore label are never perturbed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from torch import nn


def _max_pool(x: torch.Tensor, radius: int) -> torch.Tensor:
    pool = F.max_pool2d if x.ndim == 4 else F.max_pool3d
    return pool(x, kernel_size=2 * radius + 1, stride=1, padding=radius)


def boundary_band(target: torch.Tensor, radius: int) -> torch.Tensor:
    """Pixels whose ``(2 radius + 1)`` neighbourhood (per channel) holds more than one value."""
    t = target.float()
    return _max_pool(t, radius) != -_max_pool(-t, radius)


class PerturbedBoundaryLoss(nn.Module):
    """PBL around one nnU-Net loss ``loss(logits, target)`` (one output scale).

    ``regions``: logits are per-region sigmoid logits and ``target`` holds one binary channel per region
    (nnU-Net's region training; with ``ignore_label`` set, the last target channel is nnU-Net's ignore
    mask). Otherwise logits are softmax logits and ``target`` is the label map ``(B, 1, *spatial)``.
    """

    def __init__(self, loss: nn.Module, lam: float = 0.1, tau: float = 0.75, sigma: float = 0.1, band: int = 0,
                 regions: bool = False, ignore_label: int | None = None):
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"PBL lambda must lie in [0, 1], got {lam}")
        if not 0.0 <= tau < 1.0:
            raise ValueError(f"PBL tau must lie in [0, 1), got {tau}")
        if sigma < 0:
            raise ValueError(f"PBL sigma must be >= 0, got {sigma}")
        if band < 0 or int(band) != band:
            raise ValueError(f"PBL band must be a whole number of pixels >= 0, got {band}")
        self.loss = loss
        self.lam, self.tau, self.sigma, self.band = float(lam), float(tau), float(sigma), int(band)
        self.regions = bool(regions)
        self.ignore_label = ignore_label

    @torch.no_grad()
    def perturbation_mask(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Boolean mask broadcastable to ``logits``: ``(B, 1, *S)`` for labels, ``(B, R, *S)`` for regions."""
        if self.regions:
            valid = None
            if self.ignore_label is not None:
                valid = target[:, -1:] == 0
                target = target[:, :-1]
            if self.band > 0:
                mask = boundary_band(target, self.band)
            else:
                mask = (torch.sigmoid(logits.float()) - target.float()).abs() > self.tau
            return mask & valid if valid is not None else mask
        labels = target.long()
        valid = None
        if self.ignore_label is not None:
            valid = labels != self.ignore_label
            labels = torch.where(valid, labels, 0)
        if self.band > 0:
            mask = boundary_band(target, self.band)
        else:
            p_true = torch.softmax(logits.float(), 1).gather(1, labels)
            mask = (1.0 - p_true) > self.tau
        return mask & valid if valid is not None else mask

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        plain = self.loss(logits, target)
        if self.lam == 0.0 or self.sigma == 0.0:
            return plain
        mask = self.perturbation_mask(logits, target)
        if not bool(mask.any()):  # z~ = z: the two terms are equal
            return plain
        noise = torch.randn_like(logits) * self.sigma * mask
        return (1.0 - self.lam) * plain + self.lam * self.loss(logits + noise, target)


def wrap_with_pbl(loss: nn.Module, lam: float = 0.1, tau: float = 0.75, sigma: float = 0.1, band: int = 0,
                  regions: bool = False, ignore_label: int | None = None) -> nn.Module:
    """nnU-Net's training loss (``trainer.loss``) with PBL at every output scale.

    A ``DeepSupervisionWrapper`` gets a new wrapper (same scale weights) around PBL of its inner loss;
    a single-scale loss is wrapped directly. The given loss object is not modified."""
    kwargs = dict(lam=lam, tau=tau, sigma=sigma, band=band, regions=regions, ignore_label=ignore_label)
    if isinstance(loss, DeepSupervisionWrapper):
        return DeepSupervisionWrapper(PerturbedBoundaryLoss(loss.loss, **kwargs), loss.weight_factors)
    return PerturbedBoundaryLoss(loss, **kwargs)

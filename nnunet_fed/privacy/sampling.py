"""Poisson sampling of training cases for DP-SGD, on top of nnU-Net's data loader.

The unit of privacy is the training case (a patient). nnU-Net's loader draws a fixed number of cases with
replacement per batch, so a case can appear twice in a batch and the batch composition does not match what
the privacy accountants assume. ``PoissonCaseLoader`` instead builds each *logical* batch by including every
training case independently with probability ``q`` (Poisson sampling, the assumption of Opacus's RDP/PRV
accountants) and cuts **one patch** from each sampled case (``multiplicity`` patches, each with its own position
and augmentation, for augmentation multiplicity; the trainer averages their gradients before clipping), with nnU-Net's patch selection (foreground
oversampling decided per case with the same probability, independently of the other cases) and nnU-Net's
augmentation pipeline unchanged. A logical batch therefore holds each case at most once, its size is random
(Binomial(N, q), possibly 0), and the trainer processes it in physical batches of nnU-Net's batch size.

The inclusion mask is drawn from OS entropy (``randomness.poisson_mask``): a mask anyone can regenerate from a
public seed would tell which cases were sampled and void the amplification by sampling. The rest of the
loader's randomness (foreground oversampling, patch position, augmentation) is drawn from the process's global
generators reseeded from OS entropy (``randomness.use_entropy_in_this_process``), in whichever process the loader
runs (nnU-Net's augmentation workers, the simulation's pool, or the trainer's own process).
"""
from __future__ import annotations

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_fed.privacy import randomness


class PoissonCaseLoader(nnUNetDataLoader):
    """``nnUNetDataLoader`` whose every batch is one Poisson-sampled logical batch (each case with prob. ``q``)."""

    def __init__(self, *args, sample_rate: float, multiplicity: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sampling rate must be in (0, 1], got {sample_rate}")
        if int(multiplicity) != multiplicity or multiplicity < 1:
            raise ValueError(f"augmentation multiplicity must be an integer >= 1, got {multiplicity}")
        self.sample_rate = float(sample_rate)
        self.multiplicity = int(multiplicity)
        # foreground oversampling per case with nnU-Net's probability, independent of the other cases
        self.get_do_oversample = self._probabilistic_oversampling
        self._keys = None

    def get_indices(self):
        return self._keys

    def generate_train_batch(self):
        randomness.use_entropy_in_this_process()
        mask = randomness.poisson_mask(len(self.indices), self.sample_rate)
        # each sampled case ``multiplicity`` times in a row: its own patch and augmentation per copy
        keys = [k for k, m in zip(self.indices, mask) if m for _ in range(self.multiplicity)]
        if not keys:
            return {"data": None, "target": None, "keys": []}
        self._keys, physical = keys, self.batch_size
        self.batch_size = len(keys)  # nnU-Net's generate_train_batch sizes its output from batch_size
        try:
            return super().generate_train_batch()
        finally:
            self.batch_size, self._keys = physical, None


def split_batch(batch: dict, size: int, multiplicity: int = 1):
    """Physical batches of at most ``size`` samples (at least one case) from a logical batch, never splitting the
    ``multiplicity`` copies of a case."""
    size = max(multiplicity, size - size % multiplicity)
    n = len(batch["keys"])
    for s in range(0, n, size):
        target = batch["target"]
        target = [t[s:s + size] for t in target] if isinstance(target, (list, tuple)) else target[s:s + size]
        yield batch["data"][s:s + size], target

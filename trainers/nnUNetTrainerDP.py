"""DP-SGD for one site under plain nnUNetv2_train: ``nnUNet_fed_target_epsilon=8 nnUNetv2_train D 2d 0 -tr nnUNetTrainerDP``."""
from nnunet_fed.privacy.dp_trainer import nnUNetTrainerDPBase


class nnUNetTrainerDP(nnUNetTrainerDPBase):
    """Sample-level DP-SGD (Poisson sampling of cases, exact per-case clipping, Gaussian noise, RDP accountant)."""

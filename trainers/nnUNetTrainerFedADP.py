"""Federated DP-SGD with private adaptive clipping (ADP-FL, done with a counted private quantile estimate)."""
from nnunet_fed.privacy.dp_trainer import nnUNetTrainerDPBase


class nnUNetTrainerFedADP(nnUNetTrainerDPBase):
    """The clip tracks the ``target_quantile`` of per-case gradient norms (noisy unclipped count, geometric update,
    Andrew et al. 2021); noise follows the current clip; optional ``noise_decay`` over rounds; all accounted."""
    server_strategy = "fedavg"
    federated_options = {"adaptive_clip": True}

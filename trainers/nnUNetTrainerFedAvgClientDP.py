from nnunet_fed.privacy.client_level import nnUNetTrainerClientDPBase


class nnUNetTrainerFedAvgClientDP(nnUNetTrainerClientDPBase):
    """FedAvg with client-level DP (DP-FedAvg, adaptive clipping of site updates). Options: client_target_epsilon
    or client_noise_multiplier, client_target_delta, client_clip, client_adaptive, client_target_quantile, ..."""

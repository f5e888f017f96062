"""Federated DP-SGD with a fixed clipping threshold (the DP-FL baseline)."""
from nnunet_fed.privacy.dp_trainer import nnUNetTrainerDPBase


class nnUNetTrainerFedDP(nnUNetTrainerDPBase):
    """Every site trains with sample-level DP-SGD (fixed clip ``max_grad_norm``); the server averages (FedAvg)."""
    server_strategy = "fedavg"

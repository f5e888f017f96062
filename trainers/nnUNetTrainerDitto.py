"""Ditto (Li et al. 2021): FedAvg's global model plus a personal model per site, pulled towards the global one."""
from nnunet_fed.personalization import DittoTrainer


class nnUNetTrainerDitto(DittoTrainer):
    """Global model: FedAvg, every parameter shared. Personal model (``checkpoint_final.pth`` of each site): nnU-Net's
    loss + ditto_lambda/2 ||v - w_global||^2, ``ditto_steps`` per round (0: as many as local_steps)."""

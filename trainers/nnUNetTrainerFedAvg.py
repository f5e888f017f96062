from nnunet_fed.federation.trainer import nnUNetTrainerFederated


class nnUNetTrainerFedAvg(nnUNetTrainerFederated):
    """Example-weighted FedAvg; every parameter is shared. FedProx: ``--fedprox-mu`` (or ``nnUNet_fed_fedprox_mu``)."""
    server_strategy = "fedavg"

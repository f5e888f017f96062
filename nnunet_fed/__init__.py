"""nnunet_fed: federated, differentially private and personalised training for nnU-Net v2."""
import os

__version__ = "0.1.0"


def trainer_folder() -> str:
    """Folder holding the nnU-Net-discoverable trainers; point ``nnUNet_extTrainer`` at it."""
    from nnunet_fed import trainers

    return os.path.dirname(os.path.abspath(trainers.__file__))

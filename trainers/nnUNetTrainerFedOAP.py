"""FedOAP (personalised): DCA bottleneck + spatial adapters, local query/adapters/heads, fine-tuning with PBL."""
from nnunet_fed.personalization import FedOAPTrainer


class nnUNetTrainerFedOAP(FedOAPTrainer):
    """Shared: encoder, decoder, key/value branch, Wk/Wv/Wo. Local: query branch, Wq, adapters, heads."""


class nnUNetTrainerFedOAPNoPBL(FedOAPTrainer):
    """FedOAP with plain nnU-Net loss in the fine-tuning phase (ablation)."""
    federated_options = {"pbl_lambda": 0.0}


class nnUNetTrainerFedOAPBand(FedOAPTrainer):
    """FedOAP with PBL noise on a 2-pixel band around the ground-truth boundary instead of the error mask."""
    federated_options = {"pbl_band": 2}

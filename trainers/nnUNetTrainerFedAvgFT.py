"""FedAvg followed by the same local fine-tuning budget as FedOAP (a fair personalised baseline)."""
from nnunet_fed.personalization import FineTunedFedAvgTrainer


class nnUNetTrainerFedAvgFT(FineTunedFedAvgTrainer):
    """FedAvg rounds, then ``finetune_steps`` local steps per site (plain loss; ``-o pbl_lambda=0.1`` adds PBL)."""

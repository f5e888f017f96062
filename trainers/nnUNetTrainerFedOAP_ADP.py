"""FedOAP with ADP-FL: personalised federated training where every step a site takes on its data is private."""
from nnunet_fed.personalization import FedOAPNetwork, LocalFineTuning
from nnunet_fed.privacy.dp_trainer import nnUNetTrainerDPBase


class nnUNetTrainerFedOAP_ADP(FedOAPNetwork, LocalFineTuning, nnUNetTrainerDPBase):
    """FedOAP's network, sharing policy and PBL fine-tuning, trained with DP-SGD and private adaptive clipping.

    The rounds and the local fine-tuning are both DP-SGD steps (per-case clipping of the whole gradient, local
    parameters included, noise, accountant); the noise is calibrated to ``target_epsilon`` over rounds x local
    steps + ``finetune_steps``, so the personal model a site keeps is covered by the same (epsilon, delta) as the
    updates it sent. PBL's noise enters each case's own loss, so the per-case bound holds unchanged."""
    federated_options = {"adaptive_clip": True}

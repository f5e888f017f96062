"""FedPer (Arivazhagan et al. 2019, "Federated Learning with Personalization Layers"): the segmentation heads
(nnU-Net's ``decoder.seg_layers``, one per deep-supervision output) stay at the site; the body is averaged."""
from nnunet_fed.federation.trainer import nnUNetTrainerFederated
from nnunet_fed.federation.update import SharingPolicy


class nnUNetTrainerFedPer(nnUNetTrainerFederated):
    """FedAvg of encoder and decoder; each site keeps its own segmentation heads."""
    sharing_policy = SharingPolicy(local_patterns=(r"decoder\.seg_layers\.",))

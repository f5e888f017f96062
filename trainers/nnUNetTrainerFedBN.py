"""FedBN (Li et al. 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch Normalization"): every
normalisation layer (nnU-Net's instance-norm scale and shift) stays at the site; the rest is averaged."""
from nnunet_fed.federation.trainer import nnUNetTrainerFederated
from nnunet_fed.federation.update import NORMALIZATION_LAYERS, SharingPolicy


class nnUNetTrainerFedBN(nnUNetTrainerFederated):
    """FedAvg of every parameter except the normalisation layers' (local: each site keeps its own)."""
    sharing_policy = SharingPolicy(local_modules=NORMALIZATION_LAYERS)

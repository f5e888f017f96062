"""Network variants built from nnU-Net's plans (FedOAP: decoupled cross-attention bottleneck, spatial adapters)."""
from nnunet_fed.architectures.adapter import AdaptedHead, SpatialAdapter
from nnunet_fed.architectures.builder import FEDOAP_LOCAL_PATTERNS, FedOAPUNet, build_fedoap_network, wrap_unet
from nnunet_fed.architectures.dca import DecoupledCrossAttention

__all__ = ["AdaptedHead", "SpatialAdapter", "DecoupledCrossAttention", "FedOAPUNet", "FEDOAP_LOCAL_PATTERNS",
           "build_fedoap_network", "wrap_unet"]

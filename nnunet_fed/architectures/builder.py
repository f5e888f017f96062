"""FedOAP networks built from nnU-Net's plans: nnU-Net's UNet with a DCA bottleneck and spatial adapters.

The wrapped network keeps nnU-Net's ``encoder`` and ``decoder`` modules (and so their state-dict names,
deep supervision and ``decoder.deep_supervision`` switch, which nnU-Net's trainer and predictor set)::

    skips = encoder(x)
    skips[-1] = dca(skips[-1])                # decoupled cross-attention at the deepest stage
    decoder(skips)                            # nnU-Net's decoder; each head is AdaptedHead(adapter, conv1x1)

Parameter names (for sharing policies): ``dca.query_branch.*``, ``dca.wq.*`` (local by default),
``dca.kv_branch.*``, ``dca.wk.*``, ``dca.wv.*``, ``dca.wo.*``, ``dca.norm.*`` (shared), and
``decoder.seg_layers.<i>.adapter.*`` / ``decoder.seg_layers.<i>.head.*`` (adapters and heads, local).
"""
from __future__ import annotations

from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from nnunet_fed.architectures.adapter import AdaptedHead, SpatialAdapter
from nnunet_fed.architectures.dca import DecoupledCrossAttention

#: regular expressions (``re.match`` on state-dict names) of the parameters FedOAP keeps at the site
FEDOAP_LOCAL_PATTERNS = (
    r"dca\.query_branch\.",
    r"dca\.wq\.",
    r"decoder\.seg_layers\.",  # adapters and segmentation heads (every deep-supervision head)
)

ADAPTER_PLACEMENTS = ("all", "final")


class FedOAPUNet(nn.Module):
    """nnU-Net's PlainConvUNet / ResidualEncoderUNet with a DCA bottleneck and adapters before the heads."""

    def __init__(self, unet: nn.Module, num_heads: int = 8, adapters: str = "all"):
        super().__init__()
        if not isinstance(unet, (PlainConvUNet, ResidualEncoderUNet)):
            raise ValueError(f"FedOAP wraps nnU-Net's PlainConvUNet or ResidualEncoderUNet, the plans give "
                             f"{type(unet).__name__}")
        if adapters not in ADAPTER_PLACEMENTS:
            raise ValueError(f"adapters must be one of {ADAPTER_PLACEMENTS}, got {adapters!r}")
        enc = unet.encoder
        self.encoder = unet.encoder
        self.decoder = unet.decoder
        common = dict(conv_op=enc.conv_op, norm_op=enc.norm_op, norm_op_kwargs=enc.norm_op_kwargs,
                      nonlin=enc.nonlin, nonlin_kwargs=enc.nonlin_kwargs, conv_bias=bool(enc.conv_bias))
        self.dca = DecoupledCrossAttention(enc.output_channels[-1], kernel_size=enc.kernel_sizes[-1],
                                           num_heads=num_heads, **common)
        # decoder stage s works at the resolution of encoder stage -(s + 2)
        n = len(self.decoder.seg_layers)
        for s, head in enumerate(self.decoder.seg_layers):
            if adapters == "final" and s != n - 1:
                continue
            channels = enc.output_channels[-(s + 2)]
            adapter = SpatialAdapter(channels, kernel_size=enc.kernel_sizes[-(s + 2)], **common)
            self.decoder.seg_layers[s] = AdaptedHead(adapter, head)
        self.adapters = adapters

    def forward(self, x):
        skips = list(self.encoder(x))
        skips[-1] = self.dca(skips[-1])
        return self.decoder(skips)


def wrap_unet(unet: nn.Module, num_heads: int = 8, adapters: str = "all", initialize: bool = True) -> FedOAPUNet:
    """Wrap an nnU-Net UNet; the new modules get nnU-Net's He initialisation (the UNet's weights are kept)."""
    net = FedOAPUNet(unet, num_heads=num_heads, adapters=adapters)
    if initialize:
        init = InitWeights_He(1e-2)
        net.dca.apply(init)
        for layer in net.decoder.seg_layers:
            if isinstance(layer, AdaptedHead):
                layer.adapter.apply(init)
    return net


def build_fedoap_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                         enable_deep_supervision: bool = True, num_heads: int = 8,
                         adapters: str = "all") -> FedOAPUNet:
    """nnU-Net's network from the plans (``get_network_from_plans``), wrapped by :class:`FedOAPUNet`."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    unet = get_network_from_plans(configuration_manager.network_arch_class_name,
                                  configuration_manager.network_arch_init_kwargs,
                                  configuration_manager.network_arch_init_kwargs_req_import,
                                  num_input_channels, num_output_channels, allow_init=True,
                                  deep_supervision=enable_deep_supervision)
    return wrap_unet(unet, num_heads=num_heads, adapters=adapters)

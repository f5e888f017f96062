"""Site-specific spatial adapter of FedOAP, placed in front of a segmentation head."""
from __future__ import annotations

from dynamic_network_architectures.building_blocks.helper import maybe_convert_scalar_to_list
from torch import nn


class SpatialAdapter(nn.Module):
    """Residual block: ``nonlin(Norm(conv(nonlin(Norm(conv(x))))) + conv1x1(x))`` (two 3x3 convs, 1x1 shortcut).

    ``kernel_size`` defaults to 3 per axis; pass the decoder stage's kernel (e.g. ``[1, 3, 3]`` for anisotropic
    3d plans) to keep nnU-Net's receptive field choices. Shape-preserving.
    """

    def __init__(self, channels: int, conv_op, kernel_size=3, norm_op=None, norm_op_kwargs=None, nonlin=None,
                 nonlin_kwargs=None, conv_bias: bool = True):
        super().__init__()
        kernel_size = maybe_convert_scalar_to_list(conv_op, kernel_size)
        padding = [(k - 1) // 2 for k in kernel_size]

        def norm():
            return norm_op(channels, **(norm_op_kwargs or {})) if norm_op is not None else nn.Identity()

        def act():
            return nonlin(**(nonlin_kwargs or {})) if nonlin is not None else nn.Identity()

        self.conv1 = conv_op(channels, channels, kernel_size, 1, padding, bias=conv_bias)
        self.norm1 = norm()
        self.act1 = act()
        self.conv2 = conv_op(channels, channels, kernel_size, 1, padding, bias=conv_bias)
        self.norm2 = norm()
        self.shortcut = conv_op(channels, channels, 1, 1, 0, bias=True)
        self.act2 = act()

    def forward(self, x):
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act2(y + self.shortcut(x))


class AdaptedHead(nn.Module):
    """A segmentation head with a spatial adapter in front: ``head(adapter(x))``.

    Replaces an entry of nnU-Net's ``decoder.seg_layers``, so the decoder's forward (and its
    ``deep_supervision`` switch) stays nnU-Net's own."""

    def __init__(self, adapter: nn.Module, head: nn.Module):
        super().__init__()
        self.adapter = adapter
        self.head = head

    def forward(self, x):
        return self.head(self.adapter(x))

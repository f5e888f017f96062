"""Decoupled cross-attention (DCA) bottleneck of FedOAP.

Two bottleneck blocks run in parallel on the deepest encoder features ``F``: a *query branch* (kept at the
site) and a *key/value branch* (averaged by the server)::

    Fq  = query_branch(F)          Fkv = kv_branch(F)           (conv + norm + nonlin, as nnU-Net's stages)
    Q   = Wq Fq     K = Wk Fkv     V = Wv Fkv                    (1x1 convolutions)
    A   = multi-head softmax(Q K^T / sqrt(d)) V                  (over the bottleneck positions)
    out = Norm(Wo A + Fq)

What a site shares are the weights of the key/value branch and of Wk, Wv, Wo (and the norm); no feature
tensor ever leaves a site. Works for 2d and 3d (any ``conv_op``), with the norm/nonlinearity of the plans.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from torch import nn


def pick_num_heads(channels: int, requested: int) -> int:
    """The largest number of heads <= ``requested`` that divides ``channels``."""
    if requested < 1:
        raise ValueError(f"number of attention heads must be >= 1, got {requested}")
    for h in range(min(requested, channels), 0, -1):
        if channels % h == 0:
            return h
    return 1


class DecoupledCrossAttention(nn.Module):
    """``out = Norm(Wo(MHA(Wq Fq, Wk Fkv, Wv Fkv)) + Fq)`` with parallel query and key/value branches.

    Input and output have the same shape ``(B, C, *spatial)``. ``num_heads`` is reduced to a divisor of
    ``channels`` if needed (see :func:`pick_num_heads`).
    """

    def __init__(self, channels: int, conv_op, kernel_size, norm_op=None, norm_op_kwargs=None, nonlin=None,
                 nonlin_kwargs=None, num_heads: int = 8, conv_bias: bool = True, dropout_op=None,
                 dropout_op_kwargs=None):
        super().__init__()
        self.channels = int(channels)
        self.num_heads = pick_num_heads(self.channels, num_heads)

        def branch():
            return StackedConvBlocks(1, conv_op, channels, channels, kernel_size, 1, conv_bias, norm_op,
                                     norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs)

        self.query_branch = branch()
        self.kv_branch = branch()
        self.wq = conv_op(channels, channels, 1, 1, 0, bias=True)
        self.wk = conv_op(channels, channels, 1, 1, 0, bias=True)
        self.wv = conv_op(channels, channels, 1, 1, 0, bias=True)
        self.wo = conv_op(channels, channels, 1, 1, 0, bias=True)
        self.norm = norm_op(channels, **(norm_op_kwargs or {})) if norm_op is not None else nn.Identity()

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, c = t.shape[:2]
        # (B, C, *S) -> (B, heads, N, C / heads)
        return t.reshape(b, self.num_heads, c // self.num_heads, -1).transpose(-1, -2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fq = self.query_branch(x)
        fkv = self.kv_branch(x)
        q, k, v = self._heads(self.wq(fq)), self._heads(self.wk(fkv)), self._heads(self.wv(fkv))
        attn = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        attn = attn.transpose(-1, -2).reshape(fq.shape)
        return self.norm(self.wo(attn) + fq)

"""Exact per-sample gradient clipping for nnU-Net's networks.

``PerSampleClipper.clipped_sum`` adds ``sum_i c_i g_i`` with ``c_i = min(1, C / ((1 + CLIP_MARGIN) ||g_i||))`` (L2, or L1 when
``norm_type`` is 1) over the samples of a physical batch, where ``g_i`` is the gradient of sample ``i``'s loss.
Two exact strategies compute it (``method=``):

``"hooks"``: nnU-Net's UNets (``PlainConvUNet``, ``ResidualEncoderUNet``; 2d and 3d; deep supervision) treat the
samples of a batch independently: convolutions, transposed convolutions, instance normalisation (statistics per
sample and channel) and LeakyReLU never mix samples. So one ordinary backward pass of the *sum of per-sample
losses* gives, at every layer output, the gradient each sample sends through that layer. From a layer's input and
that output gradient, each sample's parameter gradient follows exactly:

- convolution / transposed convolution: the weight gradient of a grouped convolution with one group per sample
  (``aten.convolution_backward`` with ``groups = batch x groups``); the bias gradient is a spatial sum;
- instance norm (affine): ``sum(grad * x_hat)`` and ``sum(grad)`` over space, per sample and channel.

The step:

1. forward with hooks that keep each layer's input and catch the gradient at its output (tensor hooks, so the
   in-place LeakyReLU after a norm and the in-place residual addition of ``BasicBlockD`` are handled: the hook
   sees the gradient of the value before the in-place change);
2. backward of ``sum_i loss_i`` to the activations only (parameters do not require grad during the pass, so no
   weight gradient is computed twice);
3. per-sample gradient norms, layer by layer. Where the feature map is small (the deep 2d convolutions and the
   decoder's transposed convolutions, whose kernel equals their stride) the norm comes from the "ghost" identity
   without forming the per-sample gradients. Elsewhere they are formed; a layer's are kept for step 5 when they
   take no more memory than the layer's output gradient, which is held anyway (the layers on large feature maps,
   whose weights are small), and freed at once otherwise;
4. clip factors ``c_i``;
5. the clipped sum ``sum_i c_i g_i`` of every parameter: ``sum_i c_i g_i`` from the kept per-sample gradients, and
   for the other layers one batched weight gradient with the output gradients scaled by ``c_i`` (an ordinary
   weight-gradient computation). So no layer's weight gradient is computed more than twice, and the layers on
   large feature maps, which dominate a step's cost, once.

``"loop"``: one ordinary forward + backward (``torch.autograd.grad`` of ``loss_i`` with respect to the parameters,
so ``p.grad`` is not touched) per sample; the norm of ``g_i``, then ``c_i g_i`` is added to the accumulator.

``"auto"`` (the default) takes the loop for a physical batch of one sample (the hooks would only add work), or
when a sample has at least ``LOOP_MIN_VOXELS`` voxels (a 128x128 2d patch, any 3d_fullres patch), or when the
batch holds copies of each case (augmentation multiplicity; :meth:`PerSampleClipper.method_for`), and the hooks
otherwise. The hooks cost a roughly fixed multiple of a plain batched step (one more weight-gradient pass, the
norms); the loop costs what single-sample steps cost, which is a plain step's cost unless batching pays, i.e. for
many small samples. Measured with ``benchmarks/dp_step.py`` on an idle 2-core CPU, 2 threads (DP step / plain step
at the same batch, hooks vs loop): 2d 64x64 batch 24 1.42 vs 2.52 (ResidualEncoderUNet 1.44 vs 3.17), 3d_fullres
48x64x64 batch 2 1.16 vs 0.85. Before step 5 reused per-sample gradients and the transposed convolutions took the
ghost norm, the hooks measured (``--patch --batch``, shared CPU, 1 thread): 2d 64x64 batch 24 1.78 vs 1.97, 2d 64x64
batch 2 1.93 vs 1.76, 2d 128x128 batch 4 1.65 vs 1.20, 2d 128x128 batch 12 1.70 vs 1.18, 3d 24x32x32 batch 2 1.76 vs
1.62, 3d 48x64x64 batch 2 1.50 vs 0.89. The loop won at every size from 16384 voxels a sample on; at 4096 (2d 64x64)
it won by 10 % at batch 2 but lost at batch 24, so small samples keep the hooks, whose cost does not blow up with
the batch. Measured on CPU only: on a GPU, single-sample passes
fill the device less and the threshold is likely higher (the trainer option ``per_sample_method`` overrides it).

``loss_i`` is nnU-Net's loss (Dice + CE, deep supervision) evaluated on sample ``i`` alone, so with
``batch_dice`` the Dice term is per sample (a loss coupling samples would make a sample's gradient depend on
other samples' data). Both strategies are exact: tests compare them with each other and with single-sample
backward passes. Networks with layers that mix samples (BatchNorm) or parameters outside supported layers are
refused (also for the loop, which would not need it, so that both strategies accept the same networks).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

SUPPORTED = (_ConvNd, _InstanceNorm)
METHODS = ("auto", "hooks", "loop")
#: ``flat``: c_i = min(1, C / ||g_i||) (Abadi et al. 2016); ``automatic``: c_i = C / (||g_i|| + gamma), every case's
#: gradient normalised (Bu et al. 2023, "Automatic clipping: differentially private deep learning made easier and
#: stronger", AUTO-S), so its contribution has norm < C whatever its size and there is no clip to tune or adapt
CLIPPING = ("flat", "automatic")
LOOP_MIN_VOXELS = 16384  # "auto": the loop for samples of at least this many voxels (see the module docstring)
#: relative safety margin of the clip: a case is scaled to norm ``C / (1 + CLIP_MARGIN)`` as measured, so that its
#: true contribution stays within ``C`` although float32 norms under-estimate by up to ~1e-4 (relative) on these
#: networks (ghost norms, long float32 sums); tests check the bound in float64.
CLIP_MARGIN = 1e-3


def _spatial_dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, t.dim()))


def per_case_losses(loss: Callable, target) -> Callable[[object, range], torch.Tensor]:
    """The ``per_sample_losses`` callable of ``PerSampleClipper.clipped_sum`` for an nnU-Net loss: ``loss`` of
    each case ``indices[j]`` alone, whose network output is ``output[j]`` (``output`` and ``target`` are lists
    with deep supervision, tensors without)."""
    targets = target if isinstance(target, (list, tuple)) else [target]

    def losses(output, indices):
        deep = isinstance(output, (list, tuple))
        outs = output if deep else [output]
        per_case = []
        for j, i in enumerate(indices):
            o, t = [o[j:j + 1] for o in outs], [t[i:i + 1] for t in targets]
            per_case.append(loss(o, t) if deep else loss(o[0], t[0]))
        return torch.stack(per_case)
    return losses


class PerSampleClipper:
    """Clipped sums of exact per-sample gradients for a network made of convolutions and instance norms."""

    def __init__(self, network: nn.Module, norm_type: float = 2.0, method: str = "auto", clipping: str = "flat",
                 stability: float = 0.01):
        if norm_type not in (1.0, 2.0):
            raise ValueError(f"norm_type must be 1 (L1) or 2 (L2), got {norm_type}")
        if method not in METHODS:
            raise ValueError(f"per-sample gradient method {method!r}: choose one of {', '.join(METHODS)}")
        if clipping not in CLIPPING:
            raise ValueError(f"clipping {clipping!r}: choose one of {', '.join(CLIPPING)}")
        if not stability > 0:
            raise ValueError(f"automatic clipping's stability constant must be > 0, got {stability}")
        self.network = network
        self.method = method
        self.clipping, self.stability = clipping, float(stability)
        self.norm_type = float(norm_type)
        self.layers: list[nn.Module] = []
        covered = set()
        for name, module in network.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise ValueError(f"per-sample gradients: {name} ({type(module).__name__}) mixes the samples of a "
                                 f"batch; use instance normalisation (nnU-Net's default)")
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if not isinstance(module, SUPPORTED):
                raise ValueError(f"per-sample gradients: layer {name} ({type(module).__name__}) is not supported; "
                                 f"supported are convolutions, transposed convolutions and instance norms")
            if isinstance(module, _InstanceNorm) and module.track_running_stats:
                raise ValueError(f"per-sample gradients: {name} tracks running statistics across samples")
            self.layers.append(module)
            covered.update(id(p) for p in own)
        missing = [n for n, p in network.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise ValueError(f"per-sample gradients: parameters outside supported layers: {missing[:5]}")
        self.parameters = [p for m in self.layers for p in m.parameters(recurse=False) if p.requires_grad]

    # ------------------------------------------------------------------ the step
    def method_for(self, data: torch.Tensor, group: int = 1) -> str:
        """The strategy ``clipped_sum`` uses for the physical batch ``data`` of cases in groups of ``group`` copies:
        the constructor's, or the auto rule. With copies (augmentation multiplicity) the loop runs one forward and
        backward per case, not per copy, and the hooks cannot use the ghost-norm identity for the copies' mean:
        ``benchmarks/dp_step.py --multiplicity 2`` measured the loop 1.6 times (2d 64x64, batch 24) and 1.8 times
        (32x32, batch 50) faster than the hooks, so auto takes the loop there."""
        if self.method != "auto":
            return self.method
        return "loop" if group > 1 or data.shape[0] == 1 or data[0, 0].numel() >= LOOP_MIN_VOXELS else "hooks"

    def clipped_sum(self, data: torch.Tensor, per_sample_losses: Callable[[object, range], torch.Tensor],
                    max_norm: float, accumulate_into: dict | None = None, group: int = 1):
        """Add ``sum_i c_i g_i`` into ``accumulate_into`` (parameter -> tensor), ``c_i`` the clip factor of
        ``clipping`` (flat: ``min(1, max_norm / ||g_i||)``).

        ``per_sample_losses(output, indices)`` returns the vector of per-sample losses for the network output
        ``output`` of ``data[indices]`` (``indices`` is a ``range`` of positions in ``data``: all of them for the
        hooks, one case at a time for the loop). ``group`` (augmentation multiplicity, De et al. 2022, "Unlocking
        high-accuracy differentially private image classification through scale"): ``data`` holds each case
        ``group`` times in a row (different augmentations); a case's gradient ``g_i`` is the mean of its copies'
        gradients, clipped once, so a case still contributes at most ``max_norm``. The accumulator's tensors are its
        own (never a ``p.grad``); parameters' ``requires_grad`` and ``grad`` are left as they were.
        Returns (accumulator, per-case gradient norms (float64), per-case losses (mean over copies, detached)).
        Raises ``ValueError`` when the batch is not whole groups."""
        if group < 1 or data.shape[0] % group:
            raise ValueError(f"a physical batch of {data.shape[0]} samples is not whole groups of {group} copies")
        acc = accumulate_into if accumulate_into is not None else {}
        if self.method_for(data, group) == "loop":
            norms, losses = self._loop(data, per_sample_losses, max_norm, acc, group)
        else:
            norms, losses = self._hooks(data, per_sample_losses, max_norm, acc, group)
        return acc, norms, losses

    def _factors(self, norms: torch.Tensor, max_norm: float, dtype) -> torch.Tensor:
        """Per case: ``min(1, C / (||g_i|| (1 + CLIP_MARGIN)))`` (flat; a zero gradient keeps factor 1) or
        ``C / (||g_i|| (1 + CLIP_MARGIN) + gamma)`` (automatic)."""
        if self.clipping == "automatic":
            return (max_norm / (norms * (1.0 + CLIP_MARGIN) + self.stability)).to(dtype)
        return (max_norm / (norms * (1.0 + CLIP_MARGIN))).nan_to_num(posinf=1.0).clamp(max=1.0).to(dtype)

    @staticmethod
    def _accumulate(acc: dict, p: torch.Tensor, g: torch.Tensor) -> None:
        """``acc[p] += g``; ``g`` is a tensor this step computed (kept as the accumulator when ``p`` is new)."""
        if p in acc:
            acc[p] += g
        else:
            acc[p] = g

    def _loop(self, data, per_sample_losses, max_norm, acc, group=1):
        params = [p for p in self.parameters if p.requires_grad]
        norms, losses = [], []
        for i in range(0, data.shape[0], group):
            loss = per_sample_losses(self.network(data[i:i + group]), range(i, i + group)).mean().reshape(1)
            grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
            used = [(p, g) for p, g in zip(params, grads) if g is not None]
            per_tensor = torch.stack([torch.linalg.vector_norm(g, ord=self.norm_type) for _, g in used]).double()
            norm = torch.linalg.vector_norm(per_tensor, ord=self.norm_type)
            factor = self._factors(norm, max_norm, data.dtype)
            for p, g in used:
                self._accumulate(acc, p, g.mul_(factor))  # autograd's fresh gradient, scaled in place
            norms.append(norm)
            losses.append(loss.detach())
        return torch.stack(norms), torch.cat(losses)

    def _hooks(self, data, per_sample_losses, max_norm, acc, group=1):
        records: list[list] = []  # [module, input, grad_output]

        def forward_hook(module, inputs, output):
            rec = [module, inputs[0].detach(), None]
            records.append(rec)
            if not output.requires_grad:
                return None
            replacement, target = None, output
            if output._base is not None:
                # instance norm returns a view of its batch-norm result, and a hook on a view that is then
                # modified in place (LeakyReLU(inplace=True), ``out += residual``) never fires: hook the base
                if output._base.numel() == output.numel() and output.is_contiguous():
                    target = output._base
                else:
                    replacement = target = output.clone()
            shape = output.shape

            def catch(grad, rec=rec):
                grad = grad.reshape(shape)
                rec[2] = grad if rec[2] is None else rec[2] + grad

            target.register_hook(catch)
            return replacement

        flags = [p.requires_grad for p in self.parameters]
        handles = [m.register_forward_hook(forward_hook) for m in self.layers]
        batch = data.shape[0]
        try:
            for p in self.parameters:
                p.requires_grad_(False)
            data = data.detach().requires_grad_(True)
            output = self.network(data)
            losses = per_sample_losses(output, range(batch))
            torch.autograd.grad(losses.sum(), data)
        finally:
            for h in handles:
                h.remove()
            for p, f in zip(self.parameters, flags):
                p.requires_grad_(f)
        del output
        cases = batch // group
        sq = torch.zeros(cases, dtype=torch.float64, device=data.device)
        kept: dict[int, list] = {}  # record -> [(parameter, per-case gradients (cases, *shape))]
        for k, (module, inp, grad) in enumerate(records):
            if grad is None:
                continue
            if group == 1 and self.norm_type == 2 and self._ghost_is_cheaper(module, grad):
                sq += self._ghost_sq_norms(module, inp, grad)
                continue
            per_case = []
            for p, g in self._per_sample(module, inp, grad):
                g = g if group == 1 else g.reshape(cases, group, *g.shape[1:]).mean(1)  # a case: its copies' mean
                n = torch.linalg.vector_norm(g.flatten(1), ord=self.norm_type, dim=1).double()
                sq += n * n if self.norm_type == 2 else n
                per_case.append((p, g))
            if sum(g.numel() for _, g in per_case) <= grad.numel():
                kept[k] = per_case  # no larger than the output gradient already held: reused for the sum
        norms = sq.sqrt() if self.norm_type == 2 else sq
        case_factors = self._factors(norms, max_norm, data.dtype)
        # each copy's output gradient scaled by its case's factor / group: the scaled sum is sum_i c_i mean_k g_ik
        factors = case_factors.repeat_interleave(group) / group
        for k, (module, inp, grad) in enumerate(records):
            if k in kept:
                for p, g in kept.pop(k):
                    self._accumulate(acc, p, torch.tensordot(case_factors, g, dims=1))
                continue
            if grad is None:
                continue
            scaled = grad * factors.view(-1, *([1] * (grad.dim() - 1)))
            for p, g in zip(self._own_params(module), self._batched(module, inp, scaled)):
                if g is not None:
                    self._accumulate(acc, p, g)
        return norms, losses.detach().reshape(cases, group).mean(1)

    # ------------------------------------------------------------------ per layer
    @staticmethod
    def _own_params(module):
        return [module.weight, module.bias]

    @staticmethod
    def _x_hat(module, inp):
        return nn.functional.instance_norm(inp, eps=module.eps)

    def _per_sample(self, module, inp, grad) -> Sequence[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, its per-sample gradients of shape (batch, *param.shape)) for each trained parameter."""
        out = []
        dims = _spatial_dims(grad)
        if isinstance(module, _InstanceNorm):
            if module.weight is not None and module.weight.requires_grad:
                out.append((module.weight, (grad * self._x_hat(module, inp)).sum(dims)))
            if module.bias is not None and module.bias.requires_grad:
                out.append((module.bias, grad.sum(dims)))
            return out
        if module.weight.requires_grad:
            out.append((module.weight, self._conv_weight_per_sample(module, inp, grad)))
        if module.bias is not None and module.bias.requires_grad:
            out.append((module.bias, grad.sum(dims)))
        return out

    @staticmethod
    def _matmul_form(module, grad) -> tuple[int, int, int] | None:
        """(D, C, T) when a layer's per-sample weight gradient is a product ``g_b a_b^T`` of (C, T) and (D, T)
        matrices that ``_as_matmul`` forms, else None: a 2d convolution (``a`` its unfolded input patches) or a
        transposed convolution whose kernel equals its stride, without padding (nnU-Net's decoder upsampling:
        each input position fills its own block of the output, in any dimension)."""
        if not isinstance(module, _ConvNd) or isinstance(module.padding, str) or module.groups != 1:
            return None
        k = math.prod(module.kernel_size)
        if isinstance(module, nn.Conv2d):
            return module.in_channels * k, module.out_channels, grad.shape[2] * grad.shape[3]
        if (module.transposed and tuple(module.kernel_size) == tuple(module.stride) and not any(module.padding)
                and not any(module.output_padding) and all(d == 1 for d in module.dilation)):
            return module.in_channels, module.out_channels * k, grad[0, 0].numel() // k
        return None

    @staticmethod
    def _as_matmul(module, inp, grad) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, g) of shapes (B, D, T), (B, C, T) for a layer ``_matmul_form`` accepts."""
        if isinstance(module, nn.Conv2d):
            a = nn.functional.unfold(inp, module.kernel_size, module.dilation, module.padding, module.stride)
            return a, grad.flatten(2)
        b, dim = inp.shape[0], len(module.kernel_size)
        blocks = []  # the output (B, C, n_1 k_1, ..., n_d k_d) as (B, C, n_1, k_1, ..., n_d, k_d)
        for n, k in zip(inp.shape[2:], module.kernel_size):
            blocks += [n, k]
        g = grad.reshape(b, grad.shape[1], *blocks)
        g = g.permute(0, 1, *[3 + 2 * i for i in range(dim)], *[2 + 2 * i for i in range(dim)])
        return inp.flatten(2), g.reshape(b, grad.shape[1] * math.prod(module.kernel_size), -1)

    def _ghost_is_cheaper(self, module, grad) -> bool:
        """Ghost norm (Goodfellow 2015; Li et al. 2022) where the feature map is small:
        ``||sum_t g_t a_t^T||^2 = sum_{t,s} (g_t . g_s)(a_t . a_s)`` costs T^2 (D + C) instead of T D C."""
        form = self._matmul_form(module, grad)
        if form is None:
            return False
        d, c, positions = form
        return positions * (d + c) < 0.5 * d * c

    def _ghost_sq_norms(self, module, inp, grad) -> torch.Tensor:
        a, g = self._as_matmul(module, inp, grad)
        sq = ((a.transpose(1, 2) @ a) * (g.transpose(1, 2) @ g)).sum((1, 2)).double()
        if module.bias is not None and module.bias.requires_grad:
            sq += grad.flatten(2).sum(2).double().pow(2).sum(1)
        return sq

    @staticmethod
    def _conv_weight_per_sample(module: _ConvNd, inp, grad) -> torch.Tensor:
        b = inp.shape[0]
        w = module.weight
        x = inp.reshape(1, -1, *inp.shape[2:])
        g = grad.reshape(1, -1, *grad.shape[2:])
        weight = w.detach().repeat(b, *([1] * (w.dim() - 1)))  # (b * w.shape[0], ...): one group per sample
        if isinstance(module.padding, str):
            raise ValueError(f"per-sample gradients: string padding {module.padding!r} is not supported")
        _, gw, _ = torch.ops.aten.convolution_backward(
            g, x, weight, None, module.stride, module.padding, module.dilation, module.transposed,
            module.output_padding, module.groups * b, [False, True, False])
        return gw.view(b, *w.shape)

    def _batched(self, module, inp, grad):
        """(weight, bias) gradients of the batch (summed over samples), for an output gradient ``grad``."""
        dims = (0, *_spatial_dims(grad))
        wants_w = module.weight is not None and module.weight.requires_grad
        wants_b = module.bias is not None and module.bias.requires_grad
        if isinstance(module, _InstanceNorm):
            return [(grad * self._x_hat(module, inp)).sum(dims) if wants_w else None,
                    grad.sum(dims) if wants_b else None]
        _, gw, gb = torch.ops.aten.convolution_backward(
            grad, inp, module.weight.detach(), [module.out_channels] if wants_b else None,
            module.stride, module.padding, module.dilation, module.transposed, module.output_padding, module.groups,
            [False, wants_w, wants_b])
        return [gw if wants_w else None, gb if wants_b else None]

"""DP-SGD step time against nnU-Net's plain training step, at the same batch size.

Networks are built as nnU-Net plans them (``get_network_from_plans`` with the architecture nnU-Net's planner gives)
for a 2d configuration (64x64 patches, batch 24, PlainConvUNet 5 stages 32..512) and a 3d_fullres configuration
(48x64x64 patches, batch 2, 5 stages 32..320); ``--resenc`` uses ResidualEncoderUNet. Both steps use nnU-Net's loss
(Dice + CE with deep supervision) on random data and SGD as nnU-Net configures it:

- plain: nnU-Net's ``train_step`` body (forward, loss, backward, clip_grad_norm_(12), optimizer step);
- DP: ``DPSanitizer.step`` (exact per-case gradients, clip, sum, Gaussian noise, divide) + optimizer step, once
  with each per-sample strategy of ``PerSampleClipper`` ("hooks" and "loop"; the line says which one "auto" picks).

The plain step and the DP steps alternate (so all see the same machine load) and the ratios of medians are printed.
``--patch`` and ``--batch`` replace a configuration's patch size and batch size (same network), to see where each
strategy wins. ``--multiplicity K`` (augmentation multiplicity, De et al. 2022) makes the DP step treat the batch as
batch / K cases of K copies each (their gradients averaged before clipping, as the DP trainers do); the line then
also gives the DP step's time per case over the plain step's time per patch, i.e. what a case costs against K = 1.

    python3 benchmarks/dp_step.py [--reps 5] [--configs 2d 3d_fullres] [--resenc] [--threads N]
    python3 benchmarks/dp_step.py --configs 3d_fullres --patch 24 32 32 --batch 4
    python3 benchmarks/dp_step.py --configs 2d --multiplicity 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_fed.privacy.per_sample import METHODS, PerSampleClipper, per_case_losses
from nnunet_fed.privacy.sanitizer import DPSanitizer

CONFIGS = {
    # name: (patch, batch, features, strides, batch_dice) as nnU-Net's planner sets them for such data
    "2d": ((64, 64), 24, [32, 64, 128, 256, 512], [[1, 1]] + [[2, 2]] * 4, True),
    "3d_fullres": ((48, 64, 64), 2, [32, 64, 128, 256, 320],
                   [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], False),
}


def build(config: str, resenc: bool, num_classes: int = 3, patch=None, batch=None):
    default_patch, default_batch, feats, strides, batch_dice = CONFIGS[config]
    patch, batch = tuple(patch or default_patch), batch or default_batch
    dim = len(patch)
    n = len(feats)
    conv = f"torch.nn.modules.conv.Conv{dim}d"
    norm = f"torch.nn.modules.instancenorm.InstanceNorm{dim}d"
    kwargs = {"n_stages": n, "features_per_stage": feats, "conv_op": conv, "kernel_sizes": [[3] * dim] * n,
              "strides": strides, "n_conv_per_stage_decoder": [1 if resenc else 2] * (n - 1), "conv_bias": True,
              "norm_op": norm, "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
              "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    if resenc:
        arch = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
        kwargs["n_blocks_per_stage"] = [1, 3, 4, 6, 6][:n]
    else:
        arch = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
        kwargs["n_conv_per_stage"] = [2] * n
    net = get_network_from_plans(arch, kwargs, ["conv_op", "norm_op", "dropout_op", "nonlin"], 1, num_classes,
                                 allow_init=True, deep_supervision=True)
    x = torch.randn(batch, 1, *patch)
    with torch.no_grad():
        outs = net(x)
    targets = [torch.randint(0, num_classes, (batch, 1, *o.shape[2:])).float() for o in outs]
    weights = np.array([1 / 2 ** i for i in range(len(outs))])
    weights[-1] = 0
    loss = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False,
                                                  "ddp": False}, {}, weight_ce=1, weight_dice=1, ignore_label=None,
                                                 dice_class=MemoryEfficientSoftDiceLoss), weights / weights.sum())
    return net, x, targets, loss


def run(config: str, reps: int, resenc: bool, patch=None, batch=None, multiplicity: int = 1) -> dict:
    torch.manual_seed(0)
    net, x, targets, loss = build(config, resenc, patch=patch, batch=batch)
    opt = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    batch = x.shape[0]

    def plain():
        opt.zero_grad(set_to_none=True)
        l = loss(net(x), targets)
        l.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()

    per_sample_losses = per_case_losses(loss, targets)

    def dp_step(method):
        sanitizer = DPSanitizer(PerSampleClipper(net, method=method))

        def dp():
            opt.zero_grad(set_to_none=True)
            sanitizer.step([(x, per_sample_losses)], clip=1.0, noise_std=1.0, expected_batch=float(batch // multiplicity),
                           multiplicity=multiplicity)
            opt.step()
        return dp

    steps = {"plain": plain, **{m: dp_step(m) for m in METHODS if m != "auto"}}
    times = {name: [] for name in steps}
    for fn in steps.values():  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"median_s": med, "ratio": {m: med[m] / med["plain"] for m in med if m != "plain"},
            "auto": PerSampleClipper(net).method_for(x, multiplicity), "patch": tuple(x.shape[2:]),
            "params_M": sum(p.numel() for p in net.parameters()) / 1e6, "batch": batch}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--resenc", action="store_true", help="ResidualEncoderUNet instead of PlainConvUNet")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--patch", type=int, nargs="+", default=None, help="patch size instead of the configuration's")
    ap.add_argument("--batch", type=int, default=None, help="batch size instead of the configuration's")
    ap.add_argument("--multiplicity", type=int, default=1, help="copies per case in the DP step (batch / K cases)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = "ResidualEncoderUNet" if args.resenc else "PlainConvUNet"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} CPUs, {arch}")
    targets = {"2d": 1.5, "3d_fullres": 1.0}
    for config in args.configs:
        if args.patch and len(args.patch) != len(CONFIGS[config][0]):
            ap.error(f"--patch {args.patch} does not fit {config}")
        k = args.multiplicity
        batch = args.batch or CONFIGS[config][1]
        if k < 1 or batch % k:
            ap.error(f"--multiplicity {k} does not divide the batch {batch} of {config}")
        r = run(config, args.reps, args.resenc, args.patch, args.batch, k)
        med, ratio, auto = r["median_s"], r["ratio"], r["auto"]
        per_case = f"  K={k}: {batch // k} cases, DP time per case / plain time per patch {k * ratio[auto]:.2f}" \
            if k > 1 else ""
        print(f"{config:11s} {'x'.join(map(str, r['patch']))} batch {r['batch']:2d}  {r['params_M']:.1f}M params  "
              f"plain {med['plain']:.3f} s  DP hooks {med['hooks']:.3f} s  loop {med['loop']:.3f} s  "
              f"DP/plain hooks {ratio['hooks']:.2f} loop {ratio['loop']:.2f}  auto: {auto} {ratio[auto]:.2f} "
              f"(target <= {targets[config]}){per_case}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Personalisation benchmark on generated ``organs`` data: Dice and HD95 per site, five methods, several seeds.

    python benchmarks/personalization.py [--seeds 0 1 2] [--rounds 4] [--local-steps 10] [--finetune-steps 20]
                                         [--num-train 24] [--num-test 8] [--size 32] [--workdir DIR] [--quick] [--report]

Data: ``nnunet_fed make-data --scenario organs`` (3 sites, each its own organ shape family and tumour
appearance, plus scanner differences), 2D, ``--size`` pixels square, planned and preprocessed per site by
nnU-Net. The generator makes one case per patient, so its train (imagesTr) / test (imagesTs) split is a
patient-level split; nnU-Net's fold 0 takes 80 % of imagesTr for training. Test scores are on imagesTs only.
The data are the same for every seed; a seed changes initialisation, sampling and augmentation.

Methods (every site runs the same number of optimisation steps, rounds x local_steps + finetune_steps,
except plain FedAvg, which stops after the rounds):

=================  ====================================================================================
local only         each site alone: ``nnUNetTrainerFedAvgFT`` simulated with that single site (its rounds
                   are local training; the fine-tuning phase then continues on the same data)
FedAvg             the FedAvg global model (nnU-Net's UNet, every parameter averaged), no fine-tuning
FedAvg + FT        the same FedAvg run; each site then fine-tunes the whole network locally
                   (``finetune_steps``, plain nnU-Net loss)
FedOAP w/o PBL     ``nnUNetTrainerFedOAP`` rounds (DCA bottleneck, local query branch/Wq/adapters/heads),
                   fine-tuning with the plain loss, started from FedOAP's final round state, same RNG state
FedOAP             the same FedOAP rounds, fine-tuning with the perturbed boundary loss
=================  ====================================================================================

Fine-tuning: every parameter, fresh SGD momentum, poly learning rate from ``--finetune-lr`` to 0.

Metrics (computed here from nnU-Net's predictions, no TTA): per test case and label (organ, tumour),
Dice (a case where prediction and reference are both empty is left out, as nnU-Net's evaluation does) and
HD95 in mm: the 95th percentile of the symmetric surface distances (distances from each boundary pixel of
one mask to the other mask's boundary, both directions pooled; scipy Euclidean distance transform with the
image spacing). Both empty: left out; one empty: the image diagonal in mm. Table: per site, the mean over
labels and test cases, then mean +- standard deviation over seeds.

Every site is preprocessed with site 0's nnU-Net plans (moved to the other sites, as a federation needs one
target spacing and normalisation); the FedAvg global model is scored at each site with the plans in that site's
folder.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time

import numpy as np

FIRST_ID = 611
SITES = 3
LABELS = {1: "organ", 2: "tumour"}
METHODS = ("local only", "FedAvg", "FedAvg + FT", "FedOAP w/o PBL", "FedOAP")


# ----------------------------------------------------------------------------------------------- metrics
def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                          border_value=0)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """95th percentile of the symmetric boundary distances in mm (NaN if both masks are empty)."""
    from scipy import ndimage

    pred, ref = pred.astype(bool), ref.astype(bool)
    if not pred.any() and not ref.any():
        return float("nan")
    if not pred.any() or not ref.any():
        return float(np.sqrt(np.sum((np.array(pred.shape) * np.asarray(spacing)) ** 2)))
    sp, sr = _surface(pred), _surface(ref)
    to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return float(np.percentile(np.concatenate([to_ref[sp], to_pred[sr]]), 95))


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    p, r = pred.astype(bool), ref.astype(bool)
    denom = p.sum() + r.sum()
    return float("nan") if denom == 0 else float(2 * (p & r).sum() / denom)


def score_model(model_folder: str, raw_folder: str, device: str = "cpu") -> dict:
    """nnU-Net's predictor on every imagesTs case; Dice and HD95 per label, averaged over cases."""
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_fed.sites import ensure_trainer_path

    ensure_trainer_path()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device(device), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    with contextlib.redirect_stdout(io.StringIO()):
        predictor.initialize_from_trained_model_folder(model_folder, use_folds=(0,),
                                                       checkpoint_name="checkpoint_final.pth")
    io_ = SimpleITKIO()
    per_label = {name: {"dice": [], "hd95": []} for name in LABELS.values()}
    cases = sorted(f[:-len("_0000.nii.gz")] for f in os.listdir(os.path.join(raw_folder, "imagesTs")))
    for case in cases:
        img, props = io_.read_images([os.path.join(raw_folder, "imagesTs", f"{case}_0000.nii.gz")])
        ref, _ = io_.read_seg(os.path.join(raw_folder, "labelsTs", f"{case}.nii.gz"))
        with contextlib.redirect_stdout(io.StringIO()):
            seg = predictor.predict_single_npy_array(img, props, None, None, False)
        ref = ref[0]
        keep = [i for i, s in enumerate(ref.shape) if s > 1]  # 2D cases are read as (1, y, x)
        spacing = [props["spacing"][i] for i in keep]
        seg, ref = seg.reshape([seg.shape[i] for i in keep]), ref.reshape([ref.shape[i] for i in keep])
        for label, name in LABELS.items():
            per_label[name]["dice"].append(dice(seg == label, ref == label))
            per_label[name]["hd95"].append(hd95(seg == label, ref == label, spacing))
    out = {name: {m: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for m, v in d.items()}
           for name, d in per_label.items()}
    out["cases"] = len(cases)
    return out


# ----------------------------------------------------------------------------------------------- runs
def _simulate(results: str, datasets, trainer: str, args, seed: int, name: str) -> dict:
    from nnunet_fed.federation.simulation import SimulationConfig, simulate

    os.environ["nnUNet_results"] = results
    cfg = SimulationConfig(dataset_ids=list(datasets), configuration="2d", trainer=trainer, rounds=args.rounds,
                           local_steps=args.local_steps, val_steps=1, device=args.device, federation_name=name,
                           seed=seed, final_validation=False, fresh=True, progress=False,
                           trainer_options={"finetune_steps": str(args.finetune_steps),
                                            "finetune_lr": str(args.finetune_lr)})
    with contextlib.redirect_stdout(io.StringIO()):
        out = simulate(cfg)
    out["cfg"] = cfg
    return out


def _finetune_from(results: str, fed_cfg, source_trainer: str, trainer: str, args) -> dict:
    """Fine-tune with ``trainer`` from the final round state of a finished ``source_trainer`` federation."""
    import torch

    from nnunet_fed.federation.records import load_server_state
    from nnunet_fed.federation.simulation import (ROUND_STATE_DIR, SimulationConfig, _make_trainer,
                                                  global_model_folder, prepare)

    os.environ["nnUNet_results"] = results
    cfg = SimulationConfig(**{**{k: getattr(fed_cfg, k) for k in fed_cfg.__dataclass_fields__}, "trainer": trainer})
    cls = prepare(cfg)
    global_arrays = load_server_state(os.path.join(global_model_folder(fed_cfg), f"fold_{fed_cfg.fold}"))["global_arrays"]
    folders = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for name in cfg.site_names:
            t = _make_trainer(cfg, name, cls, torch.device(args.device))
            t.on_train_start()
            source = os.path.join(os.environ["nnUNet_results"], name,
                                  f"{source_trainer}__{cfg.plans_identifier}__{cfg.configuration}",
                                  f"fold_{cfg.fold}", ROUND_STATE_DIR, f"round_{cfg.rounds - 1:04d}.pth")
            t.load_checkpoint(source)  # weights, optimizer, logger and RNG state of the source's last round
            t.finish_federation(global_arrays)
            t.on_train_end()
            folders[name] = t.output_folder
    return folders


def _global_model_at_site(global_folder: str, site_folder_base: str, dest: str) -> str:
    """The global checkpoint with a site's own plans/dataset.json (so it is scored with the site's preprocessing)."""
    os.makedirs(os.path.join(dest, "fold_0"), exist_ok=True)
    for f in ("plans.json", "dataset.json"):
        shutil.copyfile(os.path.join(site_folder_base, f), os.path.join(dest, f))
    shutil.copyfile(os.path.join(global_folder, "fold_0", "checkpoint_final.pth"),
                    os.path.join(dest, "fold_0", "checkpoint_final.pth"))
    return dest


def run_seed(seed: int, names: list[str], args, work: str) -> dict:
    root = os.path.join(work, f"results_seed{seed}")
    if os.path.isdir(root):
        shutil.rmtree(root)
    models: dict[str, dict[str, str]] = {m: {} for m in METHODS}  # method -> site -> model folder
    seconds = {}

    t0 = time.time()
    for k, name in enumerate(names):
        out = _simulate(os.path.join(root, "local"), [name], "nnUNetTrainerFedAvgFT", args, seed,
                        f"DatasetLocal_{FIRST_ID + k}")
        models["local only"][name] = os.path.dirname(out["site_folders"][name])
    seconds["local only"] = time.time() - t0

    t0 = time.time()
    out = _simulate(os.path.join(root, "fedavg"), names, "nnUNetTrainerFedAvgFT", args, seed, "DatasetFed_avg")
    for name in names:
        base = os.path.dirname(out["site_folders"][name])
        models["FedAvg + FT"][name] = base
        models["FedAvg"][name] = _global_model_at_site(out["global_model_folder"], base,
                                                       os.path.join(root, "fedavg_global_at_site", name))
    seconds["FedAvg + FT"] = time.time() - t0

    t0 = time.time()
    out = _simulate(os.path.join(root, "fedoap"), names, "nnUNetTrainerFedOAP", args, seed, "DatasetFed_oap")
    models["FedOAP"] = {n: os.path.dirname(f) for n, f in out["site_folders"].items()}
    seconds["FedOAP"] = time.time() - t0
    t0 = time.time()
    folders = _finetune_from(os.path.join(root, "fedoap"), out["cfg"], "nnUNetTrainerFedOAP",
                             "nnUNetTrainerFedOAPNoPBL", args)
    models["FedOAP w/o PBL"] = {n: os.path.dirname(f) for n, f in folders.items()}
    seconds["FedOAP w/o PBL (fine-tuning only)"] = time.time() - t0

    t0 = time.time()
    scores = {m: {n: score_model(models[m][n], os.path.join(os.environ["nnUNet_raw"], n), args.device)
                  for n in names} for m in METHODS}
    seconds["scoring"] = time.time() - t0
    return {"seed": seed, "scores": scores, "seconds": seconds}


# ----------------------------------------------------------------------------------------------- report
def _site_value(score: dict, metric: str) -> float:
    return float(np.nanmean([score[label][metric] for label in LABELS.values()]))


def _fmt(values, digits) -> str:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def tables(runs: list[dict], names: list[str]) -> str:
    short = [n.split("_", 1)[1] for n in names]
    lines = []
    for metric, title, digits in (("dice", "Dice (mean of organ and tumour, higher is better)", 3),
                                  ("hd95", "HD95 in mm (mean of organ and tumour, lower is better)", 2)):
        lines += [f"**{title}**", "",
                  "| method | " + " | ".join(short) + " | mean |",
                  "|---" * (len(names) + 2) + "|"]
        for m in METHODS:
            per_site = [[_site_value(r["scores"][m][n], metric) for r in runs] for n in names]
            mean = [float(np.mean([ps[i] for ps in per_site])) for i in range(len(runs))]
            lines.append(f"| {m} | " + " | ".join(_fmt(v, digits) for v in per_site) + f" | {_fmt(mean, digits)} |")
        lines.append("")
    lines += ["**Per label (mean over sites and seeds): Dice organ / tumour, HD95 organ / tumour (mm)**", "",
              "| method | Dice organ | Dice tumour | HD95 organ | HD95 tumour |", "|---|---|---|---|---|"]
    for m in METHODS:
        cells = []
        for metric, digits in (("dice", 3), ("hd95", 2)):
            for label in LABELS.values():
                cells.append(f"{np.nanmean([r['scores'][m][n][label][metric] for r in runs for n in names]):.{digits}f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/nnunet_fed_personalization")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--finetune-steps", type=int, default=20)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--num-train", type=int, default=24)
    p.add_argument("--num-test", type=int, default=8)
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 rounds x 3 steps, 3 fine-tuning steps")
    p.add_argument("--data-only", action="store_true", help="write and plan the data, then stop")
    p.add_argument("--report", action="store_true",
                   help="print the tables of every personalization_results_*.json in --workdir (runs of several "
                        "processes, e.g. one per seed) and stop")
    args = p.parse_args(argv)
    if args.report:
        return report(os.path.abspath(args.workdir))
    if args.quick:
        args.seeds, args.rounds, args.local_steps, args.finetune_steps = args.seeds[:1], 2, 3, 3
        args.num_train, args.num_test = 10, 3
    t_start = time.time()
    work = os.path.abspath(args.workdir)
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        os.environ[var] = os.path.join(work, var)
        os.makedirs(os.environ[var], exist_ok=True)

    from nnunet_fed.data.synthetic import make_federated_datasets
    from nnunet_fed.planning import plan_and_preprocess_sites

    spec = {"size": args.size, "num_train": args.num_train, "num_test": args.num_test, "seed": args.data_seed}
    spec_file = os.path.join(work, "data_spec.json")
    names = [f"Dataset{FIRST_ID + k:03d}_OrgansSite{k}" for k in range(SITES)]
    if not os.path.isfile(spec_file) or json.load(open(spec_file)) != spec:
        print(f"writing {SITES} 'organs' sites ({args.size}x{args.size}, {args.num_train} train / "
              f"{args.num_test} test cases each) and planning them with nnU-Net", flush=True)
        names = make_federated_datasets(first_id=FIRST_ID, num_sites=SITES, scenario="organs", dim=2,
                                        num_train=args.num_train, num_test=args.num_test, seed=args.data_seed,
                                        image_size=(args.size, args.size), overwrite=True)
        for n in names:
            shutil.rmtree(os.path.join(os.environ["nnUNet_preprocessed"], n), ignore_errors=True)
        plan_and_preprocess_sites([FIRST_ID + k for k in range(SITES)], configurations=("2d",))
        with open(spec_file, "w") as f:
            json.dump(spec, f)
    # training: augmentation in-process (reproducible, no worker start-up; nnU-Net's planner needs it >= 1)
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    print(f"data ready ({time.time() - t_start:.0f} s); per site and method: {args.rounds} rounds x "
          f"{args.local_steps} steps + {args.finetune_steps} fine-tuning steps (lr {args.finetune_lr})", flush=True)

    if args.data_only:
        return 0
    runs = []
    results_file = os.path.join(work, f"personalization_results_seed{'_'.join(map(str, args.seeds))}.json")
    for seed in args.seeds:
        t0 = time.time()
        runs.append(run_seed(seed, names, args, work))
        print(f"seed {seed}: {time.time() - t0:.0f} s "
              f"({', '.join(f'{k} {v:.0f} s' for k, v in runs[-1]['seconds'].items())})", flush=True)
        with open(results_file, "w") as f:
            json.dump({"args": vars(args), "sites": names, "runs": runs}, f, indent=1)
    print()
    print(_describe(vars(args), len(runs)))
    print(tables(runs, names))
    print(f"\ntotal {time.time() - t_start:.0f} s; results: {results_file}")
    return 0


def _describe(a: dict, num_runs: int) -> str:
    return (f"organs data ({a['size']}x{a['size']}), {num_runs} seed(s), {a['rounds']} rounds x {a['local_steps']} "
            f"local steps, {a['finetune_steps']} fine-tuning steps (lr {a['finetune_lr']}), {a['num_train']} training "
            f"cases per site (80 % used: nnU-Net fold 0), {a['num_test']} test patients per site")


def report(work: str) -> int:
    import glob

    runs, names, args = {}, None, None
    for path in sorted(glob.glob(os.path.join(work, "personalization_results_*.json"))):
        with open(path) as f:
            data = json.load(f)
        names, args = data["sites"], data["args"]
        for r in data["runs"]:
            runs[r["seed"]] = r
    if not runs:
        print(f"no personalization_results_*.json in {work}")
        return 1
    ordered = [runs[s] for s in sorted(runs)]
    print(_describe(args, len(ordered)) + f"; seeds {sorted(runs)}")
    print(tables(ordered, names))
    for r in ordered:
        print(f"seed {r['seed']}: " + ", ".join(f"{k} {v:.0f} s" for k, v in r["seconds"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

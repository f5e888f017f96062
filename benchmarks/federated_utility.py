#!/usr/bin/env python
"""Federated utility benchmark: does a site get a better model by federating than by training alone?

    python benchmarks/federated_utility.py [--scenarios shift organs] [--inverted-sites 2] [--seeds 0 1 2]
                                           [--rounds 30] [--local-steps 10] [--arms ...] [--workdir DIR] [--report]

Data: 3 generated sites per scenario (``nnunet_fed make-data``; ``shift``: same anatomy, different scanners;
``organs``: each site its own organ shape and tumour appearance), 2D, ``--size`` pixels square,
``--inverted-sites`` with inverted contrast (bright tumour dark, as between two MR sequences). Every site is
preprocessed with site 0's nnU-Net plans. Test scores: Dice per site on its held-out imagesTs (nnU-Net's
predictor, no mirroring), mean of organ and tumour.

Arms, each with ``rounds x local_steps`` optimisation steps per site (FedOAP: rounds plus its local fine-tuning,
the rounds shortened so that the total is the same), ``nnUNet_n_proc_DA=0`` (augmentation in-process, so a run is
reproducible from its seed):

==================================  =====================================================================
pooled nnU-Net                      one model on the union of the sites' training cases, ``sites x rounds x
                                    local_steps`` steps (the federation's total), nnU-Net's optimizer untouched
local only                          each site alone, ``rounds x local_steps`` steps
FedAvg, long rounds (before)        FedAvg at the schedule the demo had: ``--long-rounds`` times fewer rounds of as
                                    many times more steps (same total), momentum kept
FedAvg, long rounds, momentum reset the same with the momentum of the shared parameters reset at every round start
FedAvg                              FedAvg at ``rounds x local_steps``, momentum kept (the defaults now)
FedAvg, momentum reset              the same with the momentum reset at every round start
FedProx                             FedAvg + proximal term (``--fedprox-mu``)
FedAvgM                             Flower's FedAvgM (``--server-momentum``, ``--server-lr``) on the round means
FedAdam                             Flower's FedAdam on the round means (``--server-eta``, ``--server-tau``)
FedBN                               normalisation layers local (a personal model per site)
FedPer                              segmentation heads local (a personal model per site)
Ditto                               each round half the steps on the global model (FedAvg), half on a personal
                                    model pulled towards it (``--ditto-lambda``); scored: the personal models
FedOAP                              decoupled cross-attention, local query/adapters/heads; ``--finetune-rounds``
                                    rounds' steps go to its local fine-tuning with PBL instead
==================================  =====================================================================

Finished arms are kept (``<workdir>/runs/<scenario>/seed<k>/<arm>.json``): a run killed half-way continues with the
next arm; ``--report`` prints the tables from what is there. Every federated arm runs with ``simulate --diagnose``:
the kept records hold each round's pseudo-Dice per site, update norms and cosines between site updates, and
``--report`` prints them per arm (first seed).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from personalization import _global_model_at_site, score_model  # noqa: E402  (same benchmark folder)

FIRST_ID = {"shift": 711, "organs": 721}
SITES = 3
ARMS = ("pooled nnU-Net", "local only", "FedAvg, long rounds (before)", "FedAvg, long rounds, momentum reset",
        "FedAvg", "FedAvg, momentum reset", "FedProx", "FedAvgM", "FedAdam", "FedBN", "FedPer", "Ditto", "FedOAP")


def arm_settings(arm: str, args) -> dict:
    """trainer, options, strategy and schedule of an arm (see the module docstring)."""
    base = {"trainer": "nnUNetTrainerFedAvg", "options": {}, "strategy": "fedavg", "strategy_options": {},
            "fedprox_mu": 0.0, "rounds": args.rounds, "local_steps": args.local_steps}
    # the schedule before this benchmark: --long-rounds times fewer rounds of as many times more steps
    long = {"rounds": max(1, args.rounds // args.long_rounds), "local_steps": args.local_steps * args.long_rounds}
    reset = {"local_momentum": "reset"}
    return {
        "pooled nnU-Net": {**base, "local_steps": args.local_steps * SITES},
        "local only": base,
        "FedAvg, long rounds (before)": {**base, "options": {"local_momentum": "keep"}, **long},
        "FedAvg, long rounds, momentum reset": {**base, "options": reset, **long},
        "FedAvg": base,
        "FedAvg, momentum reset": {**base, "options": reset},
        "FedProx": {**base, "fedprox_mu": args.fedprox_mu},
        "FedAvgM": {**base, "strategy": "fedavgm", "strategy_options": {"server_momentum": args.server_momentum,
                                                                        "server_learning_rate": args.server_lr}},
        "FedAdam": {**base, "strategy": "fedadam", "strategy_options": {"eta": args.server_eta,
                                                                        "tau": args.server_tau}},
        "FedBN": {**base, "trainer": "nnUNetTrainerFedBN"},
        "FedPer": {**base, "trainer": "nnUNetTrainerFedPer"},
        "Ditto": {**base, "trainer": "nnUNetTrainerDitto", "personal": True,
                  "local_steps": max(1, args.local_steps // 2),  # + as many personal steps: the same total
                  "options": {"ditto_steps": max(1, args.local_steps - args.local_steps // 2),
                              "ditto_lambda": args.ditto_lambda}},
        "FedOAP": {**base, "trainer": "nnUNetTrainerFedOAP",
                   "options": {"finetune_steps": args.local_steps * args.finetune_rounds},
                   "rounds": args.rounds - args.finetune_rounds},
    }[arm]


# ----------------------------------------------------------------------------------------------- data
def make_data(scenario: str, args, work: str) -> tuple[list[str], str]:
    """The sites and the pooled dataset of one scenario, planned and preprocessed (once)."""
    from nnunet_fed.data.synthetic import make_federated_datasets
    from nnunet_fed.demo import write_pooled_dataset
    from nnunet_fed.planning import plan_and_preprocess_sites

    first = FIRST_ID[scenario]
    spec = {"size": args.size, "num_train": args.num_train, "num_test": args.num_test, "seed": args.data_seed,
            "inverted_sites": sorted(args.inverted_sites)}
    spec_file = os.path.join(work, f"data_{scenario}.json")
    raw = os.environ["nnUNet_raw"]
    pooled = f"Dataset{first + SITES:03d}_{scenario.capitalize()}Pooled"
    if os.path.isfile(spec_file) and json.load(open(spec_file))["spec"] == spec:
        return json.load(open(spec_file))["sites"], pooled
    names = make_federated_datasets(first_id=first, num_sites=SITES, scenario=scenario, dim=2,
                                    num_train=args.num_train, num_test=args.num_test, seed=args.data_seed,
                                    image_size=(args.size, args.size), overwrite=True,
                                    inverted_sites=args.inverted_sites)
    write_pooled_dataset(names, pooled, raw)
    for n in names + [pooled]:
        shutil.rmtree(os.path.join(os.environ["nnUNet_preprocessed"], n), ignore_errors=True)
    plan_and_preprocess_sites([first + k for k in range(SITES + 1)], configurations=("2d",))
    json.dump({"spec": spec, "sites": names}, open(spec_file, "w"))
    return names, pooled


# ----------------------------------------------------------------------------------------------- runs
def _simulate(results: str, datasets, settings: dict, args, seed: int, name: str) -> dict:
    from nnunet_fed.federation.simulation import SimulationConfig, simulate

    os.environ["nnUNet_results"] = results
    cfg = SimulationConfig(dataset_ids=list(datasets), configuration="2d", trainer=settings["trainer"],
                           rounds=settings["rounds"], local_steps=settings["local_steps"], val_steps=1,
                           device=args.device, federation_name=name, seed=seed, final_validation=False,
                           fresh=True, progress=False, fedprox_mu=settings["fedprox_mu"],
                           trainer_options={k: str(v) for k, v in settings["options"].items()},
                           strategy=settings["strategy"],
                           strategy_options={k: str(v) for k, v in settings["strategy_options"].items()},
                           diagnose=len(datasets) > 1)
    with contextlib.redirect_stdout(io.StringIO()):
        return simulate(cfg)


def run_arm(arm: str, scenario: str, names: list[str], pooled: str, seed: int, args, work: str) -> dict:
    """Train one arm and score it at every site; returns {site: dice}, the seconds and the round records."""
    settings = arm_settings(arm, args)
    root = os.path.join(work, "results", scenario, f"seed{seed}", arm.replace(" ", "_").replace("(", "").replace(")", ""))
    shutil.rmtree(root, ignore_errors=True)
    raw = os.environ["nnUNet_raw"]
    t0 = time.time()
    models, metrics = {}, []
    if arm in ("local only", "pooled nnU-Net"):
        for k, n in enumerate(names if arm == "local only" else [pooled]):
            out = _simulate(root, [n], settings, args, seed, f"DatasetLocal_{k}")
            models[n] = os.path.dirname(out["site_folders"][n])
        if arm == "pooled nnU-Net":
            models = {n: models[pooled] for n in names}
    else:
        out = _simulate(root, names, settings, args, seed, "DatasetFed_utility")
        metrics = out["metrics"]
        for n in names:
            base = os.path.dirname(out["site_folders"][n])
            personal = out["global_checkpoint"] is None or settings.get("personal")
            models[n] = base if personal else _global_model_at_site(
                out["global_model_folder"], base, os.path.join(root, "global_at_site", n))
    seconds = time.time() - t0
    dice = {}
    for n in names:
        s = score_model(models[n], os.path.join(raw, n), args.device)
        dice[n] = float(np.nanmean([s["organ"]["dice"], s["tumour"]["dice"]]))
    shutil.rmtree(root, ignore_errors=True)  # checkpoints are not needed once scored
    return {"arm": arm, "scenario": scenario, "seed": seed, "dice": dice, "seconds": seconds,
            "pseudo_dice": [{s: m.get("pseudo_dice") for s, m in r["sites"].items()} for r in metrics],
            "update_geometry": [r.get("update_geometry") for r in metrics],
            "settings": settings}


# ----------------------------------------------------------------------------------------------- report
def _fmt(values) -> str:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "n/a"
    return f"{np.mean(values):.3f}" if len(values) == 1 else f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def report(work: str) -> str:
    lines = []
    for scenario_dir in sorted(glob.glob(os.path.join(work, "runs", "*"))):
        scenario = os.path.basename(scenario_dir)
        runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(scenario_dir, "seed*", "*.json")))]
        if not runs:
            continue
        sites = sorted(runs[0]["dice"])
        seeds = sorted({r["seed"] for r in runs})
        lines += [f"**{scenario}** (Dice on held-out cases, mean of organ and tumour; mean ± std over seeds "
                  f"{seeds})", "",
                  "| arm | " + " | ".join(s.split("_", 1)[1] for s in sites) + " | mean | worst site | seeds |",
                  "|---" * (len(sites) + 4) + "|"]
        for arm in ARMS:
            rs = [r for r in runs if r["arm"] == arm]
            if not rs:
                continue
            per_site = [[r["dice"][s] for r in rs] for s in sites]
            mean = [float(np.mean([r["dice"][s] for s in sites])) for r in rs]
            worst = [float(min(r["dice"][s] for s in sites)) for r in rs]
            lines.append(f"| {arm} | " + " | ".join(_fmt(v) for v in per_site) +
                         f" | {_fmt(mean)} | {_fmt(worst)} | {len(rs)} |")
        lines.append("")
        lines += diagnosis(runs, sites)
    return "\n".join(lines)


def diagnosis(runs: list[dict], sites: list[str]) -> list[str]:
    """Every few rounds (first seed): pseudo-Dice per site (one validation batch: a batch without tumour scores
    about 0.45), update norm per site, cosine between the site updates."""
    short = [s.split("_", 1)[1] for s in sites]
    seed = min(r["seed"] for r in runs)
    lines = [f"Diagnosis (seed {seed}); per round: pseudo-Dice per site | update norm per site | cosine "
             f"{short[0]}-{short[1]}, {short[0]}-{short[2]}, {short[1]}-{short[2]} (all parameters; first convolution)",
             ""]
    for arm in ARMS:
        run = next((r for r in runs if r["arm"] == arm and r["seed"] == seed and r.get("update_geometry")), None)
        if run is None:
            continue
        lines.append(f"- {arm}:")
        n = len(run["update_geometry"])
        for k, (pd, geo) in enumerate(zip(run["pseudo_dice"], run["update_geometry"])):
            if not geo or (k % max(1, n // 6) and k != n - 1):  # about 6 rounds per arm, the last included
                continue
            pairs = [f"{a}|{b}" for i, a in enumerate(sites) for b in sites[i + 1:]]
            lines.append(
                f"  round {k + 1}: " + " ".join(f"{pd.get(s, float('nan')):.2f}" for s in sites) + " | " +
                " ".join(f"{geo['update_norm'].get(s, float('nan')):.2f}" for s in sites) + " | " +
                " ".join(f"{geo['cosine'].get(p, float('nan')):+.2f}" for p in pairs) + "; " +
                " ".join(f"{geo['first_conv_cosine'].get(p, float('nan')):+.2f}" for p in pairs))
    return lines + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/nnunet_fed_utility")
    p.add_argument("--scenarios", nargs="+", default=["shift", "organs"], choices=["shift", "organs"])
    p.add_argument("--inverted-sites", type=int, nargs="*", default=[2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--finetune-rounds", type=int, default=6,
                   help="FedOAP: rounds given to its local fine-tuning instead (same total steps)")
    p.add_argument("--long-rounds", type=int, default=5,
                   help="the long-round arms: this many times fewer rounds, as many times more steps per round")
    p.add_argument("--fedprox-mu", type=float, default=0.01)
    p.add_argument("--ditto-lambda", type=float, default=0.1)
    p.add_argument("--server-momentum", type=float, default=0.5)
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--server-eta", type=float, default=1e-3)
    p.add_argument("--server-tau", type=float, default=1e-3)
    p.add_argument("--num-train", type=int, default=40)
    p.add_argument("--num-test", type=int, default=15)
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--redo", action="store_true", help="train arms again even if their result is kept")
    p.add_argument("--report", action="store_true", help="print the tables of the kept runs and stop")
    args = p.parse_args(argv)
    work = os.path.abspath(args.workdir)
    if args.report:
        print(report(work))
        return 0
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        os.environ[var] = os.path.join(work, var)
        os.makedirs(os.environ[var], exist_ok=True)
    from nnunet_fed.sites import ensure_trainer_path

    ensure_trainer_path()
    t_start = time.time()
    data = {scenario: make_data(scenario, args, work) for scenario in args.scenarios}
    os.environ.setdefault("nnUNet_n_proc_DA", "0")  # augmentation in-process: no worker start-up per run
    for scenario in args.scenarios:
        names, pooled = data[scenario]
        for seed in args.seeds:
            for arm in args.arms:
                out = os.path.join(work, "runs", scenario, f"seed{seed}", arm.replace(" ", "_") + ".json")
                if os.path.isfile(out) and not args.redo:
                    continue
                result = run_arm(arm, scenario, names, pooled, seed, args, work)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                json.dump({**result, "args": vars(args)}, open(out, "w"), indent=1)
                print(f"{scenario} seed {seed} {arm}: mean Dice {np.mean(list(result['dice'].values())):.3f} "
                      f"({', '.join(f'{v:.3f}' for v in result['dice'].values())}) in {result['seconds']:.0f} s",
                      flush=True)
    print(f"\ntotal {time.time() - t_start:.0f} s\n")
    print(report(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())

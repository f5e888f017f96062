"""Privacy/utility benchmark on generated ``shift`` data (3 sites of 1,000 training cases, 2d): Dice per site on
held-out cases for non-private FedAvg, fixed-clip DP-FL (nnUNetTrainerFedDP) and ADP-FL (nnUNetTrainerFedADP) at
epsilon 1, 2, 4 and 8 (delta 1e-5), mean and std over seeds, as a table and a PNG of Dice against epsilon
(``<workdir>/privacy_utility.png``). Each run is ``nnunet_fed simulate``; the global model predicts every
site's imagesTs with nnU-Net's predictor and nnU-Net's evaluation scores them against labelsTs.

    python3 benchmarks/privacy_utility.py                 # the README table (10 rounds x 8 steps, batch 256)
    python3 benchmarks/privacy_utility.py --epsilons 8 --seeds 1   # a part of it (about 35 min on 2 CPU cores)
    python3 benchmarks/privacy_utility.py --quick         # smoke run: tiny sites, 1 seed, a minute or two
    python3 benchmarks/privacy_utility.py --device cuda --num-train 600 --rounds 20 --local-steps 40
    python3 benchmarks/privacy_utility.py --workdir A --methods nnUNetTrainerFedAvg nnUNetTrainerFedDP &
    python3 benchmarks/privacy_utility.py --workdir B --methods nnUNetTrainerFedADP &   # in parallel, then
    python3 benchmarks/privacy_utility.py --report A B                                   # one table
    python3 benchmarks/privacy_utility.py --methods nnUNetTrainerFedDP --variant automatic -o clipping=automatic
                                                          # a lever: its runs kept apart, its own table and plot
    python3 benchmarks/privacy_utility.py --methods nnUNetTrainerFedADP --variant fedavgm --strategy fedavgm
        --strategy-option server_momentum=0.9             # (one line) a server-side lever: no privacy cost

nnU-Net plans site 0 and its plans are moved to the other sites (one target spacing and normalisation, as a
federation needs); the DP trainers are told the plans are public (``public_plans``): the epsilon in the table
covers each site's noisy case count and its training steps, not the planning (with ``--federated-planning
--dp-epsilon`` it would cover that too).

Every finished run is appended to ``<workdir>/runs.jsonl`` and kept: the same command run again trains only the
runs that have not finished (an interrupted one, or more ``--seeds``), unless ``--rerun``. The table is built
from the runs found on disk (predictions scored with nnU-Net's evaluation, epsilon from the run's round metrics)
and written with every number to ``<workdir>/privacy_utility.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time

import numpy as np

FIRST_ID = 301
RUNS_FILE = "runs.jsonl"
SITES = 3
METHODS = [  # (label, trainer, options builder)
    ("FedAvg (non-private)", "nnUNetTrainerFedAvg", None),
    ("DP-FL fixed clip", "nnUNetTrainerFedDP", "eps"),
    ("ADP-FL", "nnUNetTrainerFedADP", "eps"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="privacy_utility_bench")
    p.add_argument("--num-train", type=int, default=1000, help="training cases per site")
    p.add_argument("--num-test", type=int, default=20, help="held-out cases per site")
    p.add_argument("--size", type=int, default=32, help="image side (pixels)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--expected-batch-size", type=int, default=None,
                   help="DP trainers: expected logical (Poisson) batch, accumulated over nnU-Net's physical batches "
                        "(default: the trainers' own rule, which picks 256 on these sites: only target_epsilon is "
                        "set, as a user would)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. SEEDS-1 (the table covers these)")
    p.add_argument("--only-seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="train only these seeds (e.g. 1 2, when seed 0 was trained elsewhere); the table still covers "
                        "every finished seed below --seeds")
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--device", default="cpu")
    p.add_argument("-o", "--option", action="append", default=[], metavar="NAME=VALUE",
                   help="extra option for the DP trainers (e.g. max_grad_norm=1.0)")
    p.add_argument("--methods", nargs="+", default=None, help="subset of trainers to run")
    p.add_argument("--strategy", default="fedavg",
                   help="the server's rule for the DP runs of a --variant (a lever: e.g. fedavgm, fedadam; "
                        "post-processing of the noisy updates, no privacy cost)")
    p.add_argument("--strategy-option", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting of --strategy (e.g. server_momentum=0.9)")
    p.add_argument("--variant", default="",
                   help="a name for the DP runs of this command's -o options (a lever: e.g. --variant mult4 -o "
                        "augmentation_multiplicity=4), kept apart from the runs without it")
    p.add_argument("--rerun", action="store_true",
                   help="train every run again (by default a run already finished in --workdir is kept)")
    p.add_argument("--quick", action="store_true", help="smoke run: 40 cases per site, 1 seed, 2 rounds x 3 steps")
    p.add_argument("--report", nargs="+", metavar="WORKDIR", default=None,
                   help="no training: the table of the finished runs in these workdirs (same settings; e.g. several "
                        "processes, each running some --methods in its own workdir)")
    args = p.parse_args(argv)
    if (args.strategy.lower() != "fedavg" or args.strategy_option) and not args.variant:
        p.error("--strategy and --strategy-option are levers: name them with --variant, so their runs are kept apart")
    if args.quick:
        args.num_train, args.num_test, args.rounds, args.local_steps, args.seeds = 40, 5, 2, 3, 1
        args.expected_batch_size = 4
    if args.only_seeds is not None and not all(0 <= s < args.seeds for s in args.only_seeds):
        p.error(f"--only-seeds must lie in 0 .. {args.seeds - 1} (--seeds {args.seeds})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    if args.report:
        report(args.report, args)
        return 0
    from nnunet_fed.cli import parse_options
    from nnunet_fed.demo import _set_nnunet_folders
    from nnunet_fed.sites import find_trainer

    folders = _set_nnunet_folders(args.workdir)
    os.environ.setdefault("nnUNet_n_proc_DA", "2")
    methods = [m for m in METHODS if args.methods is None or m[1] in args.methods]
    for _, trainer, _ in methods:
        find_trainer(trainer)  # a missing trainer fails here, before any work
    from nnunet_fed.data.synthetic import make_federated_datasets
    from nnunet_fed.federation.simulation import SimulationConfig, simulate
    from nnunet_fed.planning import plan_and_preprocess_sites

    names = make_federated_datasets(first_id=FIRST_ID, num_sites=SITES, scenario="shift", dim=2,
                                    num_train=args.num_train, num_test=args.num_test, seed=0,
                                    image_size=(args.size, args.size), overwrite=True)
    print(f"{SITES} sites x {args.num_train} training cases ({args.size}x{args.size}), planning and preprocessing",
          flush=True)
    n_proc = os.environ["nnUNet_n_proc_DA"]
    os.environ["nnUNet_n_proc_DA"] = str(max(1, int(n_proc)))  # nnU-Net's planner fails with 0
    plan_and_preprocess_sites([FIRST_ID + k for k in range(SITES)], configurations=("2d",))
    os.environ["nnUNet_n_proc_DA"] = n_proc

    for label, trainer, kind in methods:
        for eps in ([None] if kind is None else args.epsilons):
            for seed in (range(args.seeds) if args.only_seeds is None else args.only_seeds):
                # nnU-Net's plans of site 0 (moved to every site) are declared public, as in every row of the
                # table, so the epsilon covers the case count and the training (not the planning)
                options = {} if eps is None else {"target_epsilon": str(eps), "target_delta": str(args.delta),
                                                  "public_plans": "true", **parse_options(args.option)}
                if eps is not None and args.expected_batch_size is not None:
                    options["expected_batch_size"] = str(args.expected_batch_size)
                variant = args.variant if eps is not None else ""  # levers change the DP trainers only
                fed = run_name(trainer, eps, seed, variant)
                if not args.rerun and run_finished(args.workdir, trainer, eps, seed, names, variant):
                    print(f"{label:22s} eps={eps if eps is not None else '-':>4} seed {seed}: finished earlier, "
                          f"kept (--rerun to train it again)", flush=True)
                    continue
                t0 = time.time()
                server = {"strategy": args.strategy, "strategy_options": parse_options(args.strategy_option)} \
                    if eps is not None else {}
                out = simulate(SimulationConfig(dataset_ids=names, configuration="2d", trainer=trainer,
                                                rounds=args.rounds, local_steps=args.local_steps, val_steps=1,
                                                device=args.device, federation_name=fed, seed=1000 + seed,
                                                fresh=True, final_validation=False, progress=False,
                                                trainer_options=options, **server))
                train_s = time.time() - t0
                with contextlib.redirect_stdout(io.StringIO()):
                    predict_sites(out["global_model_folder"], names, folders["nnUNet_raw"],
                                  os.path.join(args.workdir, "predictions", fed), args.device)
                if eps is not None:  # each site's ledger, kept with the run (the trainer's next run rewrites it)
                    keep_ledgers(out["global_model_folder"], ledger_dir(args.workdir, fed))
                run = score_run(args.workdir, label, trainer, eps, seed, names, variant)
                run["train_seconds"] = train_s
                run["options"], run["server"] = options, server or {"strategy": "fedavg"}
                with open(os.path.join(args.workdir, RUNS_FILE), "a") as f:
                    f.write(json.dumps(run) + "\n")
                print(f"{label:22s} eps={eps if eps is not None else '-':>4} seed {seed}: mean Dice "
                      f"{run['mean_dice']:.3f} (sites {', '.join(f'{v:.3f}' for v in run['dice'].values())}), "
                      f"epsilon spent {run['epsilon_spent']} (dp_accounting: {run['epsilon_dp_accounting']}), "
                      f"{train_s:.0f} s", flush=True)
    report([args.workdir], args)
    print(f"total {time.time() - t_start:.0f} s")
    return 0


def run_name(trainer: str, eps, seed: int, variant: str = "") -> str:
    return f"DatasetFed_pu_{trainer}_{'np' if eps is None else f'e{eps:g}'}_s{seed}{f'_{variant}' if variant else ''}"


def predict_sites(model_folder: str, names: list[str], raw: str, out_root: str, device: str) -> None:
    """The global model predicts every site's imagesTs (nnU-Net's predictor)."""
    from nnunet_fed.evaluation import predict_folder

    for n in names:
        predict_folder(model_folder, os.path.join(raw, n, "imagesTs"), os.path.join(out_root, n), fold=0,
                       device=device, use_mirroring=False)


def _run_paths(workdir: str, trainer: str, eps, seed: int, variant: str = "") -> tuple[str, str, str]:
    """(model folder, its round metrics file, the run's predictions folder)."""
    fed = run_name(trainer, eps, seed, variant)
    model = os.path.join(workdir, "nnUNet_results", fed, f"{trainer}__nnUNetPlans__2d")
    return model, os.path.join(model, "fold_0", "federation_metrics.jsonl"), os.path.join(workdir, "predictions", fed)


def run_finished(workdir: str, trainer: str, eps, seed: int, names: list[str], variant: str = "") -> bool:
    """The run trained (round metrics written) and predicted every site's held-out cases."""
    _, metrics_file, predictions = _run_paths(workdir, trainer, eps, seed, variant)
    if not os.path.isfile(metrics_file):
        return False
    for n in names:
        pred = os.path.join(predictions, n)
        refs = os.listdir(os.path.join(workdir, "nnUNet_raw", n, "labelsTs"))
        if not os.path.isdir(pred) or not set(refs) <= set(os.listdir(pred)):
            return False
    return True


def ledger_dir(workdir: str, fed: str) -> str:
    return os.path.join(workdir, "ledgers", fed)


def keep_ledgers(model_folder: str, dest: str) -> None:
    """Copy the privacy ledger of every site of the run just finished (``ledger.find_ledgers`` on the run's
    global model folder) to ``dest`` as ``<site>.json``."""
    import shutil

    from nnunet_fed.privacy.ledger import PrivacyLedger, find_ledgers

    os.makedirs(dest, exist_ok=True)
    for path in find_ledgers(model_folder):
        shutil.copyfile(path, os.path.join(dest, f"{PrivacyLedger.load(path).site}.json"))


def independent_epsilons(folder: str, names: list[str]) -> list[float]:
    """Each kept ledger's total recomputed with Google's dp_accounting (``ledger.independent_epsilon``), an
    accountant independent of the Opacus one that calibrated the noise; empty when none was kept."""
    from nnunet_fed.privacy.ledger import PrivacyLedger, independent_epsilon

    out = []
    for n in names:
        path = os.path.join(folder, f"{n}.json")
        if os.path.isfile(path):
            check = independent_epsilon(PrivacyLedger.load(path))
            if check is not None:
                out.append(check)
    return out


def score_run(workdir: str, label: str, trainer: str, eps, seed: int, names: list[str],
              variant: str = "") -> dict | None:
    """A finished run's Dice per site (nnU-Net's evaluation of its predictions against labelsTs, mean of organ
    and tumour) and the largest epsilon any site spent (the run's round metrics); None if it did not finish."""
    from nnunet_fed.evaluation import dice_per_label, evaluate_folder

    if not run_finished(workdir, trainer, eps, seed, names, variant):
        return None
    model, metrics_file, predictions = _run_paths(workdir, trainer, eps, seed, variant)
    raw = os.path.join(workdir, "nnUNet_raw")
    dice = {}
    for n in names:
        pred = os.path.join(predictions, n)
        with contextlib.redirect_stdout(io.StringIO()):
            d = dice_per_label(evaluate_folder(os.path.join(raw, n, "labelsTs"), pred, model, num_processes=1))
        dice[n] = float(np.nanmean([d[1], d[2]]))
    with open(metrics_file) as f:
        last = [json.loads(line) for line in f if line.strip()][-1]
    spent = [m["epsilon"] for m in last["sites"].values() if m.get("epsilon") is not None]
    checked = independent_epsilons(ledger_dir(workdir, run_name(trainer, eps, seed, variant)), names)
    return {"method": label, "variant": variant, "trainer": trainer, "target_epsilon": eps, "seed": seed, "dice": dice,
            "mean_dice": float(np.mean(list(dice.values()))), "epsilon_spent": max(spent) if spent else None,
            "epsilon_dp_accounting": max(checked) if checked else None}


def plot_runs(runs: list[dict], path: str) -> None:
    """Dice (mean ± std over seeds) against target epsilon, one line per method; non-private methods as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context(matplotlib.rcParamsDefault):  # not the styles nnU-Net's imports set
        _plot(plt, runs, path)


def _plot(plt, runs: list[dict], path: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    label = lambda r: r["method"] + (f" [{r['variant']}]" if r.get("variant") else "")  # noqa: E731
    cell = lambda r: (label(r), r["target_epsilon"])  # noqa: E731
    most_seeds = max(sum(cell(q) == cell(r) for q in runs) for r in runs) if runs else 0
    for method in dict.fromkeys(label(r) for r in runs):
        rs = [r for r in runs if label(r) == method]
        if rs[0]["target_epsilon"] is None:
            m, sd = 100 * np.mean([r["mean_dice"] for r in rs]), 100 * np.std([r["mean_dice"] for r in rs])
            ax.axhline(m, color="k", ls="--", label=f"{method}")
            ax.axhspan(m - sd, m + sd, color="k", alpha=0.1)
            continue
        eps = sorted({r["target_epsilon"] for r in rs})
        means = [100 * np.mean([r["mean_dice"] for r in rs if r["target_epsilon"] == e]) for e in eps]
        sds = [100 * np.std([r["mean_dice"] for r in rs if r["target_epsilon"] == e]) for e in eps]
        ax.errorbar(eps, means, yerr=sds, marker="o", capsize=3, label=method)
        for e, m in zip(eps, means):  # a point over fewer seeds than the others says so
            n = sum(r["target_epsilon"] == e for r in rs)
            if n < most_seeds:
                ax.annotate(f"{n} seed{'s' if n > 1 else ''}", (e, m), textcoords="offset points", xytext=(6, -10),
                            fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("target epsilon (delta 1e-5)")
    ax.set_ylabel("Dice on held-out cases (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_records(path: str) -> dict:
    """Run records (lines of a ``runs.jsonl``) by (trainer, target epsilon, seed, variant); a later line wins.
    A record without per-site ``dice`` (an earlier run of which only the mean was kept) counts in the mean and the
    plot, and leaves its row's per-site cells empty."""
    out = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out[(r["trainer"], r["target_epsilon"], r["seed"], r.get("variant", ""))] = r
    return out


def report(workdirs: list[str], args) -> str:
    """The table from every finished run found in ``workdirs`` (a run is looked up in each, first found wins). An
    entry may also be a ``.jsonl`` file of run records (``runs.jsonl``, or ``benchmarks/privacy_utility_runs.jsonl``,
    the records behind the README's table, kept when the runs' folders are gone); the plot is then written next to
    the first entry."""
    names = [f"Dataset{FIRST_ID + k}_ShiftSite{k}" for k in range(SITES)]
    records = {w: load_records(w) for w in workdirs if w.endswith(".jsonl")}
    methods = [m for m in METHODS if args.methods is None or m[1] in args.methods]
    rows, runs = [], []
    for label, trainer, kind in methods:
        for eps in ([None] if kind is None else args.epsilons):
            rs = []
            for seed in range(args.seeds):
                for w in workdirs:
                    variant = args.variant if eps is not None else ""
                    r = records[w].get((trainer, eps, seed, variant)) if w in records else \
                        score_run(w, label, trainer, eps, seed, names, variant)
                    if r is not None:
                        rs.append(r)
                        break
            runs += rs
            if not rs:
                continue
            per_site = {n: (np.mean([r["dice"][n] for r in rs]), np.std([r["dice"][n] for r in rs]))
                        if all(r.get("dice") for r in rs) else None for n in names}
            means = [r["mean_dice"] for r in rs]
            spent = [r["epsilon_spent"] for r in rs if r["epsilon_spent"] is not None]
            checked = [r["epsilon_dp_accounting"] for r in rs if r.get("epsilon_dp_accounting") is not None]
            rows.append((label + (f" [{args.variant}]" if args.variant and eps is not None else ""),
                         "-" if eps is None else f"{eps:g}",
                         *[f"{100 * v[0]:.1f} ± {100 * v[1]:.1f}" if v else "-" for v in per_site.values()],
                         f"{100 * np.mean(means):.1f} ± {100 * np.std(means):.1f}", str(len(rs)),
                         f"{max(spent):.3f}" if spent else "-",
                         f"{max(checked):.3f} ({len(checked)} of {len(rs)} runs)" if checked else "-"))
    out_dir = os.path.dirname(os.path.abspath(workdirs[0])) if workdirs[0] in records else workdirs[0]
    plot_runs(runs, os.path.join(out_dir, f"privacy_utility{f'_{args.variant}' if args.variant else ''}.png"))
    header = ("method", "target epsilon", *[f"site {k}" for k in range(SITES)], "mean", "seeds", "max epsilon spent",
              "dp_accounting")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    print()
    batch = args.expected_batch_size or "by the trainers' default rule"
    print(f"Dice (%) on held-out cases, mean ± std over seeds; {args.num_train} training cases per site, {args.rounds} "
          f"rounds x {args.local_steps} local steps, DP expected batch {batch}, delta {args.delta:g}")
    print(table)
    if workdirs[0] not in records:  # a records file is its own record
        with open(os.path.join(workdirs[0], "privacy_utility.json"), "w") as f:
            json.dump({"args": vars(args), "workdirs": workdirs, "runs": runs, "table": table}, f, indent=2)
    return table


if __name__ == "__main__":
    sys.exit(main())

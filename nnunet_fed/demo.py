"""``nnunet_fed demo``: three synthetic hospitals, FedAvg against training alone and against pooling the data.

1. writes three 2D sites of the ``shift`` scenario (same anatomy, different scanners) in nnU-Net raw format, and a
   pooled dataset of all their training cases (what a consortium could train on if it could share images);
2. plans and preprocesses each site and the pooled dataset with nnU-Net (site 0's plans for all);
3. runs ``nnunet_fed simulate`` with nnUNetTrainerFedAvg on CPU, at the schedule the federated utility benchmark
   measured best (many short rounds: 30 rounds x 10 steps, nnU-Net's momentum kept between rounds);
4. trains the baselines with nnU-Net's own nnUNetTrainer: each site alone with the same number of iterations each
   site ran in the federation, and the pooled dataset with the federation's total;
5. predicts every site's held-out cases (imagesTs) with the global, the pooled and the site's local model
   (nnU-Net's predictor) and scores them against labelsTs with nnU-Net's evaluation.
"""
from __future__ import annotations

import contextlib
import io
import os
import time

import numpy as np

DEMO_SITES = 3
FIRST_ID = 101
DEFAULTS = {"rounds": 30, "local_steps": 10, "num_train": 60, "num_test": 15}
POOLED_ID = FIRST_ID + DEMO_SITES


def _set_nnunet_folders(workdir: str) -> dict:
    folders = {v: os.path.abspath(os.path.join(workdir, v)) for v in ("nnUNet_raw", "nnUNet_preprocessed",
                                                                       "nnUNet_results")}
    for var, path in folders.items():
        os.makedirs(path, exist_ok=True)
        os.environ[var] = path
    return folders


def train_local_baseline(site_name: str, rounds: int, local_steps: int, val_steps: int, device: str,
                         configuration: str = "2d") -> str:
    """nnU-Net's plain nnUNetTrainer on one site, rounds x local_steps iterations; returns its results folder."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    with contextlib.redirect_stdout(io.StringIO()):
        trainer = get_trainer_from_args(site_name, configuration, 0, "nnUNetTrainer", "nnUNetPlans",
                                        device=torch.device(device))
        trainer.num_epochs = rounds
        trainer.num_iterations_per_epoch = local_steps
        trainer.num_val_iterations_per_epoch = val_steps
        trainer.run_training()
    return trainer.output_folder_base


def write_pooled_dataset(site_names: list[str], name: str, raw_root: str) -> str:
    """Every site's training cases in one nnU-Net raw dataset ``name`` (case names prefixed with the site's index):
    the pooled-data baseline a federation is measured against. Returns ``name``."""
    import json
    import shutil

    folder = os.path.join(raw_root, name)
    shutil.rmtree(folder, ignore_errors=True)
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(folder, sub))
        for k, site in enumerate(site_names):
            for f in sorted(os.listdir(os.path.join(raw_root, site, sub))):
                shutil.copyfile(os.path.join(raw_root, site, sub, f), os.path.join(folder, sub, f"site{k}_{f}"))
    with open(os.path.join(raw_root, site_names[0], "dataset.json")) as f:
        dataset_json = json.load(f)
    dataset_json.pop("synthetic", None)
    dataset_json.update(name=name, description="the training cases of every site, pooled",
                        numTraining=len(os.listdir(os.path.join(folder, "labelsTr"))))
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    return name


def _format_table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])


def run_demo(workdir: str = "nnunet_fed_demo", rounds: int | None = None, local_steps: int | None = None,
             device: str = "cpu", num_train: int | None = None, seed: int = 0, val_steps: int = 2) -> dict:
    rounds = rounds or DEFAULTS["rounds"]
    local_steps = local_steps or DEFAULTS["local_steps"]
    num_train = num_train or DEFAULTS["num_train"]
    t_start = time.time()
    folders = _set_nnunet_folders(workdir)
    print(f"demo workdir: {os.path.abspath(workdir)} (nnUNet_raw, nnUNet_preprocessed, nnUNet_results inside)")

    from nnunet_fed.data.synthetic import make_federated_datasets
    from nnunet_fed.evaluation import dice_per_label, evaluate_folder, predict_folder
    from nnunet_fed.federation.simulation import SimulationConfig, simulate
    from nnunet_fed.planning import plan_and_preprocess_sites

    print(f"[1/5] writing {DEMO_SITES} synthetic sites (2D, scenario 'shift', {num_train} training cases each) "
          f"and their pooled training cases")
    names = make_federated_datasets(first_id=FIRST_ID, num_sites=DEMO_SITES, scenario="shift", dim=2,
                                    num_train=num_train, num_test=DEFAULTS["num_test"], seed=seed, overwrite=True)
    pooled = write_pooled_dataset(names, f"Dataset{POOLED_ID:03d}_ShiftPooled", folders["nnUNet_raw"])
    print("[2/5] nnU-Net planning (site 0's plans, moved to the other datasets) and preprocessing")
    plan_and_preprocess_sites([FIRST_ID + k for k in range(DEMO_SITES)] + [POOLED_ID], configurations=("2d",))

    print(f"[3/5] FedAvg: {rounds} rounds x {local_steps} local steps per site, device {device}")
    t0 = time.time()
    fed = simulate(SimulationConfig(dataset_ids=names, configuration="2d", trainer="nnUNetTrainerFedAvg",
                                    rounds=rounds, local_steps=local_steps, val_steps=val_steps, device=device,
                                    fresh=True, final_validation=False, seed=seed + 12345))
    t_fed = time.time() - t0

    print(f"[4/5] baselines with nnUNetTrainer: each site alone, {rounds * local_steps} iterations each; the pooled "
          f"data, {DEMO_SITES * rounds * local_steps} iterations")
    t0 = time.time()
    local_folders = {n: train_local_baseline(n, rounds, local_steps, val_steps, device) for n in names}
    t_local = time.time() - t0
    t0 = time.time()
    pooled_folder = train_local_baseline(pooled, rounds, DEMO_SITES * local_steps, val_steps, device)
    t_pooled = time.time() - t0

    print("[5/5] predicting held-out cases (imagesTs) and scoring them against labelsTs")
    models = ("FedAvg (global)", "pooled data", "local only")
    rows, results = [], {}
    for n in names:
        raw = os.path.join(folders["nnUNet_raw"], n)
        scores = {}
        for model, folder in zip(models, (fed["global_model_folder"], pooled_folder, local_folders[n])):
            out = os.path.join(workdir, "predictions", n, model.split()[0].lower())
            with contextlib.redirect_stdout(io.StringIO()):
                predict_folder(folder, os.path.join(raw, "imagesTs"), out, fold=0, device=device)
                summary = evaluate_folder(os.path.join(raw, "labelsTs"), out, folder)
            scores[model] = dice_per_label(summary)
        results[n] = scores
        for label, label_name in ((1, "organ"), (2, "tumour")):
            rows.append((n, label_name, *(f"{scores[m][label]:.3f}" for m in models)))
    means = {m: float(np.mean([s[m][k] for s in results.values() for k in (1, 2)])) for m in models}
    rows.append(("mean", "foreground", *(f"{means[m]:.3f}" for m in models)))
    print()
    print("Dice on held-out test cases (nnU-Net evaluation)")
    print(_format_table(rows, ("site", "label", *models)))
    print()
    print(f"FedAvg training {t_fed:.0f} s, local baselines {t_local:.0f} s, pooled {t_pooled:.0f} s, "
          f"total {time.time() - t_start:.0f} s")
    print(f"global model: {fed['global_model_folder']}")
    print(f"round metrics: {os.path.join(fed['global_model_folder'], 'fold_0', 'federation_metrics.jsonl')}")
    return {"dice": results, "fedavg_mean_dice": means[models[0]], "pooled_mean_dice": means[models[1]],
            "local_mean_dice": means[models[2]], "seconds": time.time() - t_start}

#!/usr/bin/env python
"""What a round costs beyond training on Flower, against ``nnunet_fed simulate`` at equal steps.

    python benchmarks/deployment_overhead.py [--sites 1] [--rounds 4] [--local-steps 10] [--val-steps 2]
                                             [--workdir DIR]

Data: ``--sites`` generated 2D ``shift`` sites (64x64, 20 training cases), planned and preprocessed with nnU-Net
(site 0's plans moved to the others), reused on later runs. Both arms train nnUNetTrainerFedAvg for the same
rounds x local steps x validation steps, augmentation in-process (``nnUNet_n_proc_DA=0``), CPU, no final
validation:

- ``simulate``: ``nnunet_fed simulate`` in a subprocess;
- ``Flower``: ``nnunet_fed server --insecure`` and one ``nnunet_fed site join`` per site on loopback (a real
  SuperLink, gateway, SuperNodes and per-message ClientApp processes), the site's trainer kept between rounds by
  the site worker;
- ``Flower, no worker``: the same with ``site join --no-worker`` (every message answered in Flower's fresh
  ClientApp process, which imports torch and nnU-Net and rebuilds the trainer from the round state file);
- ``SecAgg+`` (``--secure-arm``, two sites or more): ``nnunet_fed server --secure-aggregation``, the four
  message exchanges of Flower's SecAgg+ per round, masking at the sites and unmasking at the server.

Per round, from each run's ``federation_metrics.jsonl``: the round's wall time on the server, and per site the
training time (nnU-Net's epoch: training steps and the pseudo-Dice pass, ``seconds``); on Flower also the
ClientApp's process start to message handling (``process_seconds``: process start, Flower's imports and the
message's pull from the SuperNode; with no worker also torch and nnU-Net's imports) and the trainer's construction
and state loading (``setup_seconds``; with the worker only the site's folder check). ``exchange`` is what is left
of the round: the transfer of the global model and the update through SuperLink and SuperNode, serialisation,
polling, aggregation and the server's commit. Printed: the mean over rounds after the first (the first also pays data loader start-up in both arms),
and the overhead beyond training per site and round. With more than one site the Flower sites train at the same
time on the same cores, so compare per-site figures with ``--sites 1``. Time it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

FIRST_ID = 951


def _env(workdir: str) -> dict:
    env = {k: os.path.join(workdir, k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in env.values():
        os.makedirs(folder, exist_ok=True)
    return {**os.environ, **env, "nnUNet_n_proc_DA": "0"}


def prepare_data(workdir: str, sites: int) -> list[str]:
    spec_file = os.path.join(workdir, "data_spec.json")
    spec = {"sites": sites, "size": 64, "num_train": 20, "first_id": FIRST_ID}
    env = _env(workdir)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    from nnunet_fed.data.synthetic import make_federated_datasets

    if os.path.isfile(spec_file) and json.load(open(spec_file)) == spec:
        return [f"Dataset{FIRST_ID + k:03d}_ShiftSite{k}" for k in range(sites)]
    from nnunet_fed.planning import plan_and_preprocess_sites

    names = make_federated_datasets(first_id=FIRST_ID, num_sites=sites, scenario="shift", dim=2, num_train=20,
                                    num_test=1, seed=0, overwrite=True, image_size=(64, 64))
    plan_and_preprocess_sites([FIRST_ID + k for k in range(sites)], configurations=("2d",))
    with open(spec_file, "w") as f:
        json.dump(spec, f)
    return names


def _metrics(fold: str) -> list[dict]:
    with open(os.path.join(fold, "federation_metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _fold(workdir: str, federation: str) -> str:
    return os.path.join(workdir, "nnUNet_results", federation, "nnUNetTrainerFedAvg__nnUNetPlans__2d", "fold_0")


def run_simulate(workdir: str, names: list[str], args) -> list[dict]:
    fed = "DatasetFed_overhead_sim"
    cmd = [sys.executable, "-m", "nnunet_fed.cli", "simulate", "-d", *names, "-c", "2d", "--rounds",
           str(args.rounds), "--local-steps", str(args.local_steps), "--val-steps", str(args.val_steps),
           "--device", "cpu", "--fresh", "--no-val", "--no-progress", "--federation-name", fed]
    with open(os.path.join(workdir, "simulate.log"), "w") as log:
        subprocess.run(cmd, env=_env(workdir), stdout=log, stderr=subprocess.STDOUT, check=True)
    return _metrics(_fold(workdir, fed))


def run_flower(workdir: str, names: list[str], args, worker: bool = True, secure: bool = False) -> list[dict]:
    from nnunet_fed.deployment.launch import free_port

    fed = "DatasetFed_overhead_flower" + ("" if worker else "_noworker") + ("_secure" if secure else "")
    port, env = free_port(), _env(workdir)
    server = subprocess.Popen(
        [sys.executable, "-m", "nnunet_fed.cli", "server", "--insecure", "--port", str(port), "--min-sites",
         str(len(names)), "-c", "2d", "--rounds", str(args.rounds), "--local-steps", str(args.local_steps),
         "--val-steps", str(args.val_steps), "--no-val", "--fresh", "--federation-name", fed,
         *(["--secure-aggregation"] if secure else [])],
        env=env, stdout=open(os.path.join(workdir, "server.log"), "w"), stderr=subprocess.STDOUT)
    sites = []
    try:
        time.sleep(5)
        for name in names:
            sites.append(subprocess.Popen(
                [sys.executable, "-m", "nnunet_fed.cli", "site", "join", "--superlink", f"127.0.0.1:{port}", "-d",
                 name, "-c", "2d", "--device", "cpu", "--insecure", *([] if worker else ["--no-worker"])],
                env={**env, "FLWR_HOME": os.path.join(workdir, f"flwr_{name}")},
                stdout=open(os.path.join(workdir, f"{name}.log"), "w"), stderr=subprocess.STDOUT))
        if server.wait(3600) != 0:
            raise RuntimeError(f"nnunet_fed server failed; see {os.path.join(workdir, 'server.log')}")
    finally:
        for p in [server, *sites]:
            if p.poll() is None:
                p.terminate()
                p.wait(30)
    return _metrics(_fold(workdir, fed))


def summarise(rows: list[dict], flower: bool) -> dict:
    """Mean over rounds after the first, per site and round: wall, training, process, setup, exchange, overhead."""
    keep = rows[1:] if len(rows) > 1 else rows
    out = {k: 0.0 for k in ("round", "training", "process", "setup", "exchange", "overhead")}
    for r in keep:
        sites = list(r["sites"].values())
        train = max(m["seconds"] for m in sites)
        process = max(m.get("process_seconds", 0.0) for m in sites) if flower else 0.0
        setup = max(m.get("setup_seconds", 0.0) for m in sites) if flower else 0.0
        wall = r["seconds"]
        if not flower:  # sites train one after another in one process
            train = sum(m["seconds"] for m in sites) / len(sites)
            wall = r["seconds"] / len(sites)
        out["round"] += wall / len(keep)
        out["training"] += train / len(keep)
        out["process"] += process / len(keep)
        out["setup"] += setup / len(keep)
        out["exchange"] += max(0.0, wall - train - process - setup) / len(keep)
        out["overhead"] += (wall - train) / len(keep)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--val-steps", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/nnunet_fed_deployment_overhead")
    p.add_argument("--no-worker-arm", action="store_true", help="also run Flower with site join --no-worker")
    p.add_argument("--secure-arm", action="store_true",
                   help="also run Flower with --secure-aggregation (SecAgg+; needs --sites 2 or more)")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    names = prepare_data(args.workdir, args.sites)
    t0 = time.time()
    sim = summarise(run_simulate(args.workdir, names, args), flower=False)
    t_sim = time.time() - t0
    t0 = time.time()
    flw = summarise(run_flower(args.workdir, names, args), flower=True)
    t_flw = time.time() - t0
    cold = summarise(run_flower(args.workdir, names, args, worker=False), flower=True) if args.no_worker_arm else None
    if args.secure_arm and args.sites < 2:
        p.error("--secure-arm needs --sites 2 or more (secure aggregation sums at least two sites)")
    secure = summarise(run_flower(args.workdir, names, args, secure=True), flower=True) if args.secure_arm else None
    print(f"{args.sites} site(s), {args.rounds} rounds x {args.local_steps} steps (+{args.val_steps} validation), "
          f"2d 64x64, CPU; mean over rounds 2..{args.rounds}, seconds per site and round")
    print(f"{'':10s}{'round':>8s}{'training':>10s}{'process':>9s}{'setup':>8s}{'exchange':>10s}{'beyond training':>17s}")
    for name, s in (("simulate", sim), ("Flower", flw), ("no worker", cold), ("SecAgg+", secure)):
        if s is None:
            continue
        print(f"{name:10s}{s['round']:8.2f}{s['training']:10.2f}{s['process']:9.2f}{s['setup']:8.2f}"
              f"{s['exchange']:10.2f}{s['overhead']:17.2f}")
    print(f"whole runs: simulate {t_sim:.0f} s, Flower {t_flw:.0f} s (incl. start-up); Flower's cost beyond training "
          f"per site and round: {flw['overhead']:.2f} s (goal 1 s), simulate's {sim['overhead']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Round overhead of ``nnunet_fed simulate`` against vanilla nnU-Net training, and its peak memory.

    python benchmarks/round_overhead.py [--sites 3] [--rounds R] [--local-steps N] [--val-steps V]
                                        [--repeats 2] [--workdir DIR] [--memory-sites 2 8] [--quick]

What it does (every training run in a fresh subprocess, see "fairness" below):

1. writes ``max(K, max(--memory-sites))`` synthetic 2D ``shift`` sites (64x64, 60 training cases each, so that
   nnU-Net's plans give batch size 3) under ``<workdir>/nnUNet_raw`` and plans + preprocesses them with
   nnU-Net (reused on later runs when ``<workdir>/data_spec.json`` matches);
2. vanilla arm: ``nnUNetTrainer`` on site 0, built as ``nnUNetv2_train`` builds it
   (``nnunetv2.run.run_training.get_trainer_from_args``), ``num_epochs=R``,
   ``num_iterations_per_epoch=K*N``, ``num_val_iterations_per_epoch=K*V``, ``run_training()``;
3. federated arm: ``simulate(SimulationConfig(K sites, rounds=R, local_steps=N, val_steps=V, fresh=True,
   final_validation=False))``: the same R*K*N training and R*K*V validation iterations;
4. prints every measurement, the median ratio simulation / vanilla (and the CPU-time ratio), and a
   per-component breakdown of where the extra time goes: both arms are instrumented the same way, a wrapper
   around ~60 methods that records wall time and minor page faults per call (~2 us per call; a train_step
   is ~130 ms). Steps right after a data loader (re)start are counted apart: their excess over the
   steady-state step time is overhead of the restart (copy-on-write faults after the fork, CPU shared with
   the new workers filling their caches);
5. peak memory (PSS of the whole process tree, sampled every 0.2 s from /proc/<pid>/smaps_rollup, plus the
   main process's ru_maxrss) of a short simulation for every K in ``--memory-sites``, per extra site, and
   compared with one copy of the network weights.

Fairness: both arms run in fresh interpreters (``python this_file --_worker ...``), with the same
``nnUNet_n_proc_DA`` (the machine's nnU-Net default unless set) and the same torch thread count
(``multiprocessing.cpu_count()``, what both ``nnUNetv2_train -device cpu`` and ``simulate`` set). Imports
happen before the clock starts in both arms; the clock includes the trainer class lookup, trainer
construction, data loader start-up, training, validation passes, checkpoints/plots and the final checkpoint.
Arms alternate in order between repeats. The machine may be shared: before each run the script waits (up to
``--idle-wait`` s) until other processes use < 0.25 cores, measures how many cores other processes used
during the run (/proc/stat minus the run's own CPU time), and runs a timing again (``--retries``) when that
exceeds ``--max-foreign``.

Data and results live under ``--workdir`` (default /tmp/nnunet_fed_round_overhead): nnUNet_raw,
nnUNet_preprocessed, results_vanilla, results_fed, results_mem_<K>, logs/ (each worker's log, spec and JSON
result, memory samples).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.abspath(__file__)
DEFAULT_WORKDIR = "/tmp/nnunet_fed_round_overhead"
FIRST_ID = 931  # site k is dataset FIRST_ID + k (folders Dataset931_ShiftSite0, ...)
DATA_SPEC = {"scenario": "shift", "dim": 2, "image_size": [64, 64], "num_train": 60, "num_test": 2, "seed": 0,
             "first_id": FIRST_ID, "configuration": "2d", "version": 1}
CONFIGURATION = "2d"


# ================================================================================================== helpers
def nnunet_env(workdir: str, results: str) -> dict:
    return {"nnUNet_raw": os.path.join(workdir, "nnUNet_raw"),
            "nnUNet_preprocessed": os.path.join(workdir, "nnUNet_preprocessed"),
            "nnUNet_results": os.path.join(workdir, results)}


def set_nnunet_env(workdir: str, results: str = "results_setup") -> None:
    """Must run before anything imports nnunetv2.paths (it reads the variables at import time)."""
    for k, v in nnunet_env(workdir, results).items():
        os.environ[k] = v
        os.makedirs(v, exist_ok=True)


def default_n_proc_da() -> int:
    """What nnU-Net uses for nnUNet_n_proc_DA on this machine (nnunetv2.utilities.default_n_proc_DA)."""
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    return get_allowed_n_proc_DA()


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:9]]
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(max_wait: float, threshold: float = 0.25, window: float = 3.0) -> str:
    """Wait (at most ``max_wait`` s) until other processes use less than ``threshold`` cores over ``window`` s."""
    t0 = time.time()
    announced = False
    while True:
        b0 = cpu_busy_seconds()
        time.sleep(window)
        busy = (cpu_busy_seconds() - b0) / window
        if busy < threshold:
            return f"machine idle ({busy:.2f} cores busy)" + (f" after waiting {time.time() - t0:.0f} s" if announced else "")
        if time.time() - t0 > max_wait:
            return f"machine NOT idle: {busy:.2f} cores busy after waiting {time.time() - t0:.0f} s"
        if not announced:
            print(f"  (other processes use {busy:.2f} cores; waiting up to {max_wait:.0f} s for an idle machine)",
                  flush=True)
            announced = True


def fmt_mib(b: float) -> str:
    return f"{b / 2 ** 20:8.1f} MiB"


# ================================================================================================== data
def prepare_data(workdir: str, num_sites: int) -> list[int]:
    """Generate + plan + preprocess ``num_sites`` sites unless the workdir already holds them."""
    ids = [FIRST_ID + k for k in range(num_sites)]
    spec_file = os.path.join(workdir, "data_spec.json")
    pre = os.environ["nnUNet_preprocessed"]
    have = None
    if os.path.isfile(spec_file):
        with open(spec_file) as f:
            have = json.load(f)

    def site_ready(i: int) -> bool:
        folders = [d for d in os.listdir(pre) if d.startswith(f"Dataset{i:03d}_")] if os.path.isdir(pre) else []
        if len(folders) != 1:
            return False
        plans_file = os.path.join(pre, folders[0], "nnUNetPlans.json")
        if not os.path.isfile(plans_file):
            return False
        with open(plans_file) as f:
            data_id = json.load(f)["configurations"][CONFIGURATION]["data_identifier"]
        return os.path.isdir(os.path.join(pre, folders[0], data_id))

    if have is not None and have.get("spec") == DATA_SPEC and have.get("num_sites", 0) >= num_sites \
            and all(site_ready(i) for i in ids):
        print(f"data: reusing {num_sites} preprocessed sites in {workdir} (ids {ids[0]}..{ids[-1]})")
        return ids

    from nnunet_fed.data.synthetic import make_federated_datasets
    from nnunet_fed.planning import plan_and_preprocess_sites

    t0 = time.perf_counter()
    for d in (os.environ["nnUNet_raw"], pre):
        for name in os.listdir(d):
            if any(name.startswith(f"Dataset{i:03d}_") for i in ids):
                shutil.rmtree(os.path.join(d, name))
    make_federated_datasets(FIRST_ID, num_sites, DATA_SPEC["scenario"], DATA_SPEC["dim"], DATA_SPEC["num_train"],
                            DATA_SPEC["num_test"], DATA_SPEC["seed"], image_size=tuple(DATA_SPEC["image_size"]),
                            raw_root=os.environ["nnUNet_raw"], overwrite=True)
    t1 = time.perf_counter()
    plan_and_preprocess_sites(ids, configurations=(CONFIGURATION,), num_processes=max(1, os.cpu_count() or 1))
    t2 = time.perf_counter()
    with open(spec_file, "w") as f:
        json.dump({"spec": DATA_SPEC, "num_sites": num_sites}, f, indent=1)
    print(f"data: generated {num_sites} sites in {t1 - t0:.1f} s, planned + preprocessed in {t2 - t1:.1f} s")
    return ids


def describe_plans(site_id: int) -> str:
    pre = os.environ["nnUNet_preprocessed"]
    folder = [d for d in os.listdir(pre) if d.startswith(f"Dataset{site_id:03d}_")][0]
    with open(os.path.join(pre, folder, "nnUNetPlans.json")) as f:
        c = json.load(f)["configurations"][CONFIGURATION]
    arch = c.get("architecture", {}).get("arch_kwargs", {})
    return (f"{folder}: batch size {c['batch_size']}, patch size {c['patch_size']}, "
            f"{arch.get('n_stages', '?')} stages, features {arch.get('features_per_stage', '?')}")


# ================================================================================================== profiler
def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Profiler:
    """Wraps methods and records, per key, calls, inclusive and exclusive (minus wrapped callees) seconds.

    Only calls from the main thread are recorded (the data loader's results thread calls nothing wrapped).
    """

    def __init__(self):
        self.stats: dict[str, list] = {}  # key -> [calls, inclusive s, exclusive s]
        self.first_call_wall: dict[str, float] = {}
        self.stack: list[list] = []
        self.main = threading.get_ident()
        self.missing: list[str] = []

    def _enter(self, key):
        frame = [key, time.perf_counter(), 0.0, _minor_faults(), 0]
        self.stack.append(frame)
        self.first_call_wall.setdefault(key, time.time())
        return frame

    def _exit(self, frame):
        dur = time.perf_counter() - frame[1]
        faults = _minor_faults() - frame[3]
        self.stack.pop()
        s = self.stats.setdefault(frame[0], [0, 0.0, 0.0, 0])
        s[0] += 1
        s[1] += dur
        s[2] += dur - frame[2]
        s[3] += faults - frame[4]  # minor page faults (zero-fill and copy-on-write), exclusive
        if self.stack:
            self.stack[-1][2] += dur
            self.stack[-1][4] += faults

    def section(self, key):
        prof = self

        class _Section:
            def __enter__(self):
                self.frame = prof._enter(key)

            def __exit__(self, *exc):
                prof._exit(self.frame)

        return _Section()

    def wrap(self, owner, attr: str, key: str | None = None, keyfn=None, after=None, optional=False):
        if optional and not hasattr(owner, attr):  # the project's code moves; skip what is not there
            self.missing.append(f"{getattr(owner, '__name__', owner)}.{attr}")
            return
        orig = owner.__dict__[attr] if attr in getattr(owner, "__dict__", {}) else getattr(owner, attr)
        if isinstance(orig, (staticmethod, classmethod)):
            raise TypeError(f"cannot wrap {attr}")
        prof = self
        key = key or attr

        @functools.wraps(orig)
        def wrapper(*args, **kwargs):
            if threading.get_ident() != prof.main:
                return orig(*args, **kwargs)
            frame = prof._enter(keyfn(args, kwargs) if keyfn else key)
            try:
                result = orig(*args, **kwargs)
            finally:
                prof._exit(frame)
            if after is not None:
                after(args, result)
            return result

        setattr(owner, attr, wrapper)

    def dump(self) -> dict:
        return {"stats": self.stats, "first_call_wall": self.first_call_wall, "not_instrumented": self.missing}


def _checkpoint_kind(args, kwargs) -> str:
    name = os.path.basename(str(args[1] if len(args) > 1 else kwargs.get("filename", "")))
    if name.startswith("round_"):
        kind = "round state"
    elif name.startswith("checkpoint_"):
        kind = name[len("checkpoint_"):].split(".")[0]  # best / latest / final
    else:
        kind = name
    return f"save_checkpoint [{kind}]"


def _batch_kind(args, kwargs) -> str:
    return "data: wait for batch (steady)" if args[0].initialized else "data: wait for 1st batch after start"


def instrument_common(prof: Profiler) -> dict:
    """The same wrappers in both arms (nnU-Net's own trainer, logger and data loader)."""
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from nnunetv2.training.logging.nnunet_logger import LocalLogger
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    T = nnUNetTrainer
    # the first train/validation step after a data loader (re)start is recorded apart: the fork makes every
    # page the main process writes next a copy-on-write fault
    pending = {"train": 99, "val": 99}  # steps since the last data loader start

    def step_key(kind, label):
        def keyfn(args, kwargs):
            n = pending[kind]
            pending[kind] += 1
            if n == 0:
                return f"{label} (1st after a data loader start)"
            if n < 5:
                return f"{label} (2nd-5th after a data loader start)"
            return f"{label} (compute)"
        return keyfn

    prof.wrap(T, "train_step", keyfn=step_key("train", "train_step"))
    prof.wrap(T, "validation_step", keyfn=step_key("val", "validation_step"))
    for attr, key in [("initialize", "nnU-Net initialize (network, optimizer, loss)"),
                      ("get_dataloaders", "nnU-Net get_dataloaders (transforms, datasets)"),
                      ("on_train_start", "nnU-Net on_train_start (rest: unpack check, plans copy)"),
                      ("on_train_end", "nnU-Net on_train_end (rest)"),
                      ("on_train_epoch_start", "nnU-Net on_train_epoch_start (lr)"),
                      ("on_train_epoch_end", "nnU-Net on_train_epoch_end"),
                      ("on_validation_epoch_start", "nnU-Net on_validation_epoch_start"),
                      ("on_validation_epoch_end", "nnU-Net on_validation_epoch_end (pseudo Dice)"),
                      ("on_epoch_start", "nnU-Net on_epoch_start"),
                      ("on_epoch_end", "nnU-Net on_epoch_end (rest: EMA, logging)"),
                      ("print_to_log_file", "print_to_log_file"),
                      ("print_plans", "print_plans"),
                      ("plot_network_architecture", "plot_network_architecture"),
                      ("_save_debug_information", "_save_debug_information"),
                      ("get_tr_and_val_datasets", "nnU-Net get_tr_and_val_datasets (split)")]:
        prof.wrap(T, attr, key)
    prof.wrap(T, "save_checkpoint", keyfn=_checkpoint_kind)
    prof.wrap(LocalLogger, "plot_progress_png", "nnU-Net progress.png plot (per epoch)")
    prof.wrap(NonDetMultiThreadedAugmenter, "_start", "data: start workers (fork)",
              after=lambda args, _: pending.update(train=0, val=0))
    prof.wrap(NonDetMultiThreadedAugmenter, "_finish", "data: stop workers")
    prof.wrap(NonDetMultiThreadedAugmenter, "__next__", keyfn=_batch_kind)
    return pending


def _suspended_site_holdings(site) -> dict:
    """What a suspended site keeps in memory (read right after SimulatedSite.suspend)."""
    t = site.trainer
    params = list(t.plain_network.parameters())
    opt_bytes = 0
    for st in t.optimizer.state.values():
        for v in st.values():
            if hasattr(v, "element_size"):
                opt_bytes += v.numel() * v.element_size()
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params}
    return {"weights": sum(p.numel() * p.element_size() for p in params), "weight_storages": storages,
            "grads": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
            "optimizer_state": opt_bytes,
            "dataloader_workers_alive": sum(len(getattr(dl, "_processes", []) or [])
                                            for dl in (t.dataloader_train, t.dataloader_val))}


def instrument_federated(prof: Profiler, holdings: dict, step_counts: dict) -> None:
    from nnunet_fed.federation import aggregation, records, simulation
    from nnunet_fed.federation.trainer import nnUNetTrainerFederated as F

    for attr, key in [("initialize", "fed initialize (rest: FedProx hook)"),
                      ("on_train_start", "fed on_train_start (rest: split)"),
                      ("load_checkpoint", "fed load_checkpoint (round state, torch.load)"),
                      ("save_round_state", "fed save_round_state (rest)"),
                      ("release_dataloaders", "fed release_dataloaders (rest)"),
                      ("get_shared_arrays", "fed get_shared_arrays (state -> numpy copies)"),
                      ("set_shared_arrays", "fed set_shared_arrays (numpy -> state)"),
                      ("on_round_start", "fed on_round_start (rest)"),
                      ("on_round_end", "fed on_round_end (rest)"),
                      ("round_metrics", "fed round_metrics"),
                      ("train_round", "fed train_round (rest)"),
                      ("run_round", "fed trainer.run_round (rest)"),
                      ("print_to_log_file", "print_to_log_file (fed wrapper)")]:
        prof.wrap(F, attr, key, optional=True)
    prof.wrap(F, "save_checkpoint", keyfn=_checkpoint_kind, optional=True)
    try:  # the simulation's one augmentation pool (same categories as nnU-Net's augmenter above)
        from nnunet_fed.federation import augmentation_pool as ap

        first_batch = set()

        def pooled_batch_kind(args, kwargs):
            if args[0].slot in first_batch:
                return "data: wait for batch (steady)"
            first_batch.add(args[0].slot)
            return "data: wait for 1st batch after start"

        prof.wrap(ap.AugmentationPool, "__init__", "data: start workers (fork)",
                  after=lambda args, _: step_counts.update(train=0, val=0))
        prof.wrap(ap.AugmentationPool, "close", "data: stop workers")
        prof.wrap(ap.PooledLoader, "__next__", keyfn=pooled_batch_kind)
        prof.wrap(F, "build_data_loaders", "fed build_data_loaders (rest)", optional=True)
    except ImportError:
        prof.missing.append("nnunet_fed.federation.augmentation_pool")
    S = simulation.SimulatedSite
    prof.wrap(S, "run_round", "sim SimulatedSite.run_round (rest)", optional=True)
    prof.wrap(S, "resume", "sim SimulatedSite.resume (RNG, optimizer state device)", optional=True)
    prof.wrap(S, "suspend", "sim suspend (rest: RNG state, heap trim)",
              after=lambda args, _: holdings.__setitem__(args[0].name, _suspended_site_holdings(args[0])), optional=True)
    prof.wrap(S, "prune_states", "sim prune old round states", optional=True)
    prof.wrap(simulation, "_make_trainer", "sim trainer construction (plans, __init__)", optional=True)
    prof.wrap(simulation, "prepare", "sim prepare (checks, trainer lookup)", optional=True)
    prof.wrap(simulation, "_check_same_network", "sim check_same_network", optional=True)
    prof.wrap(simulation, "check_same_network", "sim check_same_network", optional=True)
    prof.wrap(simulation, "write_global_model", "sim write_global_model", optional=True)
    prof.wrap(simulation, "save_server_state", "sim save_server_state (global arrays)", optional=True)
    prof.wrap(simulation, "make_strategy", "sim make_strategy", optional=True)
    prof.wrap(aggregation.FedAvg, "aggregate", "sim FedAvg.aggregate (rest: weighted sum)", optional=True)
    prof.wrap(aggregation, "check_update", "sim check_update (names, shapes, finite)", optional=True)
    prof.wrap(records.MetricsLog, "plot", "sim federation_progress.png plot", optional=True)
    prof.wrap(records.MetricsLog, "append", "sim metrics append", optional=True)
    prof.wrap(records.MetricsLog, "truncate", "sim metrics truncate", optional=True)
    prof.wrap(records.MetricsLog, "read", "sim metrics read", optional=True)


# ================================================================================================== workers
def worker_vanilla(spec: dict) -> dict:
    import multiprocessing

    import torch
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    torch.set_num_threads(multiprocessing.cpu_count())  # what nnUNetv2_train -device cpu does
    prof = Profiler()
    instrument_common(prof)
    shutil.rmtree(os.environ["nnUNet_results"], ignore_errors=True)
    os.makedirs(os.environ["nnUNet_results"])
    K, R, N, V = spec["sites"], spec["rounds"], spec["local_steps"], spec["val_steps"]

    t0 = time.perf_counter()
    with prof.section("TOTAL (unattributed: loop, logger)"):
        with prof.section("vanilla get_trainer_from_args (lookup + __init__)"):
            trainer = get_trainer_from_args(str(spec["site_ids"][0]), CONFIGURATION, 0, "nnUNetTrainer",
                                            "nnUNetPlans", False, device=torch.device("cpu"))
            maybe_load_checkpoint(trainer, False, False, None)
        trainer.num_epochs = R
        trainer.num_iterations_per_epoch = K * N
        trainer.num_val_iterations_per_epoch = K * V
        trainer.run_training()
    seconds = time.perf_counter() - t0
    get = trainer.logger.get_value
    epochs = [e - s for s, e in zip(get("epoch_start_timestamps", None), get("epoch_end_timestamps", None))]
    return {"seconds": seconds, "profile": prof.dump(), "epoch_seconds": epochs,
            "torch_threads": torch.get_num_threads(), "batch_size": trainer.batch_size,
            "train_iterations": R * K * N, "val_iterations": R * K * V,
            "final_pseudo_dice": float(get("mean_fg_dice", -1))}


def worker_federated(spec: dict) -> dict:
    import torch

    from nnunet_fed.federation.records import METRICS_FILE
    from nnunet_fed.federation.simulation import SimulationConfig, global_model_folder, simulate

    prof = Profiler()
    holdings: dict = {}
    instrument_federated(prof, holdings, instrument_common(prof))
    shutil.rmtree(os.environ["nnUNet_results"], ignore_errors=True)
    os.makedirs(os.environ["nnUNet_results"])
    cfg = SimulationConfig(dataset_ids=[str(i) for i in spec["site_ids"]], configuration=CONFIGURATION,
                           trainer="nnUNetTrainerFedAvg", rounds=spec["rounds"], local_steps=spec["local_steps"],
                           val_steps=spec["val_steps"], device="cpu", fresh=True, final_validation=False,
                           progress=False)
    t0 = time.perf_counter()
    with prof.section("TOTAL (unattributed: loop, logger)"):
        summary = simulate(cfg)  # sets torch threads to multiprocessing.cpu_count() on CPU
    seconds = time.perf_counter() - t0
    with open(os.path.join(global_model_folder(cfg), f"fold_{cfg.fold}", METRICS_FILE)) as f:
        rounds = [json.loads(line) for line in f if line.strip()]
    from nnunet_fed.federation.records import load_server_state

    # what one update (and the global model sent back) carries: one array per tensor
    exchanged = load_server_state(os.path.join(global_model_folder(cfg), f"fold_{cfg.fold}"))["global_arrays"]
    # one copy of the weights: the network's parameters (+ buffers), each storage once; the state dict of
    # nnU-Net's PlainConvUNet names most tensors several times (all_modules.*, decoder.encoder.*)
    site_folder = next(iter(summary["site_folders"].values()))
    site_weights = torch.load(os.path.join(site_folder, "checkpoint_final.pth"), map_location="cpu",
                              weights_only=False)["network_weights"]
    unique = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in site_weights.values()}
    import gc
    import resource

    # weight storage a suspended site holds on its own (not shared with another site's network)
    counts: dict = {}
    for h in holdings.values():
        for ptr in h.get("weight_storages", {}):
            counts[ptr] = counts.get(ptr, 0) + 1
    for h in holdings.values():
        st = h.pop("weight_storages", {})
        h["weights_own"] = sum(n for ptr, n in st.items() if counts[ptr] == 1)
    rss_before = _read_pss_rss(os.getpid())[1]
    unreachable = gc.collect()  # cyclic garbage left behind (nnU-Net's matplotlib figures are cycles)
    garbage = {"objects": unreachable, "rss_freed": rss_before - _read_pss_rss(os.getpid())[1]}
    return {"seconds": seconds, "garbage_at_end": garbage, "profile": prof.dump(), "rounds": rounds,
            "torch_threads": torch.get_num_threads(),
            "train_iterations": spec["rounds"] * len(spec["site_ids"]) * spec["local_steps"],
            "val_iterations": spec["rounds"] * len(spec["site_ids"]) * spec["val_steps"],
            "final_pseudo_dice": [r["pseudo_dice"] for r in rounds[-1]["sites"].values()],
            "weights_bytes": sum(unique.values()), "num_unique_tensors": len(unique),
            "exchanged_bytes": int(sum(v.nbytes for v in exchanged.values())),
            "num_exchanged_arrays": len(exchanged),
            "suspended_site_holdings": holdings,
            "ru_maxrss_self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "ru_maxrss_children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}


def worker_held(spec: dict) -> dict:
    """What each site keeps between its turns, one site at a time: the main process's RSS after every site's
    set-up and after every site's turn (augmentation in the main process, nnUNet_n_proc_DA=0, so no worker
    shares or copies its pages; cyclic garbage collected and the heap trimmed before each reading)."""
    import gc

    import torch

    from nnunet_fed.federation import simulation as S

    def rss() -> int:
        return _read_pss_rss(os.getpid())[1]

    cfg = S.SimulationConfig(dataset_ids=[str(i) for i in spec["site_ids"]], configuration=CONFIGURATION,
                             rounds=spec["rounds"], local_steps=spec["local_steps"], val_steps=spec["val_steps"],
                             device="cpu", progress=True)
    cls = S.prepare(cfg)
    torch.set_num_threads(1)
    sites, readings = [], {"setup": [], "round0": [], "round1": []}

    def reading(phase):
        gc.collect()
        S.release_free_heap()
        readings[phase].append(rss())

    reading("setup")
    for site in S.start_sites(cfg, cls, torch.device("cpu")):  # what simulate() does, one reading per site
        sites.append(site)
        reading("setup")
    arrays = sites[0].trainer.get_shared_arrays()
    reading("round0")
    for site in sites:
        site.run_round(0, arrays)
        reading("round0")
    readings["round1"].append(readings["round0"][-1])
    for site in sites:
        site.run_round(1, arrays)
        reading("round1")
    return {"readings": readings}


def worker_main(kind: str, spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    result = {"vanilla": worker_vanilla, "federated": worker_federated, "held": worker_held}[kind](spec)
    result["n_proc_DA_env"] = os.environ.get("nnUNet_n_proc_DA")
    with open(spec["out"] + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(spec["out"] + ".tmp", spec["out"])


# ================================================================================================== memory
def _read_pss_rss(pid: int) -> tuple[int, int]:
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return pss, rss


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except (OSError, ValueError):
                kids = []
            out.extend(kids)
            todo.extend(kids)
    return out


class TreeMonitor(threading.Thread):
    """Samples PSS (and RSS) of a process and all its descendants every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple] = []  # (wall time, tree pss, main pss, tree rss, number of processes)
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            pids = [self.pid] + _descendants(self.pid)
            vals = [_read_pss_rss(p) for p in pids]
            if vals[0][0] > 0:
                self.samples.append((time.time(), sum(v[0] for v in vals), vals[0][0], sum(v[1] for v in vals),
                                     len(pids)))
            self._stop_event.wait(self.interval)

    def stop(self):
        self._stop_event.set()
        self.join()


# ================================================================================================== driver
def run_worker(kind: str, spec: dict, workdir: str, results_sub: str, tag: str, env_extra: dict,
               monitor: bool = False, idle_wait: float = 0.0) -> dict:
    logs = os.path.join(workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    spec = dict(spec, out=os.path.join(logs, f"{tag}.json"))
    spec_path = os.path.join(logs, f"{tag}.spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    if os.path.exists(spec["out"]):
        os.remove(spec["out"])
    env = dict(os.environ)
    env.update(nnunet_env(workdir, results_sub))
    env.update(env_extra)
    log_path = os.path.join(logs, f"{tag}.log")
    idle = wait_for_idle(idle_wait) if idle_wait > 0 else "no idle check"
    load_before = loadavg()
    busy0 = cpu_busy_seconds()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, HERE, "--_worker", kind, "--_spec", spec_path], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        mon = TreeMonitor(proc.pid) if monitor else None
        if mon:
            mon.start()
        _, status, usage = os.wait4(proc.pid, 0)  # usage includes the reaped data loader workers
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        if mon:
            mon.stop()
    wall = time.perf_counter() - t0
    own_cpu = usage.ru_utime + usage.ru_stime
    foreign = (cpu_busy_seconds() - busy0) - own_cpu
    if rc != 0 or not os.path.isfile(spec["out"]):
        with open(log_path) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"worker {tag} failed (exit code {rc}); log {log_path}:\n{tail}")
    with open(spec["out"]) as f:
        result = json.load(f)
    result["process_wall"] = wall
    result["loadavg_before"] = load_before
    result["loadavg_after"] = loadavg()
    result["idle_check"] = idle
    result["own_cpu_seconds"] = own_cpu
    result["foreign_cores"] = max(0.0, foreign) / wall  # other processes' mean CPU use during the run
    if mon:
        result["memory_samples"] = mon.samples
    return result


def print_profile_table(title: str, prof: dict, rounds: int, other: dict | None = None) -> None:
    stats = prof["stats"]
    print(f"\n  {title}")
    header = f"    {'component (exclusive time: its own, without wrapped callees)':<62} {'calls':>6} {'s':>8} {'s/round':>8}"
    if other is not None:
        header += f" {'vanilla s':>9} {'diff s':>8} {'diff/rnd':>8}"
    print(header)
    keys = sorted(set(stats) | (set(other) if other else set()),
                  key=lambda k: -(stats.get(k, [0, 0, 0])[2] - (other.get(k, [0, 0, 0])[2] if other else 0)))
    total = 0.0
    for k in keys:
        c, ex = stats.get(k, [0, 0.0, 0.0])[0], stats.get(k, [0, 0.0, 0.0])[2]
        total += ex
        line = f"    {k:<62} {c:>6} {ex:>8.2f} {ex / rounds:>8.3f}"
        if other is not None:
            oex = other.get(k, [0, 0.0, 0.0])[2]
            line += f" {oex:>9.2f} {ex - oex:>+8.2f} {(ex - oex) / rounds:>+8.3f}"
        print(line)
    line = f"    {'sum':<62} {'':>6} {total:>8.2f} {total / rounds:>8.3f}"
    if other is not None:
        ototal = sum(v[2] for v in other.values())
        line += f" {ototal:>9.2f} {total - ototal:>+8.2f} {(total - ototal) / rounds:>+8.3f}"
    print(line)


CATEGORIES = [
    ("training + validation compute (all steps at the steady-state step time)",
     ("train_step (compute)", "validation_step (compute)")),
    ("waiting for batches in steady state", ("data: wait for batch (steady)",)),
    ("data loader restarts (stop workers, fork workers, wait for 1st batch)",
     ("data: stop workers", "data: start workers (fork)", "data: wait for 1st batch after start",
      "fed release_dataloaders (rest)")),
    ("extra time of steps 1-5 after a data loader start (page faults after fork, CPU shared with new workers)",
     ("train_step (1st after a data loader start)", "validation_step (1st after a data loader start)",
      "train_step (2nd-5th after a data loader start)", "validation_step (2nd-5th after a data loader start)")),
    ("round state save/load (torch.save/torch.load of weights+optimizer+logger+RNG)",
     ("save_checkpoint [round state]", "fed save_round_state (rest)",
      "fed load_checkpoint (round state, torch.load)", "sim prune old round states")),
    ("nnU-Net per-epoch bookkeeping (checkpoint_best, progress.png, log prints, EMA)",
     ("save_checkpoint [best]", "save_checkpoint [latest]", "nnU-Net progress.png plot (per epoch)",
      "nnU-Net on_epoch_end (rest: EMA, logging)", "print_to_log_file", "print_to_log_file (fed wrapper)",
      "nnU-Net on_train_epoch_end", "nnU-Net on_validation_epoch_end (pseudo Dice)",
      "nnU-Net on_train_epoch_start (lr)", "nnU-Net on_validation_epoch_start", "nnU-Net on_epoch_start")),
    ("federation: parameter exchange + aggregation + server state",
     ("fed get_shared_arrays (state -> numpy copies)", "fed set_shared_arrays (numpy -> state)",
      "sim FedAvg.aggregate (rest: weighted sum)", "sim check_update (names, shapes, finite)",
      "sim save_server_state (global arrays)", "fed on_round_start (rest)", "fed on_round_end (rest)",
      "fed round_metrics", "fed train_round (rest)", "fed trainer.run_round (rest)",
      "sim SimulatedSite.run_round (rest)", "sim SimulatedSite.resume (RNG, optimizer state device)",
      "sim suspend (rest: RNG state, heap trim)",
      "sim metrics append", "sim metrics read", "sim metrics truncate")),
    ("federation metrics plot (federation_progress.png)", ("sim federation_progress.png plot",)),
    ("setup: trainer lookup/construction, network, data loaders, plans copies",
     ("vanilla get_trainer_from_args (lookup + __init__)", "sim prepare (checks, trainer lookup)",
      "sim trainer construction (plans, __init__)", "nnU-Net initialize (network, optimizer, loss)",
      "fed initialize (rest: FedProx hook)", "nnU-Net get_dataloaders (transforms, datasets)",
      "nnU-Net on_train_start (rest: unpack check, plans copy)", "fed on_train_start (rest: split)",
      "print_plans", "plot_network_architecture", "_save_debug_information",
      "nnU-Net get_tr_and_val_datasets (split)", "sim check_same_network", "sim make_strategy",
      "fed build_data_loaders (rest)")),
    ("finish: final checkpoints, global model", ("save_checkpoint [final]", "nnU-Net on_train_end (rest)",
                                                 "sim write_global_model")),
    ("unattributed (loops, small calls)", ("TOTAL (unattributed: loop, logger)",)),
]


def steady_step_seconds(*stats_list) -> dict:
    """Mean steady-state step time (steps >= 6 after a data loader start), from the first arm that has some."""
    out = {}
    for label in ("train_step", "validation_step"):
        for stats in stats_list:
            c, _, ex, _ = stats.get(f"{label} (compute)", [0, 0.0, 0.0, 0])
            if c:
                out[label] = ex / c
                break
    return out


def categorise(stats: dict, steady: dict) -> dict:
    """Exclusive seconds per category; steps right after a data loader start count only their excess over
    the steady-state step time ``steady`` (the rest is compute, like any other step)."""
    out, used = {}, set()
    for name, keys in CATEGORIES:
        out[name] = sum(stats.get(k, [0, 0, 0])[2] for k in keys)
        used.update(keys)
    rest = {k: v[2] for k, v in stats.items() if k not in used}
    out["other"] = sum(rest.values())
    compute, after_start = CATEGORIES[0][0], CATEGORIES[3][0]
    for label in ("train_step", "validation_step"):
        for sub in ("1st after a data loader start", "2nd-5th after a data loader start"):
            c = stats.get(f"{label} ({sub})", [0])[0]
            moved = c * steady.get(label, 0.0)
            out[compute] += moved
            out[after_start] -= moved
    return out


def benchmark_time(args, ids, env_extra) -> list[tuple]:
    K, R, N, V = args.sites, args.rounds, args.local_steps, args.val_steps
    spec = {"site_ids": ids[:K], "sites": K, "rounds": R, "local_steps": N, "val_steps": V}
    print(f"\n=== time: K={K} sites, R={R} rounds, N={N} local steps, V={V} val steps per site-round ===")
    print(f"vanilla : nnUNetTrainer on site {ids[0]}, num_epochs={R}, num_iterations_per_epoch={K * N}, "
          f"num_val_iterations_per_epoch={K * V} -> {R * K * N} train + {R * K * V} val iterations")
    print(f"simulate: {K} sites x {R} rounds x {N} local steps (+{V} val steps) -> {R * K * N} train + "
          f"{R * K * V} val iterations")
    print("each timing covers (in a fresh subprocess, after imports): trainer class lookup + trainer "
          "construction + network/optimizer + data loader start-up + training + validation passes + per-epoch "
          "checkpoint_best/progress.png + final checkpoint (+ for simulate: per-round state save/load, data "
          "loader stop/restart, aggregation, server state, federation plot, global model). No final "
          "validation (nnU-Net's sliding-window validation) in either arm.")
    pairs = []
    for rep in range(args.repeats):
        order = ["vanilla", "federated"] if rep % 2 == 0 else ["federated", "vanilla"]
        res = {}
        for kind in order:
            sub = "results_vanilla" if kind == "vanilla" else "results_fed"
            for attempt in range(args.retries + 1):
                r = run_worker(kind, spec, args.workdir, sub, f"time_{kind}_rep{rep}", env_extra,
                               idle_wait=args.idle_wait)
                r["contended"] = r["foreign_cores"] > args.max_foreign
                print(f"  repeat {rep + 1}/{args.repeats} {kind:<9}: {r['seconds']:8.2f} s timed "
                      f"({r['process_wall']:.2f} s incl. interpreter start + imports; torch threads "
                      f"{r['torch_threads']}; {r['own_cpu_seconds']:.0f} CPU-s own incl. data loader workers; "
                      f"before: {r['idle_check']}; other processes used {r['foreign_cores']:.2f} cores on "
                      f"average during the run{'  -> CONTENDED' if r['contended'] else ''})", flush=True)
                if not r["contended"]:
                    break
                if attempt < args.retries:
                    print("    (discarded: other processes competed for the CPUs; running it again)")
            res[kind] = r
        ratio = res["federated"]["seconds"] / res["vanilla"]["seconds"]
        cpu_ratio = res["federated"]["own_cpu_seconds"] / res["vanilla"]["own_cpu_seconds"]
        print(f"  repeat {rep + 1}/{args.repeats} ratio simulate / vanilla = {ratio:.3f} (CPU time ratio "
              f"{cpu_ratio:.3f})")
        pairs.append((res["vanilla"], res["federated"], ratio))
    ratios = [p[2] for p in pairs]
    med = statistics.median(ratios)
    clean = [p[2] for p in pairs if not (p[0]["contended"] or p[1]["contended"])]
    cpu = statistics.median(p[1]["own_cpu_seconds"] / p[0]["own_cpu_seconds"] for p in pairs)
    print(f"\nmeasurements (s): vanilla {[round(p[0]['seconds'], 2) for p in pairs]}, "
          f"simulate {[round(p[1]['seconds'], 2) for p in pairs]}; ratios {[round(r, 3) for r in ratios]}"
          f"{'' if len(clean) == len(pairs) else f'; without contended repeats: {[round(r, 3) for r in clean]}'}")
    print(f"CPU time (main + data loader workers) ratio, median: {cpu:.2f}")
    print(f"time ratio (simulation / vanilla) for K={K}: {med:.2f} (target <= 1.10)"
          f"{'' if med <= 1.10 else '  -> ABOVE TARGET'}"
          f"{'' if len(clean) == len(pairs) else '  [some measurements were contended, see above]'}")
    return pairs


def print_breakdown(args, pairs) -> None:
    K, R, N = args.sites, args.rounds, args.local_steps
    # the pair whose ratio is the median (lower median for an even count)
    van, fed, _ = sorted(pairs, key=lambda p: p[2])[(len(pairs) - 1) // 2]
    print(f"\n=== where the time goes (repeat with the median ratio; per round = / {R}) ===")
    vs, fs = van["profile"]["stats"], fed["profile"]["stats"]

    def mean_ms(stats, key):
        c, _, ex, faults = stats.get(key, [0, 0.0, 0.0, 0])
        return f"{1000 * ex / c:7.1f} ms {faults / c:7.0f} faults x {c:<4}" if c else f"{'-':^32}"

    print(f"  {'step kind':<52}       vanilla: mean time, minor page faults      simulate")
    for label in ("train_step", "validation_step"):
        for sub in ("compute", "1st after a data loader start", "2nd-5th after a data loader start"):
            key = f"{label} ({sub})"
            print(f"  {key:<52} {mean_ms(vs, key)}  {mean_ms(fs, key)}")
    steady = steady_step_seconds(vs, fs)
    cv, cf = categorise(vs, steady), categorise(fs, steady)
    w = max(len(n) for n in cv)
    print(f"\n  {'category':<{w}} {'vanilla s':>9} {'simulate s':>10} {'diff s':>8} {'diff/round':>10}")
    for name in cv:
        if abs(cv[name]) < 0.005 and abs(cf[name]) < 0.005:
            continue
        print(f"  {name:<{w}} {cv[name]:>9.2f} {cf[name]:>10.2f} {cf[name] - cv[name]:>+8.2f} "
              f"{(cf[name] - cv[name]) / R:>+10.3f}")
    print(f"  {'total (timed)':<{w}} {van['seconds']:>9.2f} {fed['seconds']:>10.2f} "
          f"{fed['seconds'] - van['seconds']:>+8.2f} {(fed['seconds'] - van['seconds']) / R:>+10.3f}")
    extra = (fed["seconds"] - van["seconds"])
    compute = cf[CATEGORIES[0][0]] - cv[CATEGORIES[0][0]]
    print(f"  -> extra time of simulate: {extra:+.2f} s = {extra / R:+.2f} s per round = "
          f"{extra / (R * K):+.2f} s per site-round; of which train/val compute differs by {compute:+.2f} s "
          f"(noise / CPU contention, not overhead)"
          f"{'' if 'train_step (compute)' in fs else '; simulate had no steady-state steps (N <= 5): vanilla step time used'}")

    sv, sf = vs.get("train_step (compute)"), fs.get("train_step (compute)")
    if sv and sf and sv[3] / sv[0] > 4 * max(1.0, sf[3] / sf[0]) and sv[3] / sv[0] > 1000:
        print(f"  note: a steady-state train_step takes {sv[3] / sv[0]:.0f} minor page faults in vanilla but "
              f"{sf[3] / sf[0]:.0f} in simulate: glibc's dynamic mmap threshold hands the activations back to the "
              f"kernel after every vanilla step, while simulate's larger frees have raised the threshold. Not "
              f"federation overhead: run both arms with MALLOC_MMAP_THRESHOLD_=33554432 "
              f"MALLOC_TRIM_THRESHOLD_=268435456 to remove it from both.")

    # per-round records
    print("\n  simulate per round (federation_metrics.jsonl): round wall time (all sites + aggregation) vs "
          "the sites' nnU-Net epoch time (epoch_start..epoch_end timestamps: train+val steps incl. the data "
          "loader restart inside the first next())")
    for rec in fed["rounds"]:
        site_s = [m["seconds"] for m in rec["sites"].values()]
        print(f"    round {rec['round'] + 1}: wall {rec['seconds']:7.2f} s, sum of site epochs {sum(site_s):7.2f} s "
              f"({', '.join(f'{s:.2f}' for s in site_s)}), outside site epochs {rec['seconds'] - sum(site_s):6.2f} s")
    ve = van["epoch_seconds"]
    print(f"    vanilla epochs (same timestamps, {K}x the steps each): "
          f"{', '.join(f'{s:.2f}' for s in ve)} s; sum {sum(ve):.2f} s")

    print_profile_table("simulate, per component, against vanilla", fed["profile"], R, other=vs)
    if fed["profile"].get("not_instrumented"):
        print(f"  (not found in this version of the project, not instrumented: {fed['profile']['not_instrumented']})")


def benchmark_memory(args, ids, env_extra) -> None:
    print(f"\n=== peak memory: simulate, R={args.mem_rounds} rounds, N={args.mem_local_steps} local steps, "
          f"V={args.mem_val_steps} val steps, K in {args.memory_sites} ===")
    print("  PSS = proportional set size of the main process + its data loader workers, sampled every 0.2 s "
          "from /proc/<pid>/smaps_rollup; ru_maxrss = the main process's own peak RSS")
    rows = []
    weights = None
    for K in args.memory_sites:
        spec = {"site_ids": ids[:K], "sites": K, "rounds": args.mem_rounds, "local_steps": args.mem_local_steps,
                "val_steps": args.mem_val_steps}
        r = run_worker("federated", spec, args.workdir, f"results_mem_{K}", f"memory_K{K}", env_extra, monitor=True,
                       idle_wait=min(args.idle_wait, 60))
        s = r["memory_samples"]
        if not s:
            raise RuntimeError("no memory samples")
        fc = r["profile"]["first_call_wall"]
        first_round = fc.get("sim SimulatedSite.run_round (rest)")
        first_final = fc.get("save_checkpoint [final]")
        setup = [x for x in s if first_round is None or x[0] < first_round]
        rounds = [x for x in s if first_round and first_final and first_round <= x[0] < first_final]
        final = [x for x in s if first_final and x[0] >= first_final]
        peak = max(s, key=lambda x: x[1])
        row = {"K": K, "peak_tree_pss": peak[1], "peak_main_pss": max(x[2] for x in s),
               "peak_tree_rss": max(x[3] for x in s), "max_procs": max(x[4] for x in s),
               "setup_tree_pss": max((x[1] for x in setup), default=0),
               "rounds_tree_pss": max((x[1] for x in rounds), default=0),
               "final_tree_pss": max((x[1] for x in final), default=0),
               "garbage": r.get("garbage_at_end", {}),
               "ru_maxrss_main": r["ru_maxrss_self_kib"] * 1024,
               "ru_maxrss_children_max": r["ru_maxrss_children_kib"] * 1024, "samples": len(s),
               "seconds": r["seconds"], "holdings": r["suspended_site_holdings"]}
        weights, exchanged = r["weights_bytes"], r["exchanged_bytes"]
        n_unique, n_exchanged = r["num_unique_tensors"], r["num_exchanged_arrays"]
        with open(os.path.join(args.workdir, "logs", f"memory_K{K}.samples.json"), "w") as f:
            json.dump({"columns": ["wall", "tree_pss", "main_pss", "tree_rss", "processes"], "samples": s,
                       "first_round_wall": first_round}, f)
        rows.append(row)
        h = next(iter(row["holdings"].values()), {})
        print(f"  K={K}: peak PSS tree {fmt_mib(row['peak_tree_pss'])} (main process {fmt_mib(row['peak_main_pss'])}, "
              f"up to {row['max_procs']} processes), peak tree RSS {fmt_mib(row['peak_tree_rss'])}, "
              f"PSS after setup of the {K} trainers {fmt_mib(row['setup_tree_pss'])}; ru_maxrss main "
              f"{fmt_mib(row['ru_maxrss_main'])}, largest worker ru_maxrss {fmt_mib(row['ru_maxrss_children_max'])} "
              f"[{row['samples']} samples, {row['seconds']:.1f} s; other processes {r['foreign_cores']:.2f} cores]")
        print(f"        peak tree PSS by phase: setup {fmt_mib(row['setup_tree_pss'])}, rounds "
              f"{fmt_mib(row['rounds_tree_pss'])}, final checkpoints {fmt_mib(row['final_tree_pss'])}; cyclic "
              f"garbage found by gc.collect() at the end: {row['garbage'].get('objects', '?')} objects, "
              f"{fmt_mib(row['garbage'].get('rss_freed', 0))} RSS freed")
        if h:
            print(f"        a suspended site holds: weights {fmt_mib(h['weights'])} (of which in storage no other site "
                  f"uses {fmt_mib(h.get('weights_own', h['weights']))}), gradients {fmt_mib(h['grads'])}, "
                  f"optimizer state {fmt_mib(h['optimizer_state'])}, live data loader workers "
                  f"{h['dataloader_workers_alive']}")
    print(f"  one copy of the network weights (parameter bytes, each tensor once, fp32): {fmt_mib(weights)} "
          f"({n_unique} tensors); one set of exchanged/global arrays (get_shared_arrays: one name per "
          f"tensor): {fmt_mib(exchanged)} ({n_exchanged} arrays)")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        dk = b["K"] - a["K"]
        for label, key in [("peak PSS (tree)", "peak_tree_pss"), ("peak PSS (main)", "peak_main_pss"),
                           ("ru_maxrss (main)", "ru_maxrss_main"), ("PSS after setup", "setup_tree_pss"),
                           ("peak PSS rounds", "rounds_tree_pss"), ("peak PSS final", "final_tree_pss")]:
            per = (b[key] - a[key]) / dk
            print(f"  {label:<17}: K={a['K']} -> K={b['K']}: {fmt_mib(b[key] - a[key])} more, "
                  f"{fmt_mib(per)} per extra site = {per / weights:5.2f} x the weights")
        per = (b["peak_tree_pss"] - a["peak_tree_pss"]) / dk
        verdict = "within" if per <= 1.25 * weights else "ABOVE"
        print(f"  target: growth per extra site <= ~1 copy of the weights ({fmt_mib(weights)}): measured "
              f"{fmt_mib(per)} per site -> {verdict} target")
    K = max(args.memory_sites)
    r = run_worker("held", {"site_ids": ids[:K], "rounds": 2, "local_steps": args.mem_local_steps,
                            "val_steps": args.mem_val_steps}, args.workdir, "results_held", f"held_K{K}",
                   {**env_extra, "nnUNet_n_proc_DA": "0"})
    rd = r["readings"]

    def steps(xs):
        return [b - a for a, b in zip(xs, xs[1:])]

    setup, first, second = steps(rd["setup"]), steps(rd["round0"]), steps(rd["round1"])
    print(f"  what a site keeps between turns (K={K}, augmentation in the main process, main process RSS after "
          f"each site, garbage collected, heap trimmed):")
    print(f"    its set-up: {', '.join(f'{x / 2**20:.1f}' for x in setup)} MiB (the first site builds the one copy "
          f"of the shared weights)")
    print(f"    its first turn: {', '.join(f'{x / 2**20:.1f}' for x in first)} MiB (the first turn of the first "
          f"site also allocates the training buffers every turn reuses)")
    print(f"    its second turn: {', '.join(f'{x / 2**20:.1f}' for x in second)} MiB")
    held = statistics.median(setup[1:] or setup) + statistics.median(first[1:] or first)
    print(f"    -> per extra site (median set-up + first turn of sites 2..K): {fmt_mib(held)} = "
          f"{held / weights:.2f} x the weights")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, default=3, help="K for the timing comparison (default 3)")
    p.add_argument("--rounds", type=int, default=None, help="R (default 4, --quick 2)")
    p.add_argument("--local-steps", type=int, default=None, help="N local steps per site-round (default 50 as SimulationConfig, --quick 5)")
    p.add_argument("--val-steps", type=int, default=None, help="V val steps per site-round (default 10 as SimulationConfig, --quick 2)")
    p.add_argument("--repeats", type=int, default=None, help="timing repeats, arms alternate (default 2, --quick 1)")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"default {DEFAULT_WORKDIR}")
    p.add_argument("--memory-sites", type=int, nargs="*", default=[2, 8], help="K values for peak memory (default 2 8; give none to skip)")
    p.add_argument("--mem-rounds", type=int, default=None, help="rounds of the memory runs (default 2, --quick 1)")
    p.add_argument("--mem-local-steps", type=int, default=None, help="local steps of the memory runs (default 5, --quick 3)")
    p.add_argument("--mem-val-steps", type=int, default=None, help="val steps of the memory runs (default 1, --quick 1)")
    p.add_argument("--skip-time", action="store_true", help="only the memory measurement")
    p.add_argument("--max-foreign", type=float, default=0.3,
                   help="a timing during which other processes used more than this many cores on average is "
                        "flagged as contended and run again (default 0.3)")
    p.add_argument("--retries", type=int, default=1, help="re-runs of a contended timing (default 1)")
    p.add_argument("--idle-wait", type=float, default=None,
                   help="before each run wait up to this many s for other processes to go quiet "
                        "(default 300, --quick 30; 0: no check)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny R/N, one repeat")
    p.add_argument("--_worker", choices=["vanilla", "federated", "held"], help=argparse.SUPPRESS)
    p.add_argument("--_spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker:  # the nnUNet_* variables come from the parent's env
        worker_main(args._worker, args._spec)
        return

    q = args.quick
    defaults = {"rounds": (4, 2), "local_steps": (50, 5), "val_steps": (10, 2), "repeats": (2, 1),
                "mem_rounds": (2, 1), "mem_local_steps": (5, 3), "mem_val_steps": (1, 1),
                "idle_wait": (300.0, 30.0)}
    for k, (full, quick) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if q else full)
    if args.sites < 1 or args.rounds < 1 or args.local_steps < 1 or args.val_steps < 1 or args.repeats < 1:
        p.error("--sites, --rounds, --local-steps, --val-steps and --repeats must be >= 1")
    args.workdir = os.path.abspath(args.workdir)
    os.makedirs(args.workdir, exist_ok=True)
    set_nnunet_env(args.workdir)  # before anything imports nnunetv2

    t_start = time.perf_counter()
    n_da = os.environ.get("nnUNet_n_proc_DA")
    if n_da is None:
        n_da = str(default_n_proc_da())
        source = "nnU-Net's default for this machine"
    else:
        source = "from the environment"
    import multiprocessing

    import torch

    print(f"round_overhead: workdir {args.workdir}; {os.cpu_count()} CPUs; torch {torch.__version__}; "
          f"nnUNet_n_proc_DA={n_da} ({source}; train loader {n_da} workers, val loader "
          f"{max(1, int(n_da) // 2)}) in both arms; torch threads {multiprocessing.cpu_count()} in both arms; "
          f"load avg {loadavg()}")
    malloc_env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    if malloc_env:
        print(f"glibc malloc settings from the environment (both arms): {malloc_env}")
    need = max([args.sites] + list(args.memory_sites or []))
    ids = prepare_data(args.workdir, need)
    print("plans: " + describe_plans(ids[0]))
    env_extra = {"nnUNet_n_proc_DA": n_da}

    if not args.skip_time:
        pairs = benchmark_time(args, ids, env_extra)
        print_breakdown(args, pairs)
    if args.memory_sites:
        benchmark_memory(args, ids, env_extra)
    print(f"\nround_overhead: done in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

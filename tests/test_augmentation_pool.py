"""The simulation's one pool of augmentation workers, on nnU-Net's real data loaders and transforms."""
import contextlib
import os
import time

import numpy as np
import pytest
import torch


def _config(site_env, n_sites=2, trainer="nnUNetTrainerFedAvg", **kw):
    from nnunet_fed.federation.simulation import SimulationConfig

    return SimulationConfig(dataset_ids=site_env["ids"][:n_sites], configuration="2d", trainer=trainer,
                            device="cpu", progress=False, **kw)


def _training_keys(trainer):
    return set(trainer.do_split()[0])


def test_one_pool_serves_every_site_exactly_what_its_turn_needs(site_env, monkeypatch):
    """Sites get their batches from one set of workers that lives through the run: each site's batches come
    from its own training cases, a turn gets exactly the batches it asked for (none left over), and the
    workers are never restarted."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    from nnunet_fed.federation.augmentation_pool import PooledLoader
    from nnunet_fed.federation.simulation import prepare, start_sites

    cfg = _config(site_env, rounds=2, local_steps=3, val_steps=2)
    cls = prepare(cfg)
    with contextlib.ExitStack() as stack:
        sites = list(start_sites(cfg, cls, torch.device("cpu"), 0, stack))
        loaders = [(s.trainer.dataloader_train, s.trainer.dataloader_val) for s in sites]
        assert all(isinstance(dl, PooledLoader) for pair in loaders for dl in pair)
        pool = loaders[0][0].pool
        assert all(dl.pool is pool for pair in loaders for dl in pair)
        workers = list(pool._workers)
        assert len(workers) == 3  # nnUNet_n_proc_DA=2: as many as nnU-Net starts for one trainer (2 + 1)

        # batches come from the asking site's own cases
        for s in sites:
            s.trainer.dataloader_train.prefetch(2)
        for s in reversed(sites):  # asked for in one order, taken in the other
            for _ in range(2):
                batch = next(s.trainer.dataloader_train)
                assert set(batch["keys"]) <= _training_keys(s.trainer), s.name
                assert batch["data"].shape[0] == s.trainer.batch_size

        # rounds as simulate runs them: nothing is made that a turn does not use
        global_arrays = sites[0].trainer.get_shared_arrays()
        for r in range(cfg.rounds):
            for i, s in enumerate(sites):
                s.trainer.start_dataloaders()
                if (r, i) != (cfg.rounds - 1, len(sites) - 1):  # the next site's batches, made during this turn
                    sites[(i + 1) % len(sites)].trainer.start_dataloaders()
                update = s.run_round(r, global_arrays)
                assert update.metrics["local_steps"] == 3 and np.isfinite(update.metrics["train_loss"])
        time.sleep(0.5)
        for slot in range(len(pool.slots)):
            assert pool.pending(slot) == 0, pool.slots[slot]
            assert pool._requested[slot] == 0, pool.slots[slot]
            assert pool._queues[slot].empty() and pool._received[slot].empty(), pool.slots[slot]
        assert all(w.is_alive() for w in workers) and pool._workers == workers  # never restarted
        sites[0].trainer.dataloader_train.prefetch(4)  # batches still queued when the run ends
        time.sleep(1.0)
    assert not any(w.is_alive() for w in workers)  # the stack closed the pool, queued batches discarded


ORPHAN_SCRIPT = """
import itertools, os, sys, time
from nnunet_fed.federation.augmentation_pool import AugmentationPool
pool = AugmentationPool({"A": (itertools.count(), itertools.count())}, num_processes=2)
train, _ = pool.loaders_for("A")
assert next(train) is not None
print(" ".join(str(p.pid) for p in pool._workers), flush=True)
time.sleep(600)
"""


def test_workers_end_with_a_killed_simulation():
    """A simulation killed outright (no clean-up runs) leaves no augmentation workers behind."""
    import signal
    import subprocess
    import sys

    from nnunet_fed.deployment.launch import process_running

    proc = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(process_running(p) for p in pids):
        time.sleep(0.1)
    assert not any(process_running(p) for p in pids)


def test_a_failing_data_loader_names_its_site(site_env, monkeypatch):
    """An error inside a worker (here: a site's case that cannot be read) reaches the site that asked, named."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    from nnunet_fed.federation.augmentation_pool import AugmentationPool
    from nnunet_fed.federation.simulation import _make_trainer, prepare

    cfg = _config(site_env)
    cls = prepare(cfg)
    trainers = [_make_trainer(cfg, n, cls, torch.device("cpu")) for n in cfg.site_names]
    loaders = {t.site_name: t.build_data_loaders() for t in trainers}
    bad_site = cfg.site_names[1]

    def unreadable_case():
        raise OSError(f"{bad_site}/case_0007.b2nd: truncated file")

    loaders[bad_site][0].generate_train_batch = unreadable_case  # inherited by the workers through the fork
    pool = AugmentationPool(loaders, num_processes=2, num_cached=2)
    workers = list(pool._workers)
    try:
        good_train, _ = pool.loaders_for(cfg.site_names[0])
        assert "data" in next(good_train)
        bad_train, _ = pool.loaders_for(bad_site)
        with pytest.raises(RuntimeError, match=rf"site {bad_site}: making a train batch failed(.|\n)*truncated file"):
            next(bad_train)
        with pytest.raises(RuntimeError, match=rf"site {bad_site}"):  # and stays failed for everyone
            next(good_train)
    finally:
        pool.close()
    assert not any(w.is_alive() for w in workers)

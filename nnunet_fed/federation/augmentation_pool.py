"""One pool of augmentation worker processes serving every site of a simulation.

Under ``nnUNetv2_train`` a trainer has its own ``NonDetMultiThreadedAugmenter`` whose workers live as long as
the training. In a simulation the sites take turns, so per-site workers either wait idle (K sets of processes)
or are forked again for every turn; forked from a process that already holds networks and optimizer state,
every page the trainer then writes while they live is copied first, and restarting them empties their caches.

``AugmentationPool`` is forked once, before any site's network exists, with every site's nnU-Net data loaders
(the same ``nnUNetDataLoader`` objects and transforms nnU-Net builds, handed over by the fork, never pickled).
Each site gets two ``PooledLoader`` s (train, val) in place of its augmenters. A site asks ahead for the
batches its turn needs (``prefetch``); the workers make exactly those, oldest request first, so the next
site's batches are prepared while the current site trains, and nothing is left over when a turn ends.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import random
import threading
import time
import traceback
from contextlib import contextmanager
from queue import Empty, Full

import numpy as np
import torch
from batchgenerators.dataloading.data_loader import DataLoader
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import pin_memory_of_all_eligible_items_in_dict
from threadpoolctl import threadpool_limits

SPLITS = ("train", "val")


def pool_available() -> bool:
    """The pool hands the data loaders to its workers by forking (Linux); elsewhere sites keep nnU-Net's augmenters."""
    return "fork" in multiprocessing.get_all_start_methods()


@contextmanager
def augmentation_in_this_process():
    """Within: nnU-Net builds its data loaders with augmentation in the calling process (nnUNet_n_proc_DA=0)."""
    old = os.environ.get("nnUNet_n_proc_DA")
    os.environ["nnUNet_n_proc_DA"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("nnUNet_n_proc_DA", None)
        else:
            os.environ["nnUNet_n_proc_DA"] = old


def _claim(requested, order, lock, queues):
    """The slot with the oldest outstanding request whose queue has room; its request count is taken by one."""
    with lock:
        best = None
        for s in range(len(queues)):
            if requested[s] > 0 and not queues[s].full() and (best is None or order[s] < order[best]):
                best = s
        if best is not None:
            requested[best] -= 1
        return best


def _work(loaders, requested, order, lock, queues, abort, errors, worker_id, seed, wait_time, parent):
    torch.set_num_threads(1)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    with threadpool_limits(1, None):
        for loader in loaders:
            if hasattr(loader, "set_thread_id"):
                loader.set_thread_id(worker_id)
        while not abort.is_set() and os.getppid() == parent:  # a killed simulation leaves no workers behind
            slot = _claim(requested, order, lock, queues)
            if slot is None:
                time.sleep(wait_time)
                continue
            try:
                item = next(loaders[slot])
            except Exception:  # noqa: BLE001 (reported to the site that asked, by name)
                errors.put((slot, traceback.format_exc()))
                abort.set()
                return
            while not abort.is_set() and os.getppid() == parent:
                try:
                    queues[slot].put(item, timeout=0.1)
                    break
                except Full:
                    continue


def _discard_all(q) -> None:
    """Empty a queue without using what is in it (a batch whose worker has exited cannot be unpickled: its
    tensors' shared memory went with the worker; the bytes are read off the pipe all the same)."""
    while True:
        try:
            q.get_nowait()
        except Empty:
            return
        except Exception:  # noqa: BLE001 (see above)
            continue


class AugmentationPool:
    """Augmentation workers for every site, forked once (see the module docstring).

    ``loaders`` maps a site name to its (train, val) nnU-Net data loaders, transforms included. ``num_processes``
    workers serve all sites (nnU-Net uses nnUNet_n_proc_DA for training plus half as many for validation);
    every queue holds at most ``num_cached`` finished batches."""

    def __init__(self, loaders: dict, num_processes: int, num_cached: int = 6, seed: int = 0,
                 pin_memory: bool = False, wait_time: float = 0.002):
        if num_processes < 1:
            raise ValueError(f"an augmentation pool needs at least one worker, got {num_processes}")
        ctx = multiprocessing.get_context("fork")
        self.slots = [(site, split) for site in loaders for split in SPLITS]
        flat = [loaders[site][SPLITS.index(split)] for site, split in self.slots]
        for loader in flat:
            if isinstance(loader, DataLoader):
                loader.was_initialized = False  # each worker starts its own pass (as NonDetMultiThreadedAugmenter)
        self.num_cached = int(num_cached)
        self.pin_memory = pin_memory
        self._requested = ctx.RawArray("q", len(self.slots))  # batches still to make, per slot
        self._order = ctx.RawArray("q", len(self.slots))  # when the slot's outstanding request was made
        self._lock = ctx.Lock()
        self._queues = [ctx.Queue(self.num_cached) for _ in self.slots]
        self._abort = ctx.Event()
        self._errors = ctx.Queue()
        self._pending = [0] * len(self.slots)  # requested and not yet taken by the site (this process's view)
        self._received = [queue.Queue() for _ in self.slots]  # batches off the pipe, waiting for their site
        self._receivers: list[threading.Thread | None] = [None] * len(self.slots)
        self._closing = False
        self._receive_error: str | None = None
        self._clock = 0
        self._failure: str | None = None
        self._workers = []
        for i in range(int(num_processes)):
            p = ctx.Process(target=_work, name=f"nnunet_fed-augmentation-{i}", daemon=True,
                            args=(flat, self._requested, self._order, self._lock, self._queues, self._abort,
                                  self._errors, i, (int(seed) * 1000003 + i) % 2 ** 31, wait_time, os.getpid()))
            p.start()
            self._workers.append(p)

    # ------------------------------------------------------------------ per site
    def loaders_for(self, site: str) -> tuple["PooledLoader", "PooledLoader"]:
        return tuple(PooledLoader(self, self.slots.index((site, split)), chunk)
                     for split, chunk in zip(SPLITS, (self.num_cached, max(1, self.num_cached // 2))))

    def request(self, slot: int, n: int) -> None:
        if n <= 0:
            return
        if self._receivers[slot] is None:
            self._receivers[slot] = threading.Thread(target=self._receive, args=(slot,), daemon=True,
                                                     name=f"nnunet_fed-batches-{'-'.join(self.slots[slot])}")
            self._receivers[slot].start()
        with self._lock:
            if self._requested[slot] <= 0:
                self._clock += 1
                self._order[slot] = self._clock
            self._requested[slot] += n
        self._pending[slot] += n

    def cancel(self, slot: int) -> None:
        """Drop the requests not yet started; batches already being made still arrive (and are used next time)."""
        with self._lock:
            dropped = max(0, self._requested[slot])
            self._requested[slot] = 0
        self._pending[slot] -= dropped

    def pending(self, slot: int) -> int:
        return self._pending[slot]

    def get(self, slot: int):
        while True:
            if self._failure is not None or self._abort.is_set():  # a failed pool fails for every site
                self._raise_if_failed(slot)
            try:
                item = self._received[slot].get(timeout=0.1)
            except Empty:
                self._raise_if_failed(slot)
                continue
            self._pending[slot] -= 1
            return item

    def _receive(self, slot: int) -> None:
        """Thread: take the slot's batches off the pipe as they come (unpickling a batch maps its tensors' shared
        memory, a few ms), so that the trainer finds them ready, as nnU-Net's augmenter's results thread does."""
        source, target = self._queues[slot], self._received[slot]
        while not self._closing:
            try:
                item = source.get(timeout=0.1)
            except Empty:
                continue
            except Exception as e:  # noqa: BLE001 (reported to the site that asked)
                if not self._abort.is_set():  # else a worker failed first: its error is the one to report
                    site, split = self.slots[slot]
                    self._receive_error = (f"site {site}: receiving a {split} batch from an augmentation worker "
                                           f"failed: {e!r}")
                    self._abort.set()
                return
            if self.pin_memory and torch.cuda.is_available():
                item = pin_memory_of_all_eligible_items_in_dict(item)
            target.put(item)

    def _raise_if_failed(self, slot: int) -> None:
        if self._failure is None and self._abort.is_set():
            try:
                failed_slot, tb = self._errors.get(timeout=1.0)
                site, split = self.slots[failed_slot]
                self._failure = (f"site {site}: making a {split} batch failed in an augmentation worker "
                                 f"(its data loader or transforms):\n{tb}")
            except Empty:
                self._failure = self._receive_error or "the augmentation workers were stopped"
        if self._failure is None and not all(p.is_alive() for p in self._workers):
            self._abort.set()
            codes = [p.exitcode for p in self._workers]
            self._failure = f"an augmentation worker died (exit codes {codes}; out of memory?)"
        if self._failure is not None:
            raise RuntimeError(self._failure)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (idempotent)."""
        if not self._workers:
            return
        self._abort.set()
        self._closing = True
        for t in self._receivers:
            if t is not None:
                t.join(timeout=1.0)
        self._received = [queue.Queue() for _ in self.slots]
        deadline = time.time() + timeout
        while time.time() < deadline and any(p.is_alive() for p in self._workers):
            for q in self._queues:  # a worker's queue feeder must flush before it can exit
                _discard_all(q)
            time.sleep(0.01)
        for p in self._workers:
            if p.is_alive():
                p.terminate()
            p.join(timeout=1.0)
        for q in self._queues + [self._errors]:
            q.close()
            q.join_thread()
        self._workers = []

    def __del__(self):
        try:
            self.close(timeout=2.0)
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass


class PooledLoader:
    """A site's train or val batches from an ``AugmentationPool``: iterate it like nnU-Net's augmenters.
    ``prefetch(n)`` asks for the next ``n`` batches ahead of time; a batch asked for without one comes from
    a request of ``chunk`` batches."""

    def __init__(self, pool: AugmentationPool, slot: int, chunk: int):
        self.pool, self.slot, self.chunk = pool, slot, int(chunk)

    def prefetch(self, n: int) -> None:
        """Have ``n`` batches made or on their way (counting those already asked for)."""
        self.pool.request(self.slot, int(n) - self.pool.pending(self.slot))

    def cancel(self) -> None:
        self.pool.cancel(self.slot)

    def __iter__(self):
        return self

    def __next__(self):
        if self.pool.pending(self.slot) <= 0:
            self.pool.request(self.slot, self.chunk)
        return self.pool.get(self.slot)

    next = __next__

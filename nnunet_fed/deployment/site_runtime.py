"""One site of a deployed federation: its nnU-Net trainer, answering the server's messages.

:func:`handle` answers one message's content (setup, train, finish). It runs in the site worker that
``nnunet_fed site join`` keeps alive (:mod:`nnunet_fed.deployment.site_worker`), so the trainer, its network,
optimizer and data loaders stay in memory from one round to the next; or, where no worker is running, in the
ClientApp process Flower starts for the message (:mod:`nnunet_fed.deployment.client_app`), which then rebuilds
the trainer exactly as ``nnunet_fed simulate`` resumes a site: nnU-Net's trainer, ``on_train_start()``, then the
site's round state file (optimizer, learning-rate position, logger, RNG streams, and its own network weights,
local parameters included). The round state files stay the source of truth either way: a trainer kept in memory
is used only when it is the one that wrote the newest state before the round. The cost is measured in every
round's metrics (``process_seconds``: ClientApp process start to message handling; ``setup_seconds``: trainer
construction and state loading, 0 for a kept trainer) next to the training time (``seconds``).

Site settings come from the SuperNode's node config (``dataset``, ``configuration``, ``trainer``, ``device``),
the federation's from the run config; a site refuses a run whose trainer or configuration differ from its own.

Several federations can use one site with the same trainer and plans (nnU-Net's one results folder per dataset,
trainer, plans and configuration). Each message names its federation (``federation``: name and a random id made at
the server's first start); the site keeps that federation's round states in ``federated_rounds/<federation>/``
and never continues from another's. The folder's outputs (final checkpoint, privacy report and ledger, logs)
belong to the federation that last trained there (``federation.json``): when another one starts training, they
are moved to ``earlier_federations/<federation>/`` and that federation's own earlier outputs, if any, come back,
so nothing one federation wrote is overwritten by another.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time

import numpy as np
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from nnunet_fed import sites as site_checks
from nnunet_fed.deployment import messages as msgs
from nnunet_fed.deployment.runconfig import RunSettings
from nnunet_fed.deployment.secure_aggregation import SECURE, secure_update
from nnunet_fed.deployment.site_worker import FINISH, SETUP, TRAIN
from nnunet_fed.federation.simulation import (ROUND_STATE_DIR, SimulationConfig, _make_trainer, prune_round_states,
                                             round_state_file, round_state_files, seed_everything, site_seed)
from nnunet_fed.federation.trainer import RELEASED_UPDATE_KEY
from nnunet_fed.federation.update import Update, shared_dataset_json

FEDERATED_LOG = "training_log_federated.txt"
FEDERATION_RECORD = "federation.json"  # which federation the outputs in a site's results folder belong to
EARLIER_FEDERATIONS = "earlier_federations"


def _folder_name(federation: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", federation)[:120] or "unnamed"


def arrays_digest(arrays) -> str:
    """A digest of the global arrays a round starts from (names, dtypes, shapes, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays or {}):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class DeployedSite:
    """One site's trainer for one message, rebuilt from the site's round state files."""

    def __init__(self, node_config: dict, run: RunSettings):
        self.run = run
        dataset = str(node_config.get("dataset", "")).strip()
        if not dataset:
            raise site_checks.FederationSetupError("this SuperNode has no 'dataset' in its node config "
                                                   "(start it with nnunet_fed site join -d <id>)")
        for key, value in (("configuration", run.configuration), ("trainer", run.trainer)):
            mine = str(node_config.get(key, value))
            if mine != value:
                raise site_checks.FederationSetupError(
                    f"site {dataset}: the run asks for {key} {value!r}, this site joined with {mine!r}")
        site_checks.require_nnunet_paths()
        self.trainer_cls = site_checks.find_trainer(run.trainer)
        self.trainer_cls.resolve_options(run.trainer_options)
        self.name = site_checks.dataset_name(dataset)
        site_checks.check_preprocessed(self.name, run.plans, run.configuration)
        with open(os.path.join(os.environ["nnUNet_preprocessed"], self.name, run.plans + ".json")) as f:
            plans = json.load(f)
        # simulate's per-site checks with the run's trainer options and fold (labels are checked at site join);
        # a failure is the setup reply's error, which the server logs as why the site cannot take part
        self.trainer_cls.check_site_setup(self.name, plans, run.trainer_options)
        self.trainer_cls.check_site_split(self.name, plans, run.configuration, run.fold_value())
        device = str(node_config.get("device", "") or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.device = torch.device(device)
        self.cfg = SimulationConfig(dataset_ids=[self.name], configuration=run.configuration, trainer=run.trainer,
                                    rounds=run.rounds, local_steps=run.local_steps, val_steps=run.val_steps,
                                    fold=run.fold_value(), plans_identifier=run.plans, device=device,
                                    fedprox_mu=run.fedprox_mu, seed=run.seed, progress=True,
                                    trainer_options=dict(run.trainer_options), site_names=[self.name])
        self.trainer = None
        self.federation = ""  # set from each train/finish message (empty: a server that does not name it)
        self.kept = None  # (federation, round state file, its mtime) the trainer in memory wrote last
        self.timings = {}

    # ------------------------------------------------------------------ state files
    def site_folder(self) -> str:
        """The site's nnU-Net results folder of this trainer, plans, configuration and fold."""
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        return get_output_folder(self.name, self.run.trainer, self.run.plans, self.run.configuration,
                                 self.run.fold_value())

    def state_dir(self) -> str:
        root = os.path.join(self.site_folder(), ROUND_STATE_DIR)
        return os.path.join(root, _folder_name(self.federation)) if self.federation else root

    def claim_folder(self) -> None:
        """Before this federation writes in the site's results folder: if another federation's outputs are there,
        move them to ``earlier_federations/<it>/`` and bring this federation's own back from there."""
        folder = self.site_folder()
        os.makedirs(folder, exist_ok=True)
        record = os.path.join(folder, FEDERATION_RECORD)
        owner = None
        if os.path.isfile(record):
            with open(record) as f:
                owner = json.load(f).get("federation")
        if owner == self.federation:
            return
        keep = {ROUND_STATE_DIR, EARLIER_FEDERATIONS, FEDERATION_RECORD}
        outputs = [e for e in os.listdir(folder) if e not in keep]
        if outputs:
            dest = os.path.join(folder, EARLIER_FEDERATIONS,
                                _folder_name(owner) if owner else time.strftime("unrecorded_%Y%m%d_%H%M%S"))
            while os.path.exists(dest):
                dest += "_"
            os.makedirs(dest)
            for e in outputs:
                os.replace(os.path.join(folder, e), os.path.join(dest, e))
            print(f"site {self.name}: {folder} held the results of "
                  f"{'federation ' + owner if owner else 'an earlier run'}: moved to {dest}", file=sys.stderr,
                  flush=True)
        mine = os.path.join(folder, EARLIER_FEDERATIONS, _folder_name(self.federation))
        if self.federation and os.path.isdir(mine):
            for e in os.listdir(mine):
                os.replace(os.path.join(mine, e), os.path.join(folder, e))
            os.rmdir(mine)
        with open(record + ".tmp", "w") as f:
            json.dump({"federation": self.federation}, f)
        os.replace(record + ".tmp", record)

    def state_file(self, round_index: int) -> str:
        return round_state_file(self.state_dir(), round_index)

    def latest_state_before(self, round_index: int) -> tuple[int, str] | None:
        """The newest round state written before ``round_index`` (a later one is from an uncommitted attempt)."""
        found = [(k, f) for k, f in round_state_files(self.state_dir()) if k < round_index]
        return found[-1] if found else None

    def prune_states(self, keep_from: int) -> None:
        prune_round_states(self.state_dir(), keep_from)

    def can_continue(self, round_index: int) -> bool:
        """Whether the trainer in memory may train ``round_index``: it wrote the newest state before that round,
        for this federation, and nothing has replaced that file since (otherwise the site rebuilds from disk)."""
        if self.trainer is None or self.kept is None or self.trainer.current_epoch != round_index:
            return False
        federation, path, mtime = self.kept
        newest = self.latest_state_before(round_index)
        return (federation == self.federation and newest is not None and newest[1] == path
                and os.path.isfile(path) and os.path.getmtime(path) == mtime)

    # ------------------------------------------------------------------ trainer
    def build(self, round_index: int) -> float:
        """Construct the trainer as nnUNetv2_train does and restore the site's state before ``round_index``.

        Returns the seconds this took (the cost of not keeping the trainer alive between rounds)."""
        t0 = time.time()
        previous = None
        self.trainer = None
        self.claim_folder()
        seed_everything(site_seed(self.run.seed, self.name))
        if self.device.type == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
        t = _make_trainer(self.cfg, self.name, self.trainer_cls, self.device)
        self._use_one_log_file(t)
        self.trainer = t
        previous = self.latest_state_before(round_index)
        attempt = self.state_file(round_index)
        # a continued run reads back what the site released once (e.g. a DP site's noisy case count)
        t.resuming = previous is not None or os.path.isfile(attempt)
        t.on_train_start()  # network, optimizer, data loaders (nnU-Net's own)
        if previous is not None:
            t.load_checkpoint(previous[1])  # weights (local ones included), optimizer, LR position, RNG, logger
        if t.current_epoch < round_index:  # the site missed rounds: continue at the federation's round
            self._skip_to(round_index)
        if round_index < self.run.rounds and os.path.isfile(attempt):
            # this round was trained before and its update sent: what it released stays accounted
            t.carry_over_released(torch.load(attempt, map_location="cpu", weights_only=False))  # the site's own file
        return time.time() - t0

    @staticmethod
    def _use_one_log_file(t) -> None:
        """nnU-Net names its log after the construction time; a site rebuilt every round keeps one log."""
        old, new = t.log_file, os.path.join(t.output_folder, FEDERATED_LOG)
        if os.path.isfile(old) and old != new:
            with open(old) as src, open(new, "a") as dst:
                dst.write(src.read())
            os.remove(old)
        t.log_file = new

    def _skip_to(self, round_index: int) -> None:
        t = self.trainer
        missed = round_index - t.current_epoch
        t.print_to_log_file(f"site missed {missed} round(s): continuing at round {round_index}")
        logs = t.logger.local_logger.my_fantastic_logging if hasattr(t.logger, "local_logger") else \
            t.logger.my_fantastic_logging
        for key, values in logs.items():
            if isinstance(values, list):
                fill = values[-1] if values else (0.0 if key == "ema_fg_dice" else float("nan"))
                values.extend([fill] * (round_index - len(values)))
        t.current_epoch = round_index

    def released_before(self, round_index: int, digest: str) -> Update | None:
        """The update this site already sent for ``round_index`` from the same global model (the server repeats
        a round that too few sites answered): sent again, it releases nothing new. None if there is none."""
        attempt = round_state_file(self.state_dir(), round_index)
        if not os.path.isfile(attempt):
            return None
        state = torch.load(attempt, map_location="cpu", weights_only=False)  # the site's own file
        record = state.get(RELEASED_UPDATE_KEY)
        if not record or record.get("digest") != digest:
            return None
        weights = state["network_weights"]
        arrays = {k: weights[k].numpy().copy() for k in record["arrays"]}
        return Update(site=self.name, arrays=arrays, num_examples=int(record["num_examples"]),
                      metrics=dict(record["metrics"]))

    # ------------------------------------------------------------------ messages
    def train(self, round_index: int, global_arrays, federation: str = "", process_seconds: float = 0.0) -> Update:
        self.federation = federation
        digest = arrays_digest(global_arrays)
        again = self.released_before(round_index, digest)
        if again is not None:
            self.timings = {"setup_seconds": 0.0, "process_seconds": process_seconds, "seconds": 0.0}
            print(f"site {self.name}: round {round_index + 1} is repeated with the same global model: the update "
                  f"sent for it before is sent again (nothing new is released)", file=sys.stderr, flush=True)
            return again
        if self.can_continue(round_index):
            t0 = time.time()
            self.claim_folder()  # another federation may have used the folder since
            setup_seconds = time.time() - t0
        else:
            setup_seconds = self.build(round_index)
        t = self.trainer
        self.kept = None
        try:
            update = t.run_round(global_arrays)
            self.timings = {"setup_seconds": setup_seconds, "process_seconds": process_seconds,
                            "seconds": float(t.logger.get_value("epoch_end_timestamps", step=-1)
                                             - t.logger.get_value("epoch_start_timestamps", step=-1))}
            update.metrics = t.release_metrics({**update.metrics, **self.timings})  # a private site keeps them
            # kept with the round state: a repeated round re-sends exactly this
            t.released_update = {"digest": digest, "arrays": sorted(update.arrays),
                                 "num_examples": int(update.num_examples), "metrics": dict(update.metrics)}
            os.makedirs(self.state_dir(), exist_ok=True)
            path = self.state_file(round_index)
            t.save_round_state(path)
            self.kept = (federation, path, os.path.getmtime(path))
            self.prune_states(keep_from=round_index - 1)  # a retried round needs the state before it
        except BaseException:
            self.trainer = None  # part of a round in memory: the next message rebuilds from the state files
            raise
        finally:
            t.release_dataloaders()
        return update

    def finish(self, global_arrays, final_validation: bool, federation: str = "") -> dict:
        self.federation = federation
        if self.can_continue(self.run.rounds):
            self.claim_folder()
        else:
            self.build(self.run.rounds)
        t, self.trainer, self.kept = self.trainer, None, None
        t.finish_federation(global_arrays)
        t.on_train_end()  # checkpoint_final.pth in nnU-Net's layout
        if final_validation:
            t.perform_actual_validation(False)
        return {"finished": 1}

    def setup_info(self) -> RecordDict:
        base = os.path.join(os.environ["nnUNet_preprocessed"], self.name)
        with open(os.path.join(base, self.run.plans + ".json")) as f:
            plans = json.load(f)
        with open(os.path.join(base, "dataset.json")) as f:
            dataset_json = shared_dataset_json(json.load(f))
        return RecordDict({msgs.SITE: ConfigRecord({"name": self.name}),
                           msgs.CONFIG: msgs.json_config(plans=plans, dataset_json=dataset_json)})


def site_key(node_config: dict, run_config: dict) -> str:
    """Which :class:`DeployedSite` answers a message: one per SuperNode settings and run settings."""
    return json.dumps([sorted((str(k), str(v)) for k, v in node_config.items()),
                       sorted((str(k), str(v)) for k, v in run_config.items())])


def handle(kind: str, content: RecordDict, node_config: dict, run_config: dict, process_seconds: float = 0.0,
           sites: dict | None = None) -> RecordDict:
    """Answer one message's content: ``setup`` (site name, plans, dataset.json task entries), ``train`` (the
    site's update for the round) or ``finish`` (final model written). ``sites`` keeps the :class:`DeployedSite`
    objects (and their trainers) between messages; without it every message builds its own."""
    key = site_key(node_config, run_config)
    site = (sites or {}).get(key)
    if site is None:
        site = DeployedSite(dict(node_config), RunSettings.from_run_config(run_config))
        if sites is not None:
            sites[key] = site
    if kind == SETUP:
        return site.setup_info()
    global_arrays, config = msgs.read_global_content(content, kind)
    if kind == TRAIN:
        update = site.train(int(config["round"]), global_arrays, str(config.get("federation", "")), process_seconds)
        print(f"site {site.name}: round {int(config['round']) + 1}/{site.run.rounds} sent "
              f"({len(update.arrays)} shared arrays; setup {site.timings['setup_seconds']:.1f} s, "
              f"training {site.timings['seconds']:.1f} s)", file=sys.stderr, flush=True)
        if config.get(SECURE):  # validated, weighted or clipped here: the server will only see the masked sum
            update = secure_update(update, global_arrays, config)
        return msgs.update_to_content(update)
    if kind == FINISH:
        metrics = site.finish(global_arrays, bool(config.get("final-validation", True)),
                              str(config.get("federation", "")))
        print(f"site {site.name}: final model written", file=sys.stderr, flush=True)
        return RecordDict({msgs.SITE: ConfigRecord({"name": site.name}), msgs.METRICS: MetricRecord(metrics)})
    raise msgs.MessageError(f"unknown message kind {kind!r}")

"""The Flower ServerApp: rounds, aggregation, resume and the global model, as in ``nnunet_fed simulate``.

Per round the server sends the global (shared) parameters to every connected site, folds the replies into the
trainer's server strategy as they arrive (``make_server_strategy``: validation with a named reason, then
example-weighted FedAvg) and commits the round (metrics line + server state file) once at least ``min-sites``
valid updates came in before ``round-timeout``. A round with fewer is repeated (``round-retries``); a stateful
strategy (client-level DP) learns ``min-sites`` in ``start`` and refuses such an attempt before releasing
anything, so a repeated round spends no privacy. A site
is identified by its dataset name: a SuperNode that rejoins replaces its earlier node. After the last round
the sites receive the final global parameters (``query.finish``: their own checkpoint_final.pth and
validation) and the server writes the global model in nnU-Net's results layout, like simulate.

With ``secure-aggregation`` a round runs Flower's SecAgg+ instead (:mod:`nnunet_fed.deployment.secure_aggregation`):
each site validates its own update and the server folds only the unmasked sum into its strategy.

Restarting the server with the same federation resumes after the last committed round, with the
committed global weights (``federation_state.pth``, tensors only).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import time

import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from nnunet_fed import sites as site_checks
from nnunet_fed.deployment import messages as msgs
from nnunet_fed.deployment import secure_aggregation as secure
from nnunet_fed.deployment.launch import SERVER_LOG, append_log
from nnunet_fed.deployment.runconfig import RunSettings
from nnunet_fed.federation.aggregation import NoValidUpdates
from nnunet_fed.federation.records import (METRICS_FILE, PLOT_FILE, STATE_FILE, MetricsLog, load_server_state,
                                           save_server_state)
from nnunet_fed.federation.simulation import SimulationConfig, global_model_folder, write_global_model

FEDERATION_ID_FILE = "federation_id"  # this federation's identity at the sites (kept on resume, new with --fresh)
SETUP_TIMEOUT = 300.0


class FederationServer:
    def __init__(self, grid: Grid, run: RunSettings, poll_seconds: float = 0.5, context: Context | None = None):
        self.grid, self.run, self.poll, self.context = grid, run, poll_seconds, context
        site_checks.require_nnunet_paths(("nnUNet_results",))
        self.trainer_cls = site_checks.find_trainer(run.trainer)
        self.options = self.trainer_cls.resolve_options(run.trainer_options)
        self.cfg = SimulationConfig(dataset_ids=[], configuration=run.configuration, trainer=run.trainer,
                                    rounds=run.rounds, local_steps=run.local_steps, val_steps=run.val_steps,
                                    fold=run.fold_value(), plans_identifier=run.plans, device="cpu",
                                    fedprox_mu=run.fedprox_mu, federation_name=run.federation_name, seed=run.seed,
                                    trainer_options=dict(run.trainer_options))
        self.fold_dir = os.path.join(global_model_folder(self.cfg), f"fold_{run.fold}")
        os.makedirs(self.fold_dir, exist_ok=True)
        if run.fresh:  # the federation's records only (the SuperLink may keep its state in a subfolder)
            for name in (STATE_FILE, METRICS_FILE, PLOT_FILE, SERVER_LOG, "checkpoint_final.pth", FEDERATION_ID_FILE):
                if os.path.isfile(os.path.join(self.fold_dir, name)):
                    os.remove(os.path.join(self.fold_dir, name))
        self.federation = federation_identity(self.fold_dir, run.federation_name)
        self.node_sites: dict[int, str] = {}  # node id -> site (dataset name), in the order they answered setup
        self.refused: dict[int, str] = {}  # node id -> why it cannot take part
        self.candidates: dict[int, tuple] = {}  # node id -> (site, plans, dataset.json) until the reference is chosen
        self.committed_arrays = None  # on resume: the global model the reference plans must build
        self.template = None  # a trainer of the global model (plans, network), never trained
        self.global_arrays = None
        self.strategy = self.trainer_cls.make_server_strategy(self.options, run.strategy, run.strategy_options)
        if run.secure_aggregation:
            secure.check_strategy(self.strategy)

    def log(self, text: str) -> None:
        print(f"[nnunet_fed server] {text}", flush=True)
        append_log(os.path.join(self.fold_dir, SERVER_LOG), "nnunet_fed server", [text])

    # ------------------------------------------------------------------ messaging
    def _exchange(self, content_by_node: dict, message_type: str, group: str, timeout: float):
        """Push one message per node; yield (node, reply, None) as replies arrive, then (node, None, why) for
        nodes that did not answer: gone offline during the exchange (Flower's heartbeats) or past ``timeout``."""
        messages = [Message(content_by_node[n], dst_node_id=n, message_type=message_type, group_id=group,
                            ttl=max(timeout, 60.0)) for n in content_by_node]
        yield from self.exchange_messages(messages, timeout)

    def exchange_messages(self, messages: list, timeout: float):
        """:meth:`_exchange` for messages already made (SecAgg+'s stages)."""
        nodes = [m.metadata.dst_node_id for m in messages]
        ids = list(self.grid.push_messages(messages))
        pending = {mid: n for mid, n in zip(ids, nodes) if mid}
        for n in [n for mid, n in zip(ids, nodes) if not mid]:
            yield n, None, "the message could not be delivered"
        deadline = time.time() + timeout
        next_check = time.time() + 2.0
        while pending and time.time() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    yield node, reply, None
            if pending and time.time() >= next_check:  # a SuperNode that left will not answer
                connected = set(self.grid.get_node_ids())
                for mid, node in list(pending.items()):
                    if node not in connected:
                        del pending[mid]
                        yield node, None, "its SuperNode left the federation during the round"
                next_check = time.time() + 2.0
            if pending:
                time.sleep(self.poll)
        for node in pending.values():
            yield node, None, f"no reply within {timeout:.0f} s"

    def site_of(self, node: int) -> str:
        return self.node_sites.get(node, f"node {node}")

    def setup_nodes(self, nodes: list[int]) -> None:
        """Ask new SuperNodes which site they are, with their plans and the task entries of their dataset.json.
        Before the global model exists they are candidates (:meth:`choose_reference`); after, each is compared with
        the reference site and refused with the difference named."""
        content = {n: msgs.global_content(None, {"round": -1}) for n in nodes}
        for node, reply, why in self._exchange(content, msgs.SETUP, "setup", SETUP_TIMEOUT):
            if reply is None:
                self.log(f"node {node} did not answer the setup query: {why}")
                continue
            if reply.has_error():
                self.refused[node] = reply.error.reason
                self.log(f"node {node} cannot take part: {reply.error.reason}")
                continue
            site = str(reply.content[msgs.SITE]["name"])
            cfg = reply.content[msgs.CONFIG]
            plans, dataset_json = json.loads(cfg["plans"]), json.loads(cfg["dataset_json"])
            if self.template is None:
                self.candidates = {n: c for n, c in self.candidates.items() if c[0] != site}  # a rejoined site
                self.candidates[node] = (site, plans, dataset_json)
                self.log(f"site {site} answered (node {node})")
                continue
            why = self.mismatch(site, plans, dataset_json)
            if why is not None:
                self.refused[node] = why
                self.log(f"node {node} cannot take part: {why}")
                continue
            self.accept(node, site)

    def accept(self, node: int, site: str) -> None:
        self.node_sites.pop(node, None)
        self.node_sites[node] = site  # newest last: it replaces an earlier node of the same site
        self.log(f"site {site} joined (node {node})")

    def choose_reference(self) -> None:
        """Choose the global model's plans from the candidates, not from whichever site answered first: the largest
        group of mutually compatible sites (ties: the earlier answer) once it has ``min-sites`` members, and on a
        resumed run only plans that build the committed global model. Its members join; the others are refused
        with their difference from the reference named. Nothing happens while no group is large enough."""
        nodes = list(self.candidates)
        builds, templates = {}, {}
        if self.committed_arrays is not None:
            for n in nodes:
                templates[n] = self.build_template(*self.candidates[n][1:])
                builds[n] = _same_arrays(templates[n].get_shared_arrays(), self.committed_arrays)
        groups = []
        for n in nodes:
            if builds.get(n) is False:
                continue
            site, plans, dataset_json = self.candidates[n]
            members = [m for m in nodes if builds.get(m) is not False and
                       self.mismatch(self.candidates[m][0], *self.candidates[m][1:],
                                     reference=(site, plans, dataset_json)) is None]
            groups.append((len({self.candidates[m][0] for m in members}), -nodes.index(n), n, members))
        if not groups or max(groups)[0] < self.run.min_sites:
            return
        _, _, ref_node, members = max(groups)
        self.reference = self.candidates[ref_node]
        self.template = templates[ref_node] if ref_node in templates else self.build_template(*self.reference[1:])
        for n in nodes:
            site = self.candidates[n][0]
            if n in members:
                self.accept(n, site)
                continue
            why = self.mismatch(site, *self.candidates[n][1:]) if builds.get(n) is not False else \
                f"site {site}: its plans build another network than the committed global model of this federation"
            self.refused[n] = why or f"site {site}: not compatible with the reference site {self.reference[0]}"
            self.log(f"node {n} cannot take part: {self.refused[n]}")
        self.candidates = {}

    def mismatch(self, site: str, plans: dict, dataset_json: dict, reference: tuple | None = None) -> str | None:
        """Why a site cannot join the reference site (``None`` if it can): another task (channel names, labels in
        nnU-Net's terms, file ending) or plans that differ where training and prediction depend on them."""
        ref = reference if reference is not None else getattr(self, "reference", None)
        if ref is None or ref[0] == site:
            return None
        ref_site, ref_plans, ref_dataset_json = ref
        diff = site_checks.dataset_json_difference(dataset_json, ref_dataset_json)
        if diff is not None:
            return f"site {site}: {diff[0]} differ from site {ref_site}: {diff[1]}"
        try:
            plans_diff = site_checks.plans_difference(plans, ref_plans, self.run.configuration)
        except (KeyError, RuntimeError, ValueError) as e:
            return f"site {site}: its plans cannot be compared with site {ref_site}'s ({e})"
        if plans_diff is not None:
            return site_checks.plans_difference_message(site, ref_site, plans_diff, self.run.plans,
                                                        self.run.configuration)
        return None

    def active_nodes(self) -> list[int]:
        """One node per site (the newest), among the SuperNodes connected now."""
        connected = set(self.grid.get_node_ids())
        self.candidates = {n: c for n, c in self.candidates.items() if n in connected}
        new = [n for n in connected if n not in self.node_sites and n not in self.refused and n not in self.candidates]
        if new:
            self.setup_nodes(new)
        by_site = {}
        for node, site in self.node_sites.items():
            if node in connected:
                by_site[site] = node
        return list(by_site.values())

    def wait_for_sites(self) -> list[int]:
        deadline = time.time() + self.run.wait_for_sites
        announced = False
        while True:
            nodes = self.active_nodes()
            if self.template is None:
                self.choose_reference()
                nodes = self.active_nodes()
            if len(nodes) >= self.run.min_sites and self.template is not None:
                return nodes
            if time.time() > deadline:
                disagree = ""
                if self.candidates:
                    first = next(iter(self.candidates.values()))
                    why = [self.mismatch(c[0], *c[1:], reference=first) for c in self.candidates.values()]
                    disagree = "; no min-sites of the sites that answered agree: " + \
                        ("; ".join(w for w in why if w) or "too few answered")
                raise TimeoutError(f"only {len(nodes)} site(s) connected after {self.run.wait_for_sites:.0f} s "
                                   f"(min-sites {self.run.min_sites}): {sorted(self.site_of(n) for n in nodes)}"
                                   f"{disagree}")
            if not announced:
                self.log(f"waiting for sites: {len(nodes)}/{self.run.min_sites} connected")
                announced = True
            time.sleep(max(self.poll, 1.0))

    # ------------------------------------------------------------------ global model
    def build_template(self, plans: dict, dataset_json: dict):
        """The global model's trainer: nnU-Net's network from the plans, never trained, never given data."""
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

        plans = dict(plans)
        plans["dataset_name"] = self.run.federation_name
        plans["continue_training"] = False  # what nnUNetv2_train passes
        with contextlib.redirect_stdout(io.StringIO()):
            t = self.trainer_cls(plans=plans, configuration=self.run.configuration, fold=self.run.fold_value(),
                                 dataset_json=dataset_json, device=torch.device("cpu"))
            t.configure_federation(self.run.rounds, self.run.local_steps, self.run.val_steps, self.run.fedprox_mu,
                                   self.run.trainer_options)
            if os.path.isfile(t.log_file):  # nnU-Net's banner; the server keeps its own log
                os.remove(t.log_file)
            t.log_file = os.path.join(self.fold_dir, SERVER_LOG)
            torch.manual_seed(self.run.seed)
            num_inputs = determine_num_input_channels(t.plans_manager, t.configuration_manager, dataset_json)
            t.network = t.build_network_architecture(t.plans_manager, t.configuration_manager, num_inputs,
                                                     t.label_manager.num_segmentation_heads, t.enable_deep_supervision)
            t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # mirroring axes for inference
        t.console_output = False
        return t

    # ------------------------------------------------------------------ rounds
    def run_round(self, r: int) -> bool:
        nodes = self.wait_for_sites()
        t0 = time.time()
        content = msgs.global_content(self.global_arrays, {"round": r, "num-rounds": self.run.rounds,
                                                           "federation": self.federation})
        failed = []

        def updates():
            for node, reply, why in self._exchange({n: content for n in nodes}, msgs.TRAIN, str(r),
                                                   self.run.round_timeout):
                site = self.site_of(node)
                if reply is None:
                    failed.append((site, f"no update: {why}"))
                elif reply.has_error():
                    failed.append((site, f"site error: {reply.error.reason}"))
                else:
                    try:
                        update = msgs.update_from_message(reply)
                    except (msgs.MessageError, ValueError) as e:
                        self.strategy.rejected.append((site, f"site {site!r}: malformed update: {e}"))
                        continue
                    if update.site != site:
                        self.strategy.rejected.append(
                            (site, f"site {site!r}: update claims to come from {update.site!r}"))
                        continue
                    yield update
                    continue
                self.log(f"round {r + 1}: {failed[-1][0]}: {failed[-1][1]}")

        # a repeated attempt starts from the server rule's state before this one (a server optimiser's moments)
        rule_state = self.strategy.state_dict() if hasattr(self.strategy, "state_dict") else None
        secure_info = None
        try:
            if self.run.secure_aggregation:  # SecAgg+: the server gets the sum, never one site's update
                dp = secure.client_dp_of(self.strategy)
                total, secure_info = secure.secure_round(
                    self.grid, self.exchange_messages, self.context, nodes, self.global_arrays,
                    dict(content[msgs.CONFIG]), self.site_of, self.run.round_timeout, self.run.secagg_clip_range, self.run.secagg_max_weight,
                    client_dp_clip=dp.clip if dp is not None else None)
                new_arrays = self.strategy.aggregate_secure(self.global_arrays, total)
            else:
                new_arrays = self.strategy.aggregate(self.global_arrays, updates())
        except NoValidUpdates as e:
            new_arrays = None
            self.log(f"round {r + 1}: {e}")
        for site, why in self.strategy.rejected:
            self.log(f"round {r + 1}: rejected update of {site}: {why}")
        accepted = len(self.strategy.accepted)
        if new_arrays is None or accepted < self.run.min_sites:
            self.log(f"round {r + 1}: {accepted} valid update(s), fewer than min-sites {self.run.min_sites}; "
                     f"the round is repeated")
            if rule_state is not None:
                self.strategy.load_state_dict(rule_state)
            return False
        self.global_arrays = new_arrays
        record = {"round": r, "sites": {u.site: {**u.metrics, "num_examples": u.num_examples}
                                        for u in self.strategy.accepted},
                  "rejected": [{"site": s, "reason": why} for s, why in self.strategy.rejected],
                  "failed": [{"site": s, "reason": why} for s, why in failed],
                  "seconds": time.time() - t0,
                  **({"secure_aggregation": secure_info} if secure_info else {}),
                  **(self.strategy.round_record() if hasattr(self.strategy, "round_record") else {})}
        self.metrics.append(record)
        save_server_state(self.fold_dir, r + 1, self.global_arrays, self.run.resume_key(),
                          self.strategy.state_dict() if hasattr(self.strategy, "state_dict") else None)
        self.log(f"round {r + 1}/{self.run.rounds} committed: {accepted} site(s) "
                 f"{sorted(record['sites'])} in {record['seconds']:.1f} s")
        return True

    def finish(self) -> str:
        nodes = self.active_nodes()
        content = msgs.global_content(self.global_arrays, {"round": self.run.rounds, "federation": self.federation,
                                                           "final-validation": self.run.final_validation})
        for node, reply, why in self._exchange({n: content for n in nodes}, msgs.FINISH, "finish",
                                               self.run.round_timeout):
            site = self.site_of(node)
            if reply is None or reply.has_error():
                why = why if reply is None else reply.error.reason
                self.log(f"site {site} did not write its final model: {why}")
            else:
                self.log(f"site {site} wrote its final model")
        path = write_global_model(self.cfg, self.template, self.global_arrays, self.fold_dir,
                                  self.run.rounds)
        self.metrics.plot()
        self.log(f"global model: {path}" if path else
                 "personalised trainer: no global model; each site's folder holds its personal model")
        return path

    def serve(self) -> str:
        state = load_server_state(self.fold_dir)
        if state is not None and state["run_config"] != self.run.resume_key():
            raise site_checks.FederationSetupError(
                f"{self.fold_dir} holds a run with other settings ({state['run_config']}); use --fresh to start "
                f"over or --federation-name to write elsewhere")
        start = state["completed_rounds"] if state else 0
        self.metrics = MetricsLog(self.fold_dir)
        self.metrics.truncate(start)
        self.committed_arrays = state["global_arrays"] if state else None
        self.log(f"federation {self.run.federation_name}: {self.run.rounds} round(s) of {self.run.local_steps} "
                 f"steps, trainer {self.run.trainer}, min-sites {self.run.min_sites}"
                 + (f"; resuming after round {start}" if start else ""))
        nodes = self.wait_for_sites()
        self.global_arrays = state["global_arrays"] if state else self.template.get_shared_arrays()
        if state and hasattr(self.strategy, "load_state_dict"):  # a server optimiser's moments
            self.strategy.load_state_dict(state["strategy_state"])
        if hasattr(self.strategy, "start"):  # stateful server rules (client-level DP): federation size, past rounds
            # and min-sites: an attempt with fewer valid updates must fail inside the strategy, before it releases
            # anything (noise, clip, privacy spent), since the round is then repeated
            self.strategy.start(num_sites=max(len(nodes), self.run.min_sites), rounds=self.run.rounds,
                                history=self.metrics.read(), min_updates=self.run.min_sites)
        for r in range(start, self.run.rounds):
            for attempt in range(self.run.round_retries + 1):
                if self.run_round(r):
                    break
            else:
                raise RuntimeError(f"round {r + 1} failed {self.run.round_retries + 1} times "
                                   f"(see {os.path.join(self.fold_dir, SERVER_LOG)})")
        return self.finish()


def federation_identity(fold_dir: str, federation_name: str) -> str:
    """``<federation name>-<random id>``: the federation as its sites know it. Made at the first start and kept in
    ``fold_dir`` (a resumed run keeps it; ``--fresh`` makes a new one), so a site keeps each federation's round
    states apart and never continues one federation from another's (nnunet_fed.deployment.site_runtime)."""
    import uuid

    path = os.path.join(fold_dir, FEDERATION_ID_FILE)
    if not os.path.isfile(path):
        with open(path + ".tmp", "w") as f:
            f.write(uuid.uuid4().hex[:16])
        os.replace(path + ".tmp", path)
    with open(path) as f:
        return f"{federation_name}-{f.read().strip()}"


def _same_arrays(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(tuple(a[k].shape) == tuple(b[k].shape) for k in a)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = RunSettings.from_run_config(context.run_config)
    FederationServer(grid, run, context=context).serve()

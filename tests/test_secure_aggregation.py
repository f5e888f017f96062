"""Secure aggregation (Flower's SecAgg+): the real SecAggPlusWorkflow at the server and the real ClientApp with
secaggplus_mod at three fixture sites, messages serialised with Flower's protobuf serde between them (in-process
delivery instead of a SuperLink; tests/test_flower_deployment.py runs it through a real SuperLink).

What must hold: the securely aggregated global model is the FedAvg of the same site updates within the
quantisation bound; nothing a site sends carries its parameters in the clear and its masked vector does not
resemble its update; a site that drops out mid-round is left out of the sum; a site whose update would be clipped
by the quantiser refuses it, naming the setting; client-level DP on the secure sum equals client-level DP on the
individual updates."""
import json
import os
import uuid

import numpy as np
import pytest
import torch


#: a DP trainer (sample-level DP at each site), so that what SecAgg+ sends is checked against the sites' ledgers
DP_OPTIONS = {"noise_multiplier": "1.0", "expected_batch_size": "4", "public_plans": "true"}


class LoopbackGrid:
    """A Flower Grid that delivers each message to the site's ClientApp in this process, through Flower's protobuf
    serialisation both ways (what a SuperLink would carry). Each node keeps its Context between messages, as a
    SuperNode does. ``drop(node, stage)`` loses that node's reply to a SecAgg+ stage (a site gone offline)."""

    def __init__(self, contexts: dict):
        from flwr.serverapp import Grid

        Grid.register(LoopbackGrid)
        self.contexts, self.replies, self.sent, self.dropped = contexts, {}, [], set()

    def drop(self, node, stage):
        self.dropped.add((node, stage))

    def get_node_ids(self):
        return list(self.contexts)

    def _deliver(self, msg):
        from flwr.app import Error, Message
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
        from flwr.common.serde import message_from_proto, message_to_proto

        from nnunet_fed.deployment.client_app import app

        msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        wire = message_from_proto(message_to_proto(msg))
        cfg = wire.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = cfg[Key.STAGE] if cfg is not None else None
        node = msg.metadata.dst_node_id
        try:
            reply = app(wire, self.contexts[node])
        except Exception as e:  # what a SuperNode does with a ClientApp's exception
            reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=wire)
        reply = message_from_proto(message_to_proto(reply))
        self.sent.append((node, stage, reply))
        return None if (node, stage) in self.dropped else reply

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            reply = self._deliver(msg)
            if reply is not None:
                self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def _federation(site_env, monkeypatch, **settings):
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from nnunet_fed.deployment.runconfig import RunSettings
    from nnunet_fed.deployment.server_app import FederationServer

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    run = RunSettings(**{"rounds": 1, "local_steps": 2, "val_steps": 1, "min_sites": 3, "round_retries": 0,
                         "final_validation": False, "wait_for_sites": 60, "secure_aggregation": True,
                         "federation_name": "DatasetFed_secure", **settings})
    run = RunSettings.from_run_config(run.to_run_config())
    contexts = {n: Context(run_id=1, node_id=n, state=RecordDict(), run_config=run.to_run_config(),
                           node_config={"dataset": d, "configuration": "2d", "trainer": run.trainer, "device": "cpu"})
                for n, d in zip((11, 12, 13), site_env["ids"])}
    grid = LoopbackGrid(contexts)
    server_context = Context(run_id=1, node_id=0, state=RecordDict(), run_config=run.to_run_config(), node_config={})
    return run, grid, FederationServer(grid, run, poll_seconds=0.01, context=server_context)


def _site_models(site_env, server, round_index):
    from conftest import site_round_updates

    return site_round_updates(site_env, server.fold_dir, server.run.trainer, round_index)


def _masked_vectors(grid):
    """(node, list of arrays) of every stage-2 reply: what the server received in place of an update."""
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    out = []
    for node, stage, reply in grid.sent:
        if stage == Stage.COLLECT_MASKED_VECTORS and not reply.has_error():
            cfg = reply.content.config_records[RECORD_KEY_CONFIGS]
            out.append((node, [bytes_to_ndarray(b) for b in cfg[Key.MASKED_PARAMETERS]]))
    return out


def test_secure_round_is_fedavg_of_the_updates_and_the_server_never_holds_one(site_env, monkeypatch):
    from nnunet_fed.federation.aggregation import FedAvg, float_names
    from nnunet_fed.federation.records import load_server_state

    run, grid, server = _federation(site_env, monkeypatch, rounds=2, min_sites=2, round_timeout=20,
                                    trainer="nnUNetTrainerFedDP", trainer_options=DP_OPTIONS)
    grid.drop(13, "collect_masked_vectors")  # round 2: the third site's masked update is lost (offline)
    original = grid._deliver

    def deliver(msg):  # only in round 2
        if msg.metadata.group_id != "2":
            grid.dropped.discard((13, "collect_masked_vectors"))
        else:
            grid.dropped.add((13, "collect_masked_vectors"))
        return original(msg)

    grid._deliver = deliver
    rounds_global = []
    commit = server.run_round

    def run_round(r):
        before = {k: v.copy() for k, v in server.global_arrays.items()}
        ok = commit(r)
        rounds_global.append((before, {k: v.copy() for k, v in server.global_arrays.items()}))
        return ok

    server.run_round = run_round
    server.serve()

    rows = server.metrics.read()
    assert [r["round"] for r in rows] == [0, 1]
    assert set(rows[0]["sites"]) == set(site_env["names"])
    assert set(rows[1]["sites"]) == set(site_env["names"][:2])  # the dropped site is not in the sum
    assert [x["site"] for x in rows[1]["rejected"]] == [site_env["names"][2]]
    for r, row in enumerate(rows):
        info = row["secure_aggregation"]
        assert info["arrays_received"] == 0 and info["masked_vectors_received"] == len(row["sites"])
        before, after = rounds_global[r]
        updates = _site_models(site_env, server, r)
        updates = [u for u in updates if u.site in row["sites"]]
        assert len(updates) == len(row["sites"])
        expected = FedAvg().aggregate(before, iter(updates))  # the plain round on the same updates
        bound = info["quantization_error_bound"]
        assert 0 < bound < 1e-4
        worst = max(float(np.abs(after[k].astype(np.float64) - expected[k]).max()) for k in expected)
        assert worst <= bound + 1e-6, (r, worst, bound)  # + float32 rounding of the stored arrays
        moved = max(float(np.abs(expected[k] - before[k]).max()) for k in expected)
        print(f"round {r + 1}: {len(updates)} sites, largest difference to plain FedAvg {worst:.3g}, quantisation "
              f"bound {bound:.3g}, largest change of the round {moved:.3g}")
        assert moved > 10 * (bound + 1e-6)  # the comparison is not trivially met: the round moved the model
    state = load_server_state(server.fold_dir)
    assert state["completed_rounds"] == 2 and all(np.array_equal(state["global_arrays"][k], after[k]) for k in after)

    # no reply of any stage carried parameters in the clear; a masked vector looks like noise, not like the update
    for node, stage, reply in grid.sent:
        assert reply.has_error() or not any(len(r) for r in reply.content.array_records.values()), (node, stage)
    masked = _masked_vectors(grid)
    assert len(masked) == 3 + 3  # round 2: the third site masked its update, and the reply was lost
    first = _site_models(site_env, server, 0)[0]
    name = float_names(rounds_global[0][0])[0]  # the first array under the mask
    delta = (first.arrays[name] - rounds_global[0][0][name]).ravel()
    for node, vec in masked[:3]:
        v = vec[1].astype(np.float64).ravel()  # vec[0] is the weight factor; vec[1] the first array
        assert v.min() >= 0 and v.max() < 2 ** 32
        assert abs(v.mean() / 2 ** 32 - 0.5) < 0.1 and abs(v.std() / 2 ** 32 - 12 ** -0.5) < 0.05  # uniform
        if v.size > 50 and delta.std() > 0:
            assert abs(np.corrcoef(v, delta)[0, 1]) < 0.3

    # everything a DP site sent in the secure rounds (and in setup and finish) is in its privacy ledger, the round
    # metrics inside metrics-json included
    from test_flower_deployment import released_fields

    from nnunet_fed.deployment.secure_aggregation import METRICS_JSON
    from nnunet_fed.privacy.ledger import PrivacyLedger

    names, parsed = dict(zip((11, 12, 13), site_env["names"])), 0
    for node, stage, reply in grid.sent:
        fold = os.path.join(site_env["results"], names[node], f"{run.trainer}__nnUNetPlans__2d", "fold_0")
        listed = PrivacyLedger.load(os.path.join(fold, "privacy_ledger.json")).released_names()
        sent = released_fields(reply)
        for record in reply.content.config_records.values():
            if METRICS_JSON in record:
                sent |= set(json.loads(record[METRICS_JSON]))
                parsed += 1
        assert not sent - listed, f"{names[node]} sent at stage {stage}, not in its privacy ledger: {sent - listed}"
    assert parsed == len(masked)  # every masked-vector reply's metrics were read


def test_site_refuses_an_update_the_quantiser_would_clip_and_names_the_setting(site_env, monkeypatch):
    run, grid, server = _federation(site_env, monkeypatch, secagg_clip_range=1e-9)
    with pytest.raises(RuntimeError, match="round 1 failed"):
        server.serve()
    text = open(os.path.join(server.fold_dir, "federation_server.log")).read()
    for name in site_env["names"]:
        assert f"site {name!r}" in text and "--secagg-clip-range" in text, text[-2000:]
    assert not server.metrics.read()  # nothing committed


def test_client_level_dp_on_the_secure_sum_equals_it_on_the_individual_updates():
    """The site-side half (secure_update: validation, clip, bit) plus the sum SecAgg+ reveals, against the server's
    own clipping of the individual updates: the same new global model and clip, noise drawn alike."""
    from nnunet_fed.deployment.secure_aggregation import BIT, CLIENT_DP_CLIP, CLIP_RANGE, MAX_WEIGHT, secure_update
    from nnunet_fed.federation.aggregation import FedAvg, SecureSum, make_strategy
    from nnunet_fed.federation.update import Update
    from nnunet_fed.privacy.client_level import ClientLevelDP

    rng = np.random.default_rng(0)
    g = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    scales = (0.05, 0.5, 3.0)  # one update unclipped, two clipped at clip 1
    updates = [Update(f"s{i}", {k: v + s * rng.normal(size=v.shape).astype(np.float32) for k, v in g.items()}, 10 + i)
               for i, s in enumerate(scales)]

    def dp():
        d = ClientLevelDP(FedAvg(), noise_multiplier=0.7, clip=1.0, rng=np.random.default_rng(5))
        d.start(num_sites=3, rounds=4)
        return d

    plain = dp()
    expected = plain.aggregate(g, iter(updates))
    config = {CLIENT_DP_CLIP: 1.0, CLIP_RANGE: 1.0, MAX_WEIGHT: 1.0}
    masked_in = [secure_update(u, g, config) for u in updates]
    assert all(m.num_examples == 1 for m in masked_in)  # equal weights
    assert [float(m.arrays[BIT][0]) for m in masked_in] == [1.0, 0.0, 0.0]
    for m in masked_in:  # each site's contribution is bounded by the clip
        assert np.sqrt(sum(float((v ** 2).sum()) for k, v in m.arrays.items() if k != BIT)) <= 1.0 + 1e-9
    mean = {k: np.mean([m.arrays[k] for m in masked_in], axis=0) for k in g}
    total = SecureSum(mean, [Update(u.site, {}, u.num_examples) for u in updates],
                      unclipped_fraction=float(np.mean([m.arrays[BIT][0] for m in masked_in])))
    secure = dp()
    got = secure.aggregate_secure(g, total)
    for k in g:
        np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=1e-6)
    mine, theirs = secure.round_record()["client_dp"], plain.round_record()["client_dp"]
    assert mine.keys() == theirs.keys() and secure.clip == pytest.approx(plain.clip)
    for key, value in theirs.items():  # clip, next clip, noisy unclipped fraction, epsilon, noise std, ...
        assert mine[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    # a server optimiser on top takes the secure mean as it takes the plain one
    a, b = make_strategy("fedavgm", {"server_momentum": "0.5"}), make_strategy("fedavgm", {"server_momentum": "0.5"})
    fed_mean = {k: np.average([u.arrays[k] - g[k] for u in updates], axis=0, weights=[u.num_examples for u in updates])
                for k in g}
    plain_m = a.aggregate(g, iter(updates))
    secure_m = b.aggregate_secure(g, SecureSum(fed_mean, [Update(u.site, {}, u.num_examples) for u in updates]))
    for k in g:
        np.testing.assert_allclose(secure_m[k], plain_m[k], rtol=0, atol=1e-6)


def test_robust_rules_and_bad_settings_are_refused_before_anything_starts(site_env, capsys):
    from conftest import cli
    from nnunet_fed.deployment.runconfig import RunSettings

    code, _, err = cli(capsys, "server", "-c", "2d", "--insecure", "--secure-aggregation", "--min-sites", "2",
                       "--strategy", "fedmedian", "--federation-name", "DatasetFed_refused", "--wait-for-sites", "30")
    assert code == 2 and "needs every site's update" in err, err[-1000:]
    assert not os.path.exists(os.path.join(site_env["results"], "DatasetFed_refused"))
    for bad, message in (({"min_sites": 1}, "min-sites >= 2"), ({"secagg_clip_range": 0}, "secagg-clip-range > 0")):
        run = RunSettings(secure_aggregation=True, **{"min_sites": 2, **bad})
        with pytest.raises(ValueError, match=message):
            RunSettings.from_run_config(run.to_run_config())


# ------------------------------------------------------------------ dropouts at every stage of the protocol
DROPOUTS = {  # sites (of five; threshold 3) whose reply to a SecAgg+ stage is lost: they are gone from then on
    "none": [],
    "setup": [(1, "setup")],
    "share keys": [(1, "share_keys")],  # after its public keys went out, before its key shares did
    "masked vector": [(1, "collect_masked_vectors")],
    "unmask": [(1, "unmask")],  # its masked vector is in the sum; the others' shares unmask it
    "share keys and masked vector": [(1, "share_keys"), (2, "collect_masked_vectors")],
    "two masked vectors": [(1, "collect_masked_vectors"), (2, "collect_masked_vectors")],
    "setup, share keys, masked vector": [(0, "setup"), (1, "share_keys"), (2, "collect_masked_vectors")],
}


@pytest.mark.parametrize("dropped", list(DROPOUTS.values()), ids=list(DROPOUTS))
def test_sites_dropping_out_at_any_stage_leave_the_weighted_mean_of_the_others(dropped):
    """The server's SecAgg+ round (``secure_round``) with Flower's ``secaggplus_mod`` at five sites whose model step
    returns fixed arrays: whichever stage a site drops out at, the round gives the weighted mean of exactly the
    sites whose masked vectors arrived (within the quantisation bound) or, below the threshold, halts with no
    site accepted; it never fails the survivors' own replies."""
    from flwr.app import Context, Error, Message, RecordDict
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.supercore.task_identity import TaskIdentity

    from nnunet_fed.deployment.secure_aggregation import METRICS_JSON, secure_round

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    rng = np.random.default_rng(0)
    nodes = [101, 102, 103, 104, 105]
    g = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(5, np.float32)}
    deltas = {n: [rng.uniform(-1, 1, size=v.shape) for v in g.values()] for n in nodes}  # float64, as secure_update
    weights = {n: 10 + i for i, n in enumerate(nodes)}
    contexts = {n: Context(run_id=1, node_id=n, state=RecordDict(), run_config={}, node_config={}) for n in nodes}
    gone = {nodes[i]: stage for i, stage in dropped}
    errors = []

    def model_step(msg, context):
        n = context.node_id
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(deltas[n]), weights[n],
                     {METRICS_JSON: json.dumps({"num_examples": weights[n]})})
        return Message(fitres_to_recorddict(res, keep_input=False), reply_to=msg)

    def exchange(messages, timeout):
        for msg in messages:
            node = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            wire = message_from_proto(message_to_proto(msg))
            stage = wire.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            try:
                reply = secaggplus_mod(wire, contexts[node], model_step)
            except Exception as e:  # what a SuperNode does with a ClientApp's exception
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=wire)
            if reply.has_error():
                errors.append((node, stage, reply.error.reason))
            if gone.get(node) == stage:
                yield node, None, "offline"
            else:
                yield node, message_from_proto(message_to_proto(reply)), None

    total, info = secure_round(object(), exchange, Context(run_id=1, node_id=0, state=RecordDict(), run_config={},
                                                            node_config={}), nodes, g, {"round": 0},
                               lambda n: f"site{n}", 30, 8.0, 1000.0)
    assert not errors, errors  # no site's own reply failed
    # the sites whose masked vector arrived: not gone, or gone only at the unmask stage
    summed = [n for n in nodes if gone.get(n, "unmask") == "unmask"]
    if len(summed) < info["threshold"]:
        assert total.accepted == [] and info["sites"] == 0
        return
    assert sorted(u.site for u in total.accepted) == [f"site{n}" for n in summed]
    assert info["masked_vectors_received"] == len(summed) and info["arrays_received"] == 0
    w = np.array([weights[n] for n in summed], float)
    for i, k in enumerate(g):
        expected = np.tensordot(w / w.sum(), np.stack([deltas[n][i] for n in summed]), axes=1)
        worst = float(np.abs(total.mean_delta[k] - expected).max())
        assert worst <= info["quantization_error_bound"] + 1e-6, (k, worst, info)

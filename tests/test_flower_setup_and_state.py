"""The Flower ServerApp's choice of the global model's plans: from the sites that agree, whatever order they
answer in (real ClientApp setup replies, in-process; the server's own setup and waiting code)."""
import copy
import json

import pytest


def _setup_replies(site_env, monkeypatch):
    """Setup replies of the three fixture sites through the real ClientApp, and one of a mis-planned site (the
    first site's plans with another patch size, as a site planned on its own would have)."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from nnunet_fed.deployment import messages as msgs
    from nnunet_fed.deployment.client_app import app
    from flwr.supercore.task_identity import TaskIdentity

    from nnunet_fed.deployment.runconfig import RunSettings

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    run = RunSettings(rounds=1, local_steps=1, val_steps=1, federation_name="DatasetFed_setup", min_sites=2,
                      wait_for_sites=30)
    replies = {}
    for i, d in enumerate(site_env["ids"][:2]):
        context = Context(run_id=1, node_id=i, state=RecordDict(), run_config=run.to_run_config(),
                          node_config={"dataset": d, "configuration": "2d", "trainer": run.trainer})
        reply = app(Message(msgs.global_content(None, {"round": -1}), dst_node_id=i, message_type=msgs.SETUP),
                    context)
        assert not reply.has_error(), reply.error.reason
        replies[site_env["names"][i]] = reply.content
    good = replies[site_env["names"][0]]
    plans = copy.deepcopy(json.loads(good[msgs.CONFIG]["plans"]))
    plans["configurations"]["2d"]["patch_size"] = [p * 2 for p in plans["configurations"]["2d"]["patch_size"]]
    replies["Dataset299_PlannedAlone"] = RecordDict({
        msgs.SITE: ConfigRecord({"name": "Dataset299_PlannedAlone"}),
        msgs.CONFIG: msgs.json_config(plans=plans, dataset_json=json.loads(good[msgs.CONFIG]["dataset_json"]))})
    return run, replies


class _Reply:
    def __init__(self, content):
        self.content = content

    def has_error(self):
        return False


@pytest.mark.parametrize("order", [["Dataset299_PlannedAlone", 0, 1], [0, "Dataset299_PlannedAlone", 1],
                                   [1, 0, "Dataset299_PlannedAlone"]],
                         ids=["misplanned-first", "misplanned-second", "misplanned-last"])
def test_misplanned_site_is_refused_whatever_order_sites_answer(site_env, monkeypatch, order):
    """Sites connect one at a time in the given order (min-sites 2): the two sites planned together make the
    global model and join; the one planned alone is refused with the difference named, even when it answers
    first (before, the first answer defined the network and the others were refused)."""
    from nnunet_fed.deployment.server_app import FederationServer

    run, replies = _setup_replies(site_env, monkeypatch)
    names = [o if isinstance(o, str) else site_env["names"][o] for o in order]

    class Grid:
        calls = 0

        def get_node_ids(self):  # one more SuperNode connected at each look
            Grid.calls += 1
            return list(range(min(Grid.calls, len(names))))

    class Server(FederationServer):
        def _exchange(self, content_by_node, message_type, group, timeout):
            for node in content_by_node:
                yield node, _Reply(replies[names[node]]), None

    server = Server(Grid(), run, poll_seconds=0.0)
    nodes = server.wait_for_sites()
    while Grid.calls < len(names):  # a site that connects after the global model exists is compared with it
        nodes = server.active_nodes()
    joined = {server.site_of(n) for n in nodes}
    assert joined == set(site_env["names"][:2])
    bad = names.index("Dataset299_PlannedAlone")
    assert bad in server.refused and "patch_size" in server.refused[bad], server.refused
    assert server.reference[0] in joined
    shapes = {k: v.shape for k, v in server.template.get_shared_arrays().items()}
    assert shapes  # the global network is built from the agreeing sites' plans


def test_two_federations_sharing_a_site_keep_separate_states(site_env, monkeypatch):
    """One site, one trainer, two federations (A, B) whose rounds interleave, through the real ClientApp: each
    continues from its own round state, and B's final model does not overwrite A's (A's outputs move to
    earlier_federations/ and come back when A trains again)."""
    import os

    import numpy as np
    import torch
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from nnunet_fed.deployment import messages as msgs
    from nnunet_fed.deployment.client_app import app
    from nnunet_fed.deployment.runconfig import RunSettings
    from nnunet_fed.deployment.server_app import FederationServer

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    run = RunSettings(rounds=2, local_steps=1, val_steps=1, federation_name="DatasetFed_shared",
                      final_validation=False)
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=run.to_run_config(),
                      node_config={"dataset": site_env["ids"][0], "configuration": "2d", "trainer": run.trainer,
                                   "device": "cpu"})

    def send(content, kind):
        reply = app(Message(content, dst_node_id=7, message_type=kind), context)
        assert not reply.has_error(), reply.error.reason
        return reply

    cfg = send(msgs.global_content(None, {"round": -1}), msgs.SETUP).content[msgs.CONFIG]
    import json
    template = FederationServer(None, run).build_template(json.loads(cfg["plans"]), json.loads(cfg["dataset_json"]))
    start = {"A": template.get_shared_arrays()}
    start["B"] = {k: (v * 0.5 if np.issubdtype(v.dtype, np.floating) else v) for k, v in start["A"].items()}
    fed = {"A": "DatasetFed_shared-aaaa", "B": "DatasetFed_shared-bbbb"}

    def train(who, r):
        reply = send(msgs.global_content(start[who], {"round": r, "num-rounds": 2, "federation": fed[who]}),
                     msgs.TRAIN)
        return msgs.update_from_message(reply)

    def finish(who):
        send(msgs.global_content(start[who], {"round": 2, "federation": fed[who], "final-validation": False}),
             msgs.FINISH)

    folder = os.path.join(site_env["results"], site_env["names"][0], f"{run.trainer}__nnUNetPlans__2d", "fold_0")
    train("A", 0)
    train("B", 0)
    train("A", 1)  # continues from A's round 0, not from B's newer one
    states = os.path.join(folder, "federated_rounds")
    assert sorted(os.listdir(states)) == sorted(fed.values())
    a1 = torch.load(os.path.join(states, fed["A"], "round_0001.pth"), map_location="cpu", weights_only=False)
    a0_loss = torch.load(os.path.join(states, fed["A"], "round_0000.pth"), map_location="cpu",
                         weights_only=False)["logging"]["train_losses"]
    assert a1["logging"]["train_losses"][:1] == a0_loss  # A's own history, one entry per A round
    assert len(a1["logging"]["train_losses"]) == 2
    finish("A")
    a_final = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    train("B", 1)  # B writes in the folder: A's outputs move aside, whole
    earlier = os.path.join(folder, "earlier_federations", fed["A"])
    assert os.path.isfile(os.path.join(earlier, "checkpoint_final.pth"))
    assert not os.path.isfile(os.path.join(folder, "checkpoint_final.pth"))
    finish("B")
    b_final = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    kept = torch.load(os.path.join(earlier, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    for k, v in a_final["network_weights"].items():
        assert torch.equal(kept["network_weights"][k], v), k
    assert any(not torch.equal(b_final["network_weights"][k], v) for k, v in a_final["network_weights"].items())
    with open(os.path.join(folder, "federation.json")) as f:
        assert json.load(f)["federation"] == fed["B"]

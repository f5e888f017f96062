"""The site worker ``nnunet_fed site join`` keeps alive: messages cross its local channel unchanged and without
pickle, it keeps the site's trainer between rounds only while the round state files say it may, and the real
ClientApp answers in its own process when the worker is gone (a killed worker resumes from the files)."""
import json
import os
import signal

import numpy as np
import pytest
import torch


def test_records_cross_the_worker_channel_unchanged_and_without_pickle():
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from nnunet_fed.deployment import messages as msgs
    from nnunet_fed.deployment.site_worker import decode_content, encode_content

    arrays = {"w": np.random.randn(3, 4).astype(np.float32), "n": np.arange(5, dtype=np.int64)}
    content = RecordDict({"arrays": msgs.arrays_to_record(arrays),
                          "config": ConfigRecord({"s": "x", "b": b"\x00\xff", "l": [1, 2], "f": 1.0, "t": True,
                                                  "bl": [b"a", b"b"]}),
                          "metrics": MetricRecord({"i": 3, "f": 2.5, "fl": [0.5, 1.5]})})
    back = decode_content(*encode_content(content))
    got = msgs.record_to_arrays(back["arrays"])
    assert set(got) == set(arrays) and all(np.array_equal(got[k], v) and got[k].dtype == v.dtype
                                           for k, v in arrays.items())
    assert dict(back["config"]) == dict(content["config"])
    assert type(back["config"]["f"]) is float and type(back["config"]["t"]) is bool
    assert dict(back["metrics"]) == dict(content["metrics"])
    # an object array (np.save with allow_pickle) in a reply is refused when read, never unpickled
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    bad = RecordDict({"arrays": ArrayRecord({"p": Array(dtype="object", shape=(1,), stype="numpy.ndarray",
                                                        data=buf.getvalue())})})
    with pytest.raises(msgs.MessageError, match="object"):
        msgs.record_to_arrays(decode_content(*encode_content(bad))["arrays"])


def _run(rounds=3):
    from nnunet_fed.deployment.runconfig import RunSettings

    return RunSettings(rounds=rounds, local_steps=2, val_steps=1, federation_name="DatasetFed_worker",
                       final_validation=False)


def _global(site_env, run, node_config, scale=1.0):
    from nnunet_fed.deployment import messages as msgs
    from nnunet_fed.deployment.server_app import FederationServer
    from nnunet_fed.deployment.site_runtime import SETUP, handle

    cfg = handle(SETUP, msgs.global_content(None, {"round": -1}), node_config, run.to_run_config())[msgs.CONFIG]
    template = FederationServer(None, run).build_template(json.loads(cfg["plans"]), json.loads(cfg["dataset_json"]))
    return {k: (v * scale if np.issubdtype(v.dtype, np.floating) else v)
            for k, v in template.get_shared_arrays().items()}


def test_worker_keeps_the_trainer_only_while_the_round_states_allow(site_env, monkeypatch):
    """Rounds answered by one process (as the worker does, ``sites`` kept): round 2 continues with the trainer in
    memory; a round repeated with another global model, and a round whose previous state file was replaced
    on disk, rebuild the trainer from the state files instead, and continue the site's own history."""
    from nnunet_fed.deployment import messages as msgs
    from nnunet_fed.deployment.site_runtime import TRAIN, handle, site_key

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    run = _run()
    node_config = {"dataset": site_env["ids"][0], "configuration": "2d", "trainer": run.trainer, "device": "cpu"}
    start = _global(site_env, run, node_config)
    sites = {}

    def train(r, arrays):
        content = msgs.global_content(arrays, {"round": r, "num-rounds": run.rounds, "federation": "F-1"})
        handle(TRAIN, content, node_config, run.to_run_config(), sites=sites)
        site = sites[site_key(node_config, run.to_run_config())]
        return site, site.trainer

    site, first = train(0, start)
    assert first is not None and first.current_epoch == 1
    _, kept = train(1, start)
    assert kept is first and kept.current_epoch == 2  # the trainer in memory continued
    assert site.timings["setup_seconds"] < 0.5
    _, rebuilt = train(1, _global(site_env, run, node_config, scale=0.5))  # round 2 again, another global model
    assert rebuilt is not first and rebuilt.current_epoch == 2
    state = torch.load(site.state_file(1), map_location="cpu", weights_only=False)
    r0 = torch.load(site.state_file(0), map_location="cpu", weights_only=False)
    assert state["logging"]["train_losses"][:1] == r0["logging"]["train_losses"]  # from round 1's state file
    assert len(state["logging"]["train_losses"]) == 2
    # round 2's state replaced on disk (another process, a restored backup): round 3 does not trust memory
    os.utime(site.state_file(1), (os.path.getmtime(site.state_file(1)) + 5,) * 2)
    _, third = train(2, start)
    assert third is not rebuilt and third.current_epoch == 3


def test_client_app_forwards_to_the_worker_and_answers_itself_when_it_is_gone(site_env, monkeypatch, tmp_path):
    """The real ClientApp with a real worker process: setup and two rounds are answered by the worker (its log
    has them; the trainer is kept: round 2's set-up is only the folder check); the worker is killed; the final message is answered in
    the ClientApp's own process from the round state files, and the site's final model is written."""
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from nnunet_fed.deployment import messages as msgs
    from nnunet_fed.deployment.client_app import app
    from nnunet_fed.deployment.launch import SiteWorker

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    run = _run(rounds=2)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    log = str(tmp_path / "worker.log")
    worker = SiteWorker(site_env["names"][0], str(private / "worker.sock"), log)
    node_config = {"dataset": site_env["ids"][0], "configuration": "2d", "trainer": run.trainer, "device": "cpu",
                   "worker": worker.socket_path}
    start = _global(site_env, run, node_config)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=run.to_run_config(),
                      node_config=node_config)

    def send(content, kind):
        reply = app(Message(content, dst_node_id=7, message_type=kind), context)
        assert not reply.has_error(), reply.error.reason
        return reply

    worker.start(wait=True)
    try:
        assert send(msgs.global_content(None, {"round": -1}), msgs.SETUP).content[msgs.SITE]["name"] == \
            site_env["names"][0]
        updates = [msgs.update_from_message(send(msgs.global_content(
            start, {"round": r, "num-rounds": 2, "federation": "F-2"}), msgs.TRAIN)) for r in (0, 1)]
        with open(log) as f:
            text = f.read()
        assert "round 1/2 sent" in text and "round 2/2 sent" in text, text[-2000:]
        assert updates[1].metrics["setup_seconds"] < updates[0].metrics["setup_seconds"]  # no rebuild in round 2
        os.kill(worker.proc.pid, signal.SIGKILL)
        worker.proc.proc.wait(30)
        send(msgs.global_content(start, {"round": 2, "federation": "F-2", "final-validation": False}), msgs.FINISH)
    finally:
        worker.stop()
    folder = os.path.join(site_env["results"], site_env["names"][0], f"{run.trainer}__nnUNetPlans__2d", "fold_0")
    final = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert len(final["logging"]["train_losses"]) == 2  # both rounds, read back from the worker's state files
    with open(log) as f:
        assert "final model written" not in f.read()  # the dead worker did not answer it

"""The Flower ClientApp: one site of a deployed federation, training with the site's nnU-Net trainer.

A SuperNode starts a fresh ``flwr-clientapp`` process for every message and that process exits after its
reply (Flower 1.41). This app therefore imports neither torch nor nnU-Net: it forwards the message's content to
the site worker ``nnunet_fed site join`` keeps alive (:mod:`nnunet_fed.deployment.site_worker`, named by the
node config's ``worker``), which holds the trainer between rounds. Where no worker answers (a SuperNode started
without one, a worker not yet ready or killed) the message is answered in this process by the same code
(:func:`nnunet_fed.deployment.site_runtime.handle`), rebuilding the trainer from the site's round state files.

Site settings come from the SuperNode's node config (``dataset``, ``configuration``, ``trainer``, ``device``,
``worker``), the federation's from the run config; a site refuses a run whose trainer or configuration differ from
its own. A round under secure aggregation arrives as Flower's SecAgg+ protocol (four train messages, handled by
``secaggplus_mod``); its training message is answered like any round, then masked
(:mod:`nnunet_fed.deployment.secure_aggregation`). How a site keeps each federation's round states and outputs
apart: :mod:`nnunet_fed.deployment.site_runtime`.
"""
from __future__ import annotations

import os
import sys

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from nnunet_fed.deployment import secure_aggregation as secure
from nnunet_fed.deployment import site_worker
from nnunet_fed.deployment.launch import process_start_ticks
from nnunet_fed.deployment.site_worker import FINISH, SETUP, TRAIN


def _process_age() -> float:
    """Seconds since this process started (flwr-clientapp start -> message handling)."""
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - float(process_start_ticks(os.getpid())) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, TypeError):
        return float("nan")


def answer(kind: str, msg: Message, context: Context) -> Message:
    """The site's reply to ``msg``: from the site worker, or computed here when none answers."""
    return Message(answer_content(kind, msg.content, context), reply_to=msg)


def answer_content(kind: str, content: RecordDict, context: Context) -> RecordDict:
    process_seconds = _process_age()
    node_config, run_config = dict(context.node_config), dict(context.run_config)
    socket_path = str(node_config.get(site_worker.NODE_CONFIG_KEY, "") or "")
    if socket_path:
        try:
            return site_worker.call(socket_path, kind, content, node_config, run_config, process_seconds)
        except site_worker.WorkerUnavailable as e:
            print(f"{e}: answering in the ClientApp process (the trainer is rebuilt from the round state files)",
                  file=sys.stderr, flush=True)
    from nnunet_fed.deployment.site_runtime import handle

    return handle(kind, content, node_config, run_config, process_seconds)


app = ClientApp()


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    return answer(SETUP, msg, context)


@app.train(mods=[secure.secure_mod])
def train(msg: Message, context: Context) -> Message:
    if secure.is_fit_message(msg.content):  # a secure round: train, then hand the update to SecAgg+ for masking
        reply = answer_content(TRAIN, secure.global_content_of(msg.content), context)
        return Message(secure.fitres_content(reply), reply_to=msg)
    return answer(TRAIN, msg, context)


@app.query("finish")
def finish(msg: Message, context: Context) -> Message:
    return answer(FINISH, msg, context)

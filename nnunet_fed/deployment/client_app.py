"""The Flower ClientApp: one site of a deployed federation, training with the site's nnU-Net trainer.

A SuperNode starts a fresh ``flwr-clientapp`` process for every message and that process exits after its
reply (Flower 1.41). This app therefore imports neither torch nor nnU-Net: it forwards the message's content to
the site worker ``nnunet_fed site join`` keeps alive (:mod:`nnunet_fed.deployment.site_worker`, named by the
node config's ``worker``), which holds the trainer between rounds. Where no worker answers (a SuperNode started
without one, a worker not yet ready or killed) the message is answered in this process by the same code
(:func:`nnunet_fed.deployment.site_runtime.handle`), rebuilding the trainer from the site's round state files.

Site settings come from the SuperNode's node config (``dataset``, ``configuration``, ``trainer``, ``device``,
``worker``), the federation's from the run config; a site refuses a run whose trainer or configuration differ from
its own. How a site keeps each federation's round states and outputs apart: :mod:`nnunet_fed.deployment.
site_runtime`.
"""
from __future__ import annotations

import os
import sys

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

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
    process_seconds = _process_age()
    node_config, run_config = dict(context.node_config), dict(context.run_config)
    socket_path = str(node_config.get(site_worker.NODE_CONFIG_KEY, "") or "")
    if socket_path:
        try:
            content = site_worker.call(socket_path, kind, msg.content, node_config, run_config, process_seconds)
            return Message(content, reply_to=msg)
        except site_worker.WorkerUnavailable as e:
            print(f"{e}: answering in the ClientApp process (the trainer is rebuilt from the round state files)",
                  file=sys.stderr, flush=True)
    from nnunet_fed.deployment.site_runtime import handle

    return Message(handle(kind, msg.content, node_config, run_config, process_seconds), reply_to=msg)


app = ClientApp()


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    return answer(SETUP, msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return answer(TRAIN, msg, context)


@app.query("finish")
def finish(msg: Message, context: Context) -> Message:
    return answer(FINISH, msg, context)

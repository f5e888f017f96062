"""The site worker: a process ``nnunet_fed site join`` keeps alive beside the SuperNode, holding the site's
trainer from one round to the next.

Why a worker of our own: a Flower 1.41 SuperNode runs every message in a fresh ``flwr-clientapp`` process that
exits after its reply (in both isolation modes; the SuperExec's warm executor only pre-starts Kubernetes pods),
and Flower has no way to keep an app's objects alive between messages. Rebuilding the trainer in that process
costs the torch and nnU-Net imports, the trainer's construction, its data loaders and the state loading, every
round (``benchmarks/deployment_overhead.py``). So the ClientApp (:mod:`nnunet_fed.deployment.client_app`) only
forwards each message's content to this worker, which answers it with
:func:`nnunet_fed.deployment.site_runtime.handle` and keeps the :class:`~nnunet_fed.deployment.site_runtime.
DeployedSite` objects, trainers included. The round state files stay the source of truth: a trainer in memory is
used only when it wrote the newest state before the round, and a worker that is killed is restarted by
``site join`` and continues from the files, as the ClientApp does by itself when no worker answers.

The channel is local to the site: a Unix domain socket in a folder only the site's user can open (mode 0700),
named in the SuperNode's node config (``worker``). It carries a JSON header and the arrays' bytes as Flower
serialised them (numpy's format, read back with ``allow_pickle=False``): nothing is unpickled. The worker answers
one message at a time.

Frame: 8-byte big-endian header length, the header (JSON), then the blobs the header lists, in order.
Header of a request: ``kind`` (setup, train, finish), ``node_config``, ``run_config``, ``process_seconds`` (the
ClientApp process's age when it forwarded) and ``content`` (the records, see :func:`encode_content`). Reply:
``ok`` with ``content``, or ``ok`` false with ``error`` (the exception's type name) and ``message``.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import socketserver
import struct
import sys
import traceback

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

NODE_CONFIG_KEY = "worker"  # the SuperNode's node config entry naming the worker's socket
SETUP, TRAIN, FINISH = "setup", "train", "finish"  # the kinds of message a site answers
_RECORD_TYPES = {"arrays": ArrayRecord, "config": ConfigRecord, "metrics": MetricRecord}
_MAX_HEADER = 64 * 1024 * 1024


class WorkerUnavailable(ConnectionError):
    """No worker answered (not started yet, stopped, or it ended during the message)."""


class WorkerError(RuntimeError):
    """The worker answered with an error (the site's own, e.g. a site that cannot take part)."""


# ---------------------------------------------------------------------------------------------- encoding
def _encode_value(value):
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [_encode_value(v) for v in value]
    if isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"record value of type {type(value).__name__} cannot be forwarded")


def _decode_value(value):
    if isinstance(value, dict):
        if set(value) != {"bytes"}:
            raise ValueError("malformed record value")
        return base64.b64decode(value["bytes"])
    if isinstance(value, list):
        return [_decode_value(v) for v in value]
    return value


def encode_content(content: RecordDict) -> tuple[list, list[bytes]]:
    """A RecordDict as JSON-able records and the arrays' serialised bytes (Flower's ``Array.data``)."""
    records, blobs = [], []
    for name, record in content.items():
        kind = next((k for k, t in _RECORD_TYPES.items() if isinstance(record, t)), None)
        if kind is None:
            raise TypeError(f"record {name!r} of type {type(record).__name__} cannot be forwarded")
        if kind == "arrays":
            items = []
            for key, arr in record.items():
                items.append([key, arr.dtype, list(arr.shape), arr.stype, len(arr.data)])
                blobs.append(bytes(arr.data))
        else:
            items = [[key, _encode_value(v)] for key, v in record.items()]
        records.append([name, kind, items])
    return records, blobs


def decode_content(records: list, blobs: list[bytes]) -> RecordDict:
    """Inverse of :func:`encode_content`; array bytes are kept as they came (decoded later with numpy's
    ``allow_pickle=False`` by :func:`nnunet_fed.deployment.messages.record_to_arrays`)."""
    out, pos = {}, 0
    for name, kind, items in records:
        if kind == "arrays":
            arrays = {}
            for key, dtype, shape, stype, _ in items:
                arrays[key] = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=blobs[pos])
                pos += 1
            out[name] = ArrayRecord(arrays)
        elif kind in _RECORD_TYPES:
            out[name] = _RECORD_TYPES[kind]({key: _decode_value(v) for key, v in items})
        else:
            raise ValueError(f"unknown record type {kind!r}")
    return RecordDict(out)


def _send(sock: socket.socket, header: dict, blobs: list[bytes]) -> None:
    data = json.dumps(header, default=_encode_value).encode()  # bytes in a node or run config as in records
    sock.sendall(struct.pack("!Q", len(data)) + data)
    for blob in blobs:
        sock.sendall(blob)


def _read_exactly(stream, n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) != n:
        raise EOFError("the connection ended mid-message")
    return data


def _receive(stream) -> tuple[dict, list[bytes]]:
    (size,) = struct.unpack("!Q", _read_exactly(stream, 8))
    if size > _MAX_HEADER:
        raise ValueError(f"message header of {size} bytes")
    header = json.loads(_read_exactly(stream, size))
    sizes = [item[4] for _, kind, items in header.get("content", []) if kind == "arrays" for item in items]
    return header, [_read_exactly(stream, int(n)) for n in sizes]


# ---------------------------------------------------------------------------------------------- client side
def call(socket_path: str, kind: str, content: RecordDict, node_config: dict, run_config: dict,
         process_seconds: float, timeout: float | None = None) -> RecordDict:
    """Forward one message to the worker at ``socket_path``; its reply's content.

    Raises :class:`WorkerUnavailable` when no worker answers (or it ends before replying) and :class:`WorkerError`
    with the worker's error message when the site could not answer."""
    records, blobs = encode_content(content)
    header = {"kind": kind, "node_config": dict(node_config), "run_config": dict(run_config),
              "process_seconds": float(process_seconds), "content": records}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
        except OSError as e:
            raise WorkerUnavailable(f"no site worker at {socket_path} ({e.strerror or e})") from None
        try:
            _send(sock, header, blobs)
            with sock.makefile("rb") as stream:
                reply, reply_blobs = _receive(stream)
        except (OSError, EOFError, ValueError) as e:
            raise WorkerUnavailable(f"the site worker at {socket_path} ended during the message ({e})") from None
    finally:
        sock.close()
    if not reply.get("ok"):
        raise WorkerError(f"{reply.get('error', 'Error')}: {reply.get('message', '')}")
    return decode_content(reply["content"], reply_blobs)


# ---------------------------------------------------------------------------------------------- worker side
class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        from nnunet_fed.deployment.site_runtime import handle

        if not self.rfile.peek(1):  # a connection that only checked the worker is up
            return
        try:
            header, blobs = _receive(self.rfile)
        except (EOFError, ValueError, json.JSONDecodeError) as e:
            print(f"site worker: a malformed request was dropped ({e})", file=sys.stderr, flush=True)
            return
        try:
            content = decode_content(header.get("content", []), blobs)
            reply = handle(str(header["kind"]), content, dict(header["node_config"]), dict(header["run_config"]),
                           float(header.get("process_seconds", 0.0)), sites=self.server.sites)
            records, out_blobs = encode_content(reply)
            answer = {"ok": True, "content": records}
        except Exception as e:  # the site's error goes back to the ClientApp, and so to the server's log
            traceback.print_exc()
            answer, out_blobs = {"ok": False, "error": type(e).__name__, "message": str(e)}, []
        try:
            _send(self.connection, answer, out_blobs)
        except OSError as e:
            print(f"site worker: the reply could not be sent ({e})", file=sys.stderr, flush=True)


class _Server(socketserver.UnixStreamServer):
    def __init__(self, path: str):
        super().__init__(path, _Handler)
        self.sites: dict = {}


def serve(socket_path: str) -> None:
    """Import the site's runtime (torch, nnU-Net) once, then answer messages on ``socket_path`` until SIGTERM."""
    import nnunet_fed.deployment.site_runtime  # noqa: F401  (the imports every message would otherwise pay)

    folder = os.path.dirname(os.path.abspath(socket_path))
    if os.stat(folder).st_mode & 0o077:
        raise SystemExit(f"site worker: {folder} is open to other users; the socket must be in a private folder")
    if os.path.exists(socket_path):
        os.remove(socket_path)
    server = _Server(socket_path)

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"site worker: ready on {socket_path} (pid {os.getpid()})", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if os.path.exists(socket_path):
            os.remove(socket_path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="nnunet_fed site worker (started by nnunet_fed site join)")
    p.add_argument("--socket", required=True, help="Unix socket path, in a folder only this user can open")
    serve(p.parse_args(argv).socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())

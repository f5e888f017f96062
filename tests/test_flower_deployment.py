"""Flower deployment on loopback: a real SuperLink (nnunet_fed server) and SuperNodes (nnunet_fed site join),
nnU-Net training on the tiny fixture sites, faults (a SuperNode killed mid-round, a server killed and restarted),
and what a site puts on the wire (arrays only, no pickle, no local parameter)."""
import contextlib
import io
import json
import os
import pickletools
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from conftest import dp_accounting_epsilon, nnunet_fed_cmd, run_cli

TRAINER = "nnUNetTrainerFedAvg"
FED = "DatasetFed_flowertest"


def _free_port():
    from nnunet_fed.deployment.launch import free_port

    return free_port()


class Federation:
    """nnunet_fed server + site join processes, each in its own process group; all ended by close().

    ``secure``: TLS (a CA and a certificate for 127.0.0.1 made here), node authentication with a key pair per
    site, and the server on every interface (``--host 0.0.0.0``), as a hospital runs it; else ``--insecure``."""

    def __init__(self, site_env, tmp_path, name=FED, secure=False):
        self.env = {**os.environ, **site_env["env"], "nnUNet_n_proc_DA": "0"}
        self.tmp, self.name, self.port = tmp_path, name, _free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.fold = os.path.join(site_env["results"], name, f"{TRAINER}__nnUNetPlans__2d", "fold_0")
        self.secure, self.node_keys = secure, {}
        if secure:
            from conftest import write_node_key
            from nnunet_fed.deployment.launch import write_certificates

            self.tls = write_certificates(str(tmp_path / "operator_tls"))
            self.node_keys = {str(d): write_node_key(str(tmp_path), f"site{d}") for d in site_env["ids"]}

    def tls_args(self, side, dataset=None, private_key=None):
        if not self.secure:
            return ["--insecure"]
        if side == "server":
            return ["--host", "0.0.0.0", "--ssl-certfile", self.tls.certfile, "--ssl-keyfile", self.tls.keyfile,
                    "--auth-supernode-keys", *[pub for _, pub in self.node_keys.values()]]
        return ["--root-certificates", self.tls.ca_certfile, "--auth-supernode-private-key",
                private_key or self.node_keys[str(dataset)][0]]

    def _start(self, key, args, env=None):
        log = open(self.tmp / f"{key}.log", "ab")
        self.procs[key] = subprocess.Popen(args, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        log.close()
        return self.procs[key]

    def server(self, rounds, *extra, key="server"):
        return self._start(key, nnunet_fed_cmd() + [
            "server", "--rounds", str(rounds), "-c", "2d", "-tr", TRAINER, "--local-steps", "2", "--val-steps", "1",
            "--no-val", *self.tls_args("server"), "--port", str(self.port), "--federation-name", self.name, *extra])

    def join(self, dataset, key=None):
        key = key or f"site{dataset}"
        env = {**self.env, "FLWR_HOME": str(self.tmp / f"flwr_{key}")}
        return self._start(key, nnunet_fed_cmd() + [
            "site", "join", "--superlink", f"127.0.0.1:{self.port}", "-d", str(dataset), "-c", "2d", "-tr", TRAINER,
            "--device", "cpu", *self.tls_args("site", dataset)], env)

    def kill(self, key, sig=signal.SIGKILL):
        proc = self.procs[key]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(30)

    def close(self):
        """SIGTERM to every process group at once, up to 30 s for them to end, then SIGKILL to what is left."""
        running = [p for p in self.procs.values() if p.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 30
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(deadline - time.time(), 0.1))
        time.sleep(1)
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def log(self, key):
        return (self.tmp / f"{key}.log").read_text(errors="replace")

    def metrics(self):
        path = os.path.join(self.fold, "federation_metrics.jsonl")
        if not os.path.isfile(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def server_log(self):
        path = os.path.join(self.fold, "federation_server.log")
        return open(path).read() if os.path.isfile(path) else ""

    def wait(self, condition, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return
            if self.procs.get("server") is not None and self.procs["server"].poll() is not None and \
                    "server" in what:
                break
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}\n--- server log:\n{self.server_log()[-3000:]}\n"
                             f"--- server output:\n{self.log('server')[-3000:]}")

    def wait_server(self, key="server", timeout=420):
        try:
            rc = self.procs[key].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server still running after {timeout} s\n{self.server_log()[-3000:]}") from None
        assert rc == 0, f"server exited with {rc}\n{self.log(key)[-4000:]}\n{self.server_log()[-3000:]}"


@pytest.fixture
def federation(site_env, tmp_path):
    fed = Federation(site_env, tmp_path)
    yield fed
    fed.close()


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["network_weights"]


def _site_fold(site_env, name):
    return os.path.join(site_env["results"], name, f"{TRAINER}__nnUNetPlans__2d", "fold_0")


def _committed_rounds(fold):
    from nnunet_fed.federation.records import load_server_state

    state = load_server_state(fold)
    return state["completed_rounds"] if state else 0


def test_site_killed_mid_round_then_rejoins_under_secure_aggregation(site_env, federation):
    """Three sites, --min-sites 2, --secure-aggregation, through a real SuperLink and SuperNodes: one SuperNode is
    killed (SIGKILL) at its first SecAgg+ message of round 1; Flower's SecAgg+ round commits with the other two
    (the threshold is 2); the site rejoins and takes part in round 2. In both rounds the server received no array in
    the clear, one masked vector per site in the sum, and round 2's global model is the FedAvg of the three sites'
    updates (from their round state files) within the quantisation bound."""
    from conftest import site_round_updates
    from nnunet_fed.federation.aggregation import FedAvg
    from nnunet_fed.federation.records import load_server_state

    fed = federation
    fed.server(2, "--min-sites", "2", "--secure-aggregation", "--round-timeout", "300")
    for d in site_env["ids"]:
        fed.join(d)
    victim, victim_name = site_env["ids"][2], site_env["names"][2]
    fed.wait(lambda: fed.server_log().count("joined") >= 3, 240, "three sites joined the server")
    # the victim's SuperNode reports round 1's first SecAgg+ message (the protocol's messages are train messages)
    fed.wait(lambda: "train message" in fed.log(f"site{victim}"), 120, "the round's train message at the site")
    fed.kill(f"site{victim}")  # SIGKILL: the SuperNode, its SuperExec and its flwr-clientapp
    fed.join(victim, key="rejoined")  # the site restarts at once; it takes part from the next round on
    fed.wait_server()

    rows = fed.metrics()
    assert [r["round"] for r in rows] == [0, 1]
    assert set(rows[0]["sites"]) == set(site_env["names"][:2])  # round 1 committed without the killed site
    assert [f["site"] for f in rows[0]["rejected"] + rows[0]["failed"]] == [victim_name], rows[0]
    assert set(rows[1]["sites"]) == set(site_env["names"])  # the rejoined site trained round 2
    for row, sites in zip(rows, (2, 3)):
        info = row["secure_aggregation"]
        assert info["arrays_received"] == 0 and info["masked_vectors_received"] == sites and info["threshold"] == 2
    assert _committed_rounds(fed.fold) == 2
    assert os.path.isfile(os.path.join(fed.fold, "checkpoint_final.pth"))
    committed = load_server_state(fed.fold)["global_arrays"]
    updates = site_round_updates(site_env, fed.fold, TRAINER, 1)
    assert len(updates) == 3
    expected = FedAvg().aggregate(committed, iter(updates))
    bound = rows[1]["secure_aggregation"]["quantization_error_bound"] + 1e-6
    worst = max(float(np.abs(committed[k].astype(np.float64) - expected[k]).max()) for k in expected)
    assert worst <= bound, (worst, rows[1])
    spread = max(float(np.abs(u.arrays[k] - expected[k]).max()) for u in updates for k in expected)
    assert spread > 10 * bound  # the sites' models differ: a real average
    for name in site_env["names"]:  # no lost checkpoints: every site has its final model and its round state
        fold = _site_fold(site_env, name)
        assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth")), name
        with open(os.path.join(fed.fold, "federation_id")) as f:  # each federation's states apart at a site
            own = f"{fed.name}-{f.read().strip()}"
        assert os.path.isfile(os.path.join(fold, "federated_rounds", own, "round_0001.pth")), name
    ck = torch.load(os.path.join(_site_fold(site_env, victim_name), "checkpoint_final.pth"), map_location="cpu",
                    weights_only=False)
    assert len(ck["logging"]["lrs"]) == 2  # the missed round is filled in; the LR schedule follows the federation


def _process_group(pgid: int) -> list[int]:
    from nnunet_fed.deployment.launch import process_stat
    stats = {int(d): process_stat(int(d)) for d in os.listdir("/proc") if d.isdigit()}
    return [pid for pid, fields in stats.items() if fields and fields[2] == str(pgid)]


def _tcp_listeners(pids) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket the processes hold (Linux /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                    host, port = cols[1].rsplit(":", 1)
                    addr = ".".join(str(int(host[i:i + 2], 16)) for i in (6, 4, 2, 0)) if len(host) == 8 else \
                        ("::" if set(host) == {"0"} else "::1" if host.endswith("01000000") else host)
                    found.add((addr, int(port, 16)))
    return found


def _hold_write_lock(database: str, seconds: float) -> None:
    """Take SQLite's write lock on ``database`` from outside (``BEGIN IMMEDIATE``) and keep it ``seconds``."""
    import sqlite3

    con = sqlite3.connect(database, timeout=60, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        time.sleep(seconds)
        con.execute("ROLLBACK")
    finally:
        con.close()


def _end_log_stream(server_pid: int) -> None:
    """SIGKILL the server's ``flwr log`` process (Linux /proc), as a Control API error ends its stream."""
    deadline, found = time.time() + 60, {}
    while time.time() < deadline:
        with open(f"/proc/{server_pid}/task/{server_pid}/children") as f:
            children = [int(p) for p in f.read().split()]
        found = {}
        for pid in children:
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    found[pid] = f.read().split(b"\0")
        streams = [pid for pid, args in found.items() if b"log" in args[1:3]]
        if len(streams) == 1:
            os.kill(streams[0], signal.SIGKILL)
            return
        time.sleep(0.5)
    raise AssertionError(f"no `flwr log` stream among the server's processes: {found}")


def _check_admission(fed, site_env, tmp_path) -> dict:
    """An outsider holding the CA certificate every site has, at every port the server machine opens beyond
    loopback: cannot register a node key, list runs or join with its own key. Returns the server's processes."""
    from conftest import write_node_key
    from nnunet_fed.deployment.launch import write_connection

    with open(os.path.join(fed.fold, "flower", "processes.json")) as f:
        record = json.load(f)
    procs = {k: v["pid"] for k, v in record.items() if "pid" in v}
    procs["superlink_port"] = record["superlink_port"]["port"]
    groups = {pid for name in ("superlink", "gateway") for pid in _process_group(procs[name])}
    listeners = _tcp_listeners(groups | {procs["server"]})
    public = {(a, p) for a, p in listeners if a not in ("127.0.0.1", "::1")}
    assert public == {("0.0.0.0", fed.port)}, listeners  # only the gateway is reachable from other machines
    _, foreign_pub = write_node_key(str(tmp_path), "outsider")
    home = str(tmp_path / "outsider_home")
    write_connection(home, f"127.0.0.1:{fed.port}", fed.tls)
    outsider = {**fed.env, "FLWR_HOME": home}
    for cmd in (["supernode", "register", foreign_pub, "nnunet_fed"], ["ls", "nnunet_fed"],
                ["supernode", "list", "nnunet_fed"]):
        proc = subprocess.run(["flwr", *cmd], env=outsider, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 or '"success": false' in proc.stdout, (cmd, proc.stdout, proc.stderr)
    own = subprocess.run(["flwr", "supernode", "list", "nnunet_fed", "--format", "json"], capture_output=True,
                         text=True, env={**fed.env, "FLWR_HOME": os.path.join(fed.fold, "flower", "home")})
    nodes = json.loads(own.stdout[own.stdout.index("{"):])["nodes"]
    assert len([n for n in nodes if n["status"] != "unregistered"]) == len(fed.node_keys)  # no node added
    # a SuperNode with a key of its own, for a real dataset: refused at connection
    foreign, _ = write_node_key(str(tmp_path), "outsider_node")
    env = {**fed.env, "FLWR_HOME": str(tmp_path / "flwr_outsider")}
    node = fed._start("outsider", nnunet_fed_cmd() + [
        "site", "join", "--superlink", f"127.0.0.1:{fed.port}", "-d", site_env["ids"][2], "-c", "2d", "-tr",
        TRAINER, "--device", "cpu", *fed.tls_args("site", private_key=foreign)], env)
    assert node.wait(180) != 0, fed.log("outsider")
    return {**procs, "groups": groups}


def test_superlink_failure_stops_the_server_and_is_in_its_log(site_env, federation):
    """The SuperLink dies while the server waits for sites: nnunet_fed server does not hang on the run; it exits
    with an error, and federation_server.log says what ended and where its log is."""
    fed = federation
    fed.server(1, "--min-sites", "1")
    fed.wait(lambda: re.search(r"^run \d+:", fed.log("server"), re.M), 120, "run submitted")
    with open(os.path.join(fed.fold, "flower", "processes.json")) as f:
        superlink = json.load(f)["superlink"]["pid"]
    os.killpg(superlink, signal.SIGKILL)
    assert fed.procs["server"].wait(60) == 1
    log = fed.server_log()
    assert "SuperLink exited with code" in log and "superlink.log" in log, log


def test_server_killed_and_restarted_resumes_then_nnunet_predict(site_env, tmp_path):
    """Two sites, two rounds on Flower with TLS and node authentication, the server on every interface; an outsider
    with the CA certificate cannot register a key, list runs or join (only the Fleet gateway is reachable beyond
    loopback). While the run is under way a writer holds the SuperLink's database for 12 s and the server's log
    stream is killed: the run goes on, with no request failed on the lock. The server process is killed (SIGKILL,
    as `kill -9`) during round 2 and started again with the same command: its SuperLink did not outlive it, the
    node keys are taken on the first try, it resumes after the committed round (with the server optimiser's state:
    Flower's FedAvgM), every round trains exactly once at each site, every site ends with the global parameters,
    and nnUNetv2_predict runs on the global model."""
    fed = Federation(site_env, tmp_path, secure=True)
    try:
        _killed_and_restarted(fed, site_env, tmp_path)
    finally:
        fed.close()


def _killed_and_restarted(fed, site_env, tmp_path):
    args = ("--min-sites", "2", "--round-timeout", "300", "--strategy", "fedavgm",
            "--strategy-option", "server_momentum=0.5")
    fed.server(2, *args)
    fed.wait(lambda: "sites join with" in fed.log("server"), 120, "server up")
    for d in site_env["ids"][:2]:
        fed.join(d)
    first = _check_admission(fed, site_env, tmp_path)
    # what a loaded machine does to a run, while it is under way: a writer stalls holding the SuperLink's SQLite
    # database longer than Flower's own busy timeout (5 s), and the server's `flwr log` stream ends before the run
    _hold_write_lock(os.path.join(fed.fold, "flower", "superlink.db"), seconds=12)
    _end_log_stream(fed.procs["server"].pid)
    fed.wait(lambda: _committed_rounds(fed.fold) >= 1, 300, "round 1 committed")
    assert fed.procs["server"].poll() is None, fed.log("server")[-3000:]  # the run goes on
    assert "database is locked" not in fed.server_log(), fed.server_log()[-3000:]  # Flower waited for the lock
    from nnunet_fed.deployment.launch import process_running, runtime_processes

    assert runtime_processes(first["superlink_port"])  # the run's ServerApp (its own session, ignores SIGTERM)
    os.kill(fed.procs["server"].pid, signal.SIGKILL)  # the server process alone
    fed.procs["server"].wait(30)
    deadline = time.time() + 30
    while (any(process_running(first[n]) for n in ("superlink", "gateway"))
           or runtime_processes(first["superlink_port"])) and time.time() < deadline:
        time.sleep(0.5)
    for n in ("superlink", "gateway"):  # they do not serve on without the server (ended; maybe not yet reaped)
        assert not process_running(first[n]), n
    assert not runtime_processes(first["superlink_port"])  # nor does the ServerApp
    from nnunet_fed.federation.records import load_server_state

    committed = load_server_state(fed.fold)
    assert committed["completed_rounds"] == 1  # killed during round 2
    assert committed["strategy_state"]["server_round"] == 1 and committed["strategy_state"]["momentum_vector"]
    assert not os.path.isfile(os.path.join(fed.fold, "checkpoint_final.pth"))

    fed.server(2, *args, key="server2")  # the same command
    deadline = time.time() + 60
    while f"resuming after round {committed['completed_rounds']}" not in fed.server_log() and time.time() < deadline:
        time.sleep(0.5)
    assert f"resuming after round {committed['completed_rounds']}" in fed.server_log()
    fed.wait_server("server2")
    assert f"nnUNetv2_predict -d {FED}" in fed.log("server2")
    assert "already in use" not in fed.log("server2")
    assert not _process_group(first["superlink"]) and not _process_group(first["gateway"])  # nothing of the first
    # server's Flower processes (the ServerApp runs in the SuperLink's group) is left

    rows = fed.metrics()
    sites = set(site_env["names"][:2])
    assert [r["round"] for r in rows] == [0, 1]
    for r in rows:
        assert set(r["sites"]) == sites and r["rejected"] == [] and r["failed"] == []
        for m in r["sites"].values():
            assert m["local_steps"] == 2 and m["num_examples"] > 0 and np.isfinite(m["train_loss"])
            assert m["setup_seconds"] >= 0 and m["process_seconds"] > 0  # cost of a fresh trainer per round
    assert _committed_rounds(fed.fold) == 2
    assert load_server_state(fed.fold)["strategy_state"]["server_round"] == 2  # the restarted server continued it
    assert os.path.isfile(os.path.join(fed.fold, "checkpoint_final.pth"))
    for name in sites:
        ck = torch.load(os.path.join(_site_fold(site_env, name), "checkpoint_final.pth"), map_location="cpu",
                        weights_only=False)
        assert len(ck["logging"]["train_losses"]) == 2, name  # every round trained exactly once at each site

    # the global model in nnU-Net's layout; FedAvg: every site ends with the global parameters
    gw = _weights(os.path.join(fed.fold, "checkpoint_final.pth"))
    for name in sites:
        sw = _weights(os.path.join(_site_fold(site_env, name), "checkpoint_final.pth"))
        assert sw.keys() == gw.keys()
        for k in gw:
            assert torch.equal(sw[k], gw[k]), k

    raw = os.path.join(site_env["env"]["nnUNet_raw"], site_env["names"][0])
    pred = str(tmp_path / "pred")
    penv = {**site_env["env"], "nnUNet_extTrainer": run_cli(nnunet_fed_cmd() + ["trainer-path"],
                                                              site_env["env"]).stdout.strip()}
    run_cli(["nnUNetv2_predict", "-i", os.path.join(raw, "imagesTs"), "-o", pred, "-d", FED, "-tr", TRAINER,
             "-c", "2d", "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], penv)
    assert len([f for f in os.listdir(pred) if f.endswith(".nii.gz")]) == len(os.listdir(os.path.join(raw, "imagesTs")))


# ---------------------------------------------------------------------------- what a site sends

LOCAL_TRAINER = '''
from nnunet_fed.federation.trainer import nnUNetTrainerFederated
from nnunet_fed.federation.update import SharingPolicy


class nnUNetTrainerFedLocalHead(nnUNetTrainerFederated):
    """Test trainer: the segmentation heads stay at the site."""
    sharing_policy = SharingPolicy([r"decoder\\.seg_layers\\."])
'''

PROTO_PICKLE = re.compile(rb"\x80[\x02-\x05]")
GLOBAL_OPCODE = re.compile(rb"(?:^|[^\w])c[A-Za-z_][\w.]*\n[A-Za-z_][\w.]*\n")


def pickles_in(blob: bytes) -> list[int]:
    """Offsets at which a pickle (protocol 2-5 header parsing to STOP, or a protocol 0/1 GLOBAL) starts."""
    found = []
    for m in PROTO_PICKLE.finditer(blob):
        try:
            ops = list(pickletools.genops(blob[m.start():]))
        except Exception:
            continue
        if ops and ops[-1][0].name == "STOP":
            found.append(m.start())
    found += [m.start() for m in GLOBAL_OPCODE.finditer(blob)]
    return found


def wire_objects(message):
    """What Flower transmits for a message: every nested object, deflated."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return list(get_all_nested_objects(message).values())


def check_wire(message, local_names):
    """No pickle anywhere; arrays are plain numeric .npy; no local parameter name anywhere."""
    from flwr.app import Array
    from flwr.app.message.arraychunk import ArrayChunk

    for obj in wire_objects(message):
        blob = obj.deflate()
        for name in local_names:
            assert name.encode() not in blob, f"local parameter {name} in a {type(obj).__name__}"
        if isinstance(obj, Array):
            assert obj.stype == "numpy.ndarray"
            arr = np.load(io.BytesIO(obj.data), allow_pickle=False)  # refuses object arrays (pickled content)
            assert arr.dtype.kind in "biuf" and arr.dtype.name == obj.dtype
        elif isinstance(obj, ArrayChunk):
            continue  # pieces of an Array's .npy bytes (checked whole above)
        else:
            assert not pickles_in(blob), f"pickle in a {type(obj).__name__}: {blob[:200]!r}"


def test_superlink_busy_timeout_replaces_flowers_own():
    """The SuperLink's SQLite pragmas are Flower's own with only the busy timeout raised; a Flower that no longer
    sets a busy timeout there is refused rather than run with an unknown one."""
    from flwr.supercore import sql_mixin

    from nnunet_fed.deployment.superlink import BUSY_TIMEOUT_MS, patched_pragmas

    ours, flowers = dict(patched_pragmas(sql_mixin.SQLITE_PRAGMAS)), dict(sql_mixin.SQLITE_PRAGMAS)
    assert int(flowers["busy_timeout"]) < BUSY_TIMEOUT_MS == int(ours["busy_timeout"])
    assert {k: v for k, v in ours.items() if k != "busy_timeout"} == \
        {k: v for k, v in flowers.items() if k != "busy_timeout"}
    with pytest.raises(RuntimeError, match="pragmas changed"):
        patched_pragmas([p for p in sql_mixin.SQLITE_PRAGMAS if p[0] != "busy_timeout"])


def test_stopping_runtime_processes_does_not_wait_on_an_ended_one(tmp_path):
    """A SuperLink's runtime process (here a stand-in named flwr-serverapp, with the SuperLink's address in its
    command line) is a child of the SuperLink, not of whoever stops it: once it has ended on SIGTERM it stays a
    zombie until the SuperLink reaps it. ``stop_runtime_processes`` returns as soon as it has ended instead of
    waiting out its grace period, twice (SIGTERM, then SIGKILL), on a process that no signal can end; and an
    ended, unreaped server in a federation's process record does not stop the next server from starting."""
    import sys

    from nnunet_fed.deployment.launch import (process_stat, runtime_processes, stop_leftovers, stop_runtime_processes,
                                              write_process_record)

    port = _free_port()
    fake = tmp_path / "flwr-serverapp"
    fake.write_text("import time\ntime.sleep(120)\n")
    # the parent starts the stand-in and never reaps it, as the SuperLink does not while it serves
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, {str(fake)!r}, '--runtime-api-address', '127.0.0.1:{port}'])\n"
        "time.sleep(120)\n")], start_new_session=True)
    try:
        deadline = time.time() + 30
        while not runtime_processes(port) and time.time() < deadline:
            time.sleep(0.1)
        (child,) = runtime_processes(port)
        record = str(tmp_path / "processes.json")  # as if it were a killed server's, recorded while it ran
        write_process_record(record, port, server=child)
        start = time.time()
        assert stop_runtime_processes(port, grace=30.0) == [child]
        assert time.time() - start < 10  # a zombie is ended: not 2 x 30 s of waiting
        assert process_stat(child)[0] == "Z"  # still unreaped
        assert not runtime_processes(port)  # and no longer counted as a process that could finish a run
        assert stop_leftovers(record) == []  # an ended server does not block the next start
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(30)


def test_pickle_detector_finds_pickles():
    import pickle

    from flwr.app import ConfigRecord, Message, RecordDict

    for proto in (0, 2, 4, 5):
        payload = pickle.dumps({"w": np.zeros(3)}, protocol=proto)
        assert pickles_in(b"header" + payload + b"tail"), proto
    assert not pickles_in(np.zeros(100, np.float32).tobytes() + b"plain text\n")
    _set_task_identity()
    msg = Message(RecordDict({"c": ConfigRecord({"blob": pickle.dumps(np.ones(2))})}), dst_node_id=1,
                  message_type="train")
    with pytest.raises(AssertionError, match="pickle"):
        check_wire(msg, [])


def _set_task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1


WIRE_TRAINERS = [
    ("nnUNetTrainerFedLocalHead", {}),  # a test trainer: FedAvg with the segmentation heads local
    # FedOAP trained with ADP-FL: DCA query branch, adapters and heads local; DP fine-tuning in the finish message
    ("nnUNetTrainerFedOAP_ADP", {"target_epsilon": "8", "expected_batch_size": "3", "finetune_steps": "2",
                                 "public_plans": "true"}),
]


def released_fields(reply) -> set:
    """The name of everything a site's reply carries: record entries, the keys of the dataset description in
    them, "arrays" (the plans are one released item)."""
    from flwr.app import ArrayRecord

    names = set()
    for key, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            names.add("arrays")
            continue
        for name, value in record.items():
            names.add(name)
            if name == "dataset_json":
                names.update(json.loads(value))
    return names


@pytest.mark.parametrize("trainer,options", WIRE_TRAINERS, ids=[t for t, _ in WIRE_TRAINERS])
def test_site_messages_are_arrays_only_without_local_parameters(site_env, tmp_path, monkeypatch, trainer, options):
    """Every reply of a site (setup, a training round, finish) through the real ClientApp, in-process."""
    folder = tmp_path / "extra_trainers"
    folder.mkdir()
    (folder / "nnUNetTrainerFedLocalHead.py").write_text(LOCAL_TRAINER)
    monkeypatch.setenv("nnUNet_extTrainer", str(folder))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    from flwr.app import Context, Message, RecordDict

    from nnunet_fed.deployment import messages as msgs
    from nnunet_fed.deployment.client_app import app
    from nnunet_fed.deployment.runconfig import RunSettings
    from nnunet_fed.deployment.server_app import FederationServer
    from nnunet_fed.federation.aggregation import check_update
    from nnunet_fed.federation.update import tensor_aliases

    _set_task_identity()
    run = RunSettings(trainer=trainer, rounds=1, local_steps=1, val_steps=1, trainer_options=options,
                      federation_name="DatasetFed_wire", final_validation=False)
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=run.to_run_config(),
                      node_config={"dataset": site_env["ids"][0], "configuration": "2d",
                                   "trainer": trainer, "device": "cpu"})

    def send(content, message_type):
        reply = app(Message(content, dst_node_id=7, message_type=message_type), context)
        assert not reply.has_error(), reply.error.reason
        return reply

    replies = [send(msgs.global_content(None, {"round": -1}), msgs.SETUP)]
    cfg = replies[0].content[msgs.CONFIG]
    server = FederationServer(None, run)  # the server's view: the global model built from the site's plans
    template = server.build_template(json.loads(cfg["plans"]), json.loads(cfg["dataset_json"]))
    local = template.local_parameter_names()
    assert local, "the test trainer must keep parameters local"
    local_all_names = sorted({alias for n, names in tensor_aliases(template.plain_network).items() if n in local
                              for alias in names})
    global_arrays = template.get_shared_arrays()
    replies.append(send(msgs.global_content(global_arrays, {"round": 0, "num-rounds": 1}), msgs.TRAIN))
    dp = "target_epsilon" in options
    if dp:  # the server repeats round 0 (as when too few sites answered), from the same global model
        replies.append(send(msgs.global_content(global_arrays, {"round": 0, "num-rounds": 1}), msgs.TRAIN))
        first, again = msgs.update_from_message(replies[1]), msgs.update_from_message(replies[2])
        # the same update again: nothing new released, nothing spent
        assert again.metrics == first.metrics and again.num_examples == first.num_examples
        assert all(np.array_equal(again.arrays[k], first.arrays[k]) for k in first.arrays)
        # from another global model, a second training of round 0 would pass the target: refused (the SuperNode
        # turns the error into an error reply; called in-process, the ClientApp raises it)
        from nnunet_fed.privacy.accountant import BudgetError

        other = {k: v + 0.01 if v.dtype.kind == "f" else v for k, v in global_arrays.items()}
        with pytest.raises(BudgetError, match="above target_epsilon"):
            send(msgs.global_content(other, {"round": 0, "num-rounds": 1}), msgs.TRAIN)
    replies.append(send(msgs.global_content(global_arrays, {"round": 1, "final-validation": False}), msgs.FINISH))

    for reply in replies:
        check_wire(reply, local_all_names)
    update = msgs.update_from_message(replies[1])
    assert set(update.arrays) == set(global_arrays) and not set(update.arrays) & set(local_all_names)
    check_update(update, global_arrays)  # what the server's validation accepts
    assert update.site == site_env["names"][0] and update.num_examples > 0
    # the local parameters stayed at the site, trained, in its round state
    fold = _site_fold_of(site_env, trainer)
    state = torch.load(os.path.join(fold, "federated_rounds", "round_0000.pth"), map_location="cpu",
                       weights_only=False)
    assert all(k in state["network_weights"] for k in local)
    if dp:
        with open(os.path.join(fold, "privacy_report.json")) as f:
            rep = json.load(f)
        # round 0 once (its repeat re-sent the same update) and the fine-tuning after the rounds
        assert rep["steps"] == 1 + int(options["finetune_steps"])
        assert sum(n for _, _, n in rep["history"]) == rep["steps"]
        assert 0.9 * 8.0 <= rep["epsilon"] <= 8.0
        assert rep["epsilon"] == pytest.approx(dp_accounting_epsilon(rep), rel=0.01)
        # everything the site sent is in its privacy ledger, with a mechanism or declared public
        from nnunet_fed.privacy.ledger import PrivacyLedger

        ledger = PrivacyLedger.load(os.path.join(fold, "privacy_ledger.json"))
        listed = ledger.released_names()
        for reply in replies:
            missing = released_fields(reply) - listed
            assert not missing, f"sent but not in the privacy ledger: {sorted(missing)}"
        assert ledger.epsilon() == pytest.approx(rep["epsilon"])


def _site_fold_of(site_env, trainer):
    return os.path.join(site_env["results"], site_env["names"][0], f"{trainer}__nnUNetPlans__2d", "fold_0")

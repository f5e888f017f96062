"""Starting Flower's processes: the SuperLink and the run (server side), a SuperNode (site side).

Each Flower process runs in its own session with its log in a file; ``FlowerProcess.stop()`` ends its whole
process group. The run is submitted with Flower's own CLI (``flwr run``) against a SuperLink connection
written to a private Flower home (``FLWR_HOME``), so the user's ``~/.flwr/config.toml`` is left alone.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

APP_DIR = str(Path(__file__).resolve().parent / "app")
CONNECTION = "nnunet_fed"


class LaunchError(RuntimeError):
    """A Flower process could not be started or ended with an error."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc: "FlowerProcess | None" = None) -> None:
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LaunchError(f"{proc.name} exited with code {proc.poll()} before listening on {host}:{port}; "
                              f"see {proc.log_path}:\n{proc.tail()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise LaunchError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


@dataclass
class TLS:
    """TLS for the Flower connections: ``insecure`` (plain HTTP, loopback tests only) or certificate files."""
    insecure: bool = False
    certfile: str | None = None  # SuperLink: its certificate
    keyfile: str | None = None  # SuperLink: its private key
    ca_certfile: str | None = None  # CA that signed the SuperLink's certificate (sites and flwr run verify with it)

    def __post_init__(self):
        for n in ("certfile", "keyfile", "ca_certfile"):
            if getattr(self, n):
                setattr(self, n, os.path.abspath(getattr(self, n)))

    def check(self, side: str) -> None:
        if self.insecure:
            return
        needed = {"server": ("certfile", "keyfile", "ca_certfile"), "site": ("ca_certfile",)}[side]
        missing = [n for n in needed if not getattr(self, n)]
        if missing:
            flags = ", ".join("--ssl-" + n.replace("_", "-") if n != "ca_certfile" else
                              ("--ssl-ca-certfile" if side == "server" else "--root-certificates") for n in missing)
            raise LaunchError(f"TLS needs {flags} (see README: TLS and node authentication), or --insecure for a "
                              f"test on one machine")
        for n in needed:
            if not os.path.isfile(getattr(self, n)):
                raise LaunchError(f"TLS file {getattr(self, n)} does not exist")


class FlowerProcess:
    """A Flower command in its own session, logging to a file."""

    def __init__(self, name: str, command: list[str], log_path: str | None, env: dict | None = None,
                 new_session: bool = True):
        """``log_path`` None: the output goes to this process's terminal. ``new_session`` False keeps the process
        in the caller's process group (a signal to the group, e.g. Ctrl-C, reaches it)."""
        self.name, self.command, self.log_path = name, command, log_path
        self._log = None
        if log_path:
            os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
            self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
                                     env=env, start_new_session=new_session)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self):
        return self.proc.poll()

    def tail(self, n: int = 3000) -> str:
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """End the process (and, in its own session, everything it started there): SIGTERM, then SIGKILL."""
        own_group = os.getpgid(self.proc.pid) == self.proc.pid if self.proc.poll() is None else False
        kill = (lambda sig: os.killpg(self.proc.pid, sig)) if own_group else self.proc.send_signal
        if self.proc.poll() is None:
            with _ignore_missing():
                kill(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            with _ignore_missing():
                kill(signal.SIGKILL)
        with _ignore_missing():
            self.proc.wait(5)
        if self._log:
            self._log.close()


class _ignore_missing:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, (ProcessLookupError, PermissionError, subprocess.TimeoutExpired))


def flower_bin(name: str) -> str:
    """A Flower console script of this Python environment."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.isfile(candidate) else name


def superlink_command(host: str, port: int, tls: TLS, database: str | None = None,
                      supernode_auth: bool = False) -> list[str]:
    cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if tls.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-certfile", tls.certfile, "--ssl-keyfile", tls.keyfile, "--ssl-ca-certfile", tls.ca_certfile]
    if database:
        cmd += ["--database", database]
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def supernode_command(superlink: str, runtime_port: int, node_config: dict, tls: TLS,
                      auth_private_key: str | None = None) -> list[str]:
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink, "--port", str(runtime_port),
           "--node-config", " ".join(f"{k}={toml_value(v)}" for k, v in node_config.items())]
    if tls.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", tls.ca_certfile]
    if auth_private_key:
        cmd += ["--auth-supernode-private-key", auth_private_key]
    return cmd


def write_connection(flwr_home: str, address: str, tls: TLS) -> str:
    """A Flower config (``FLWR_HOME/config.toml``) whose default SuperLink connection is ``address``."""
    os.makedirs(flwr_home, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f"address = {toml_value(address)}"]
    lines.append("insecure = true" if tls.insecure else f"root-certificates = {toml_value(tls.ca_certfile)}")
    path = os.path.join(flwr_home, "config.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_run_config(path: str, run_config: dict) -> str:
    with open(path, "w") as f:
        for k, v in run_config.items():
            f.write(f"{k} = {toml_value(v)}\n")
    return path


def flwr(args: list[str], flwr_home: str, check: bool = True, capture: bool = True, timeout=None):
    env = {**os.environ, "FLWR_HOME": flwr_home}
    proc = subprocess.run([flower_bin("flwr"), *args], env=env, capture_output=capture, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise LaunchError(f"flwr {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def register_supernode_keys(flwr_home: str, public_keys: list[str]) -> None:
    for key in public_keys:
        flwr(["supernode", "register", key, CONNECTION], flwr_home)


def submit_run(flwr_home: str, run_config_file: str, app_dir: str = APP_DIR) -> int:
    proc = flwr(["run", app_dir, CONNECTION, "--run-config", run_config_file, "--format", "json"], flwr_home)
    try:
        payload = json.loads(proc.stdout[proc.stdout.index("{"):])
        return int(payload["run-id"])
    except (ValueError, KeyError, TypeError):
        raise LaunchError(f"flwr run did not report a run id:\n{proc.stdout}\n{proc.stderr}") from None


def run_status(flwr_home: str, run_id: int) -> str:
    proc = flwr(["list", CONNECTION, "--run-id", str(run_id), "--format", "json"], flwr_home, check=False)
    try:
        payload = json.loads(proc.stdout[proc.stdout.index("{"):])
        return str(payload["runs"][0]["status"])
    except (ValueError, KeyError, TypeError, IndexError):
        return "unknown"


def stream_logs(flwr_home: str, run_id: int) -> int:
    """Print the run's logs (ServerApp output) until the run ends."""
    return flwr(["log", str(run_id), CONNECTION, "--stream"], flwr_home, check=False, capture=False).returncode

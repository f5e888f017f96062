"""Starting Flower's processes: the SuperLink and the run (server side), a SuperNode (site side).

Each Flower process runs in its own session with its log in a file; ``FlowerProcess.stop()`` ends its whole
process group. The run is submitted with Flower's own CLI (``flwr run``) against a SuperLink connection
written to a private Flower home (``FLWR_HOME``), so the user's ``~/.flwr/config.toml`` is left alone.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
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
        needed = {"server": ("certfile", "keyfile"), "site": ("ca_certfile",)}[side]
        missing = [n for n in needed if not getattr(self, n)]
        if missing:
            flags = ", ".join("--ssl-" + n.replace("_", "-") if n != "ca_certfile" else
                              ("--ssl-ca-certfile" if side == "server" else "--root-certificates") for n in missing)
            raise LaunchError(f"TLS needs {flags} (see README: TLS and node authentication), or --insecure for a "
                              f"test on one machine")
        for n in needed + (("ca_certfile",) if side == "server" and self.ca_certfile else ()):
            if not os.path.isfile(getattr(self, n)):
                raise LaunchError(f"TLS file {getattr(self, n)} does not exist")


# ---------------------------------------------------------------------- certificates
def certificate_names(certfile: str) -> tuple[list[str], list[str]]:
    """The DNS names and IP addresses a PEM certificate is valid for (its subject alternative names, else its
    common name as a DNS name)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    with open(certfile, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    try:
        return _alt_names(cert)
    except x509.ExtensionNotFound:
        return [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)], []


def _alt_names(cert) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) of a certificate's subjectAltName; raises ExtensionNotFound without one."""
    from cryptography import x509

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.DNSName)), [str(a) for a in san.get_values_for_type(x509.IPAddress)]


def format_names(dns: list[str], ips: list[str]) -> str:
    """A certificate's names as openssl prints them: ``DNS:a, IP:b`` (``none`` without any)."""
    return ", ".join([f"DNS:{n}" for n in dns] + [f"IP:{i}" for i in ips]) or "none"


def certificate_covers(certfile: str, host: str) -> bool:
    """Whether TLS host-name verification of ``host`` (a name or an IP address) passes for ``certfile``
    (RFC 6125: an IP against the IP entries, a name against the DNS entries, ``*`` for one leftmost label)."""
    dns, ips = certificate_names(certfile)
    try:
        return ipaddress.ip_address(host) in {ipaddress.ip_address(i) for i in ips}
    except ValueError:
        pass
    host = host.lower().rstrip(".")
    for name in (n.lower().rstrip(".") for n in dns):
        if name == host or (name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]):
            return True
    return False


def require_certificate_covers(certfile: str, host: str, what: str) -> None:
    """Raise :class:`LaunchError` naming the certificate's names when they do not cover ``host``."""
    if not certificate_covers(certfile, host):
        names = format_names(*certificate_names(certfile))
        raise LaunchError(f"{what}: the certificate {certfile} is not valid for {host!r} (its names: {names}); "
                          f"make one whose subjectAltName contains {'IP' if _is_ip(host) else 'DNS'}:{host} "
                          f"(README: TLS and node authentication)")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def check_tls_endpoint(address: str, ca_certfile: str, timeout: float = 10.0) -> None:
    """A site's check before its SuperNode starts: the TLS handshake with ``address`` (HOST:PORT) verifies
    against ``ca_certfile`` and the certificate covers HOST. Raises :class:`LaunchError` naming the certificate's
    names or the verification error; an address that does not answer yet passes (the SuperNode keeps trying)."""
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=ca_certfile)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return
    except ssl.SSLCertVerificationError as e:
        detail = e.verify_message or str(e)
        peer = _peer_certificate(host, int(port), timeout)
        names = f" (the server's certificate names: {format_names(*peer)})" if peer is not None else ""
        raise LaunchError(f"TLS to {address} fails verification with {ca_certfile}: {detail}{names}") from None
    except (OSError, ssl.SSLError):
        return  # not up yet, or not reachable from here: the SuperNode retries and says so


def _peer_certificate(host: str, port: int, timeout: float):
    from cryptography import x509

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # only to read the names it presents
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        return _alt_names(cert)
    except Exception:  # noqa: BLE001 - only a hint in an error message
        return None


def write_loopback_tls(folder: str) -> TLS:
    """A fresh CA and certificate for 127.0.0.1 / localhost in ``folder``: the TLS of the SuperLink on loopback,
    which the gateway, ``flwr`` commands and the ServerApp use. Flower's node authentication needs a TLS
    SuperLink; this keeps the operator's certificate (made for the public name) off the loopback address."""
    return write_certificates(folder, ("localhost",), ("127.0.0.1",))


def write_certificates(folder: str, dns_names=("localhost",), ip_addresses=("127.0.0.1",), days: int = 30) -> TLS:
    """A fresh CA (``ca.crt``) and a certificate it signs (``superlink.pem``, key ``superlink.key``) valid for
    ``dns_names`` and ``ip_addresses`` (subjectAltName), ECDSA P-384, ``days`` long; private keys written 0600.
    ``cryptography`` (a Flower dependency) instead of the openssl CLI, which a site may not have."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    os.makedirs(folder, mode=0o700, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5),
                 not_valid_after=now + datetime.timedelta(days=days))

    def build(subject, issuer, public_key, signer, extensions):
        b = x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key) \
            .serial_number(x509.random_serial_number()).not_valid_before(valid["not_valid_before"]) \
            .not_valid_after(valid["not_valid_after"])
        for ext, critical in extensions:
            b = b.add_extension(ext, critical=critical)
        return b.sign(signer, hashes.SHA384())

    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nnunet_fed CA")])
    ca = build(ca_name, ca_name, ca_key.public_key(), ca_key, [(x509.BasicConstraints(ca=True, path_length=0), True)])
    san = x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names] +
                                      [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses])
    subject = (list(dns_names) + list(ip_addresses))[0]
    cert = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]), ca_name, key.public_key(), ca_key,
                 [(san, False), (x509.BasicConstraints(ca=False, path_length=None), True)])
    pem = serialization.Encoding.PEM
    paths = {n: os.path.join(folder, n) for n in ("ca.crt", "superlink.pem", "superlink.key")}
    blobs = {"ca.crt": ca.public_bytes(pem), "superlink.pem": cert.public_bytes(pem),
             "superlink.key": key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())}
    for name, blob in blobs.items():
        fd = os.open(paths[name] + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(paths[name] + ".tmp", paths[name])
    return TLS(certfile=paths["superlink.pem"], keyfile=paths["superlink.key"], ca_certfile=paths["ca.crt"])


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
                                     env=env, start_new_session=new_session, preexec_fn=_die_with_parent)

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


class SiteWorker:
    """``site join``'s site worker (:mod:`nnunet_fed.deployment.site_worker`) on ``socket_path``, restarted by
    :meth:`keep_alive` when it ends (the next round continues from the site's round state files)."""

    def __init__(self, site: str, socket_path: str, log_path: str | None):
        self.site, self.socket_path, self.log_path, self.proc = site, socket_path, log_path, None

    def start(self, wait: bool = True, timeout: float = 300.0) -> None:
        """Start the worker; with ``wait``, return once it accepts connections (it imports torch and nnU-Net
        first). Raises LaunchError naming the log if it ends before that."""
        self.proc = FlowerProcess(f"site worker {self.site}", [sys.executable, "-m", "nnunet_fed.deployment.site_worker",
                                                                "--socket", self.socket_path],
                                  self.log_path, new_session=False)
        deadline = time.time() + timeout
        while wait and not self.ready():
            if self.proc.poll() is not None:
                raise LaunchError(f"site {self.site}: the site worker ended at start (exit code "
                                  f"{self.proc.poll()}){'; see ' + self.log_path if self.log_path else ''}")
            if time.time() > deadline:
                raise LaunchError(f"site {self.site}: the site worker was not ready after {timeout:.0f} s")
            time.sleep(0.2)

    def ready(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(self.socket_path)
                return True
            except OSError:
                return False

    def keep_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            print(f"site {self.site}: the site worker ended (exit code {self.proc.poll()}); restarting it "
                  f"(rounds continue from the site's round state files)", file=sys.stderr, flush=True)
            self.proc.stop()
            self.start(wait=False)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def supernode_env() -> dict:
    """The SuperNode's environment: its SuperExec looks for new messages every 0.1 s instead of every 1 s."""
    return {**os.environ, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the process that started it dies, even by SIGKILL, so a
    killed ``nnunet_fed server`` does not leave its SuperLink serving. Elsewhere the process record
    (:func:`stop_leftovers`) ends it at the next start."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def process_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (Linux ``proc(5)``; index 0 is the state, 2 the
    process group, 19 the start time in clock ticks since boot), None if the process does not exist. The name is
    skipped up to its last ``)``, as it may hold spaces and parentheses."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def process_start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), None if it does not exist; with the
    pid it names one process, not a later one that reuses the number."""
    fields = process_stat(pid)
    return fields[19] if fields else None


def process_running(pid: int, start: str | None = None) -> bool:
    """Whether ``pid`` is a process that has not ended (Linux ``/proc``), and, with ``start``, the one that started
    at those clock ticks (:func:`process_start_ticks`), not a later one with its number. An ended child that its
    parent has not reaped yet (a zombie, state ``Z``) has ended: no signal reaches it, and it holds nothing but its
    pid."""
    fields = process_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X") and (start is None or fields[19] == start)


def runtime_processes(superlink_port: int) -> list[int]:
    """The processes the SuperLink on ``127.0.0.1:superlink_port`` started for its runs (``flwr-serverapp``,
    ``flower-superexec``: they name that address in their command line). They run in sessions of their own,
    ignore SIGTERM, and outlive a SuperLink that dies (Linux ``/proc``; elsewhere none are found)."""
    address = f"127.0.0.1:{superlink_port}".encode()
    found = []
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if address in args and any(b"flwr" in a or b"flower" in a for a in args[:2]):
            found.append(int(d))
    return found


def stop_runtime_processes(superlink_port: int, grace: float = 5.0) -> list[int]:
    """End :func:`runtime_processes` of that SuperLink: SIGTERM, then SIGKILL to those still running after
    ``grace`` seconds. They are the SuperLink's children, so one that has ended stays a zombie until the SuperLink
    reaps it: it counts as ended (:func:`process_running`)."""
    pids = runtime_processes(superlink_port)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [p for p in pids if process_running(p)]
        for pid in left:
            with _ignore_missing():
                os.kill(pid, sig)
        deadline = time.time() + grace
        while left and time.time() < deadline and any(process_running(p) for p in left):
            time.sleep(0.2)
    return pids


def write_process_record(record: str, superlink_port: int | None = None, **pids: int) -> None:
    """Remember which processes serve this federation (name -> pid, with their start times) and the SuperLink's
    loopback port (its runtime processes are found by it)."""
    entries = {name: {"pid": pid, "start": process_start_ticks(pid)} for name, pid in pids.items()}
    if superlink_port is not None:
        entries["superlink_port"] = {"port": int(superlink_port)}
    with open(record + ".tmp", "w") as f:
        json.dump(entries, f)
    os.replace(record + ".tmp", record)


def stop_leftovers(record: str) -> list[str]:
    """Before a start: end what an earlier ``nnunet_fed server`` of this folder left running (it was killed), each
    with its process group (a SuperLink's ServerApp is in its group). Raises :class:`LaunchError` if that server
    itself still runs. Returns what was stopped. Without ``/proc`` (not Linux) nothing can be checked."""
    if not os.path.isfile(record) or not os.path.isdir("/proc"):
        return []
    with open(record) as f:
        entries = json.load(f)
    port = entries.pop("superlink_port", {}).get("port")
    # the recorded process, not a later one with its pid; an ended but unreaped one (a zombie) still leads its
    # process group, whose other members are stopped with it
    alive = {n: e["pid"] for n, e in entries.items()
             if e.get("start") is not None and process_start_ticks(e["pid"]) == e["start"]}
    if "server" in alive and alive["server"] != os.getpid() and process_running(alive["server"]):
        raise LaunchError(f"another nnunet_fed server (pid {alive['server']}) runs this federation from "
                          f"{os.path.dirname(record)}; stop it first")
    stopped = []
    for name, pid in alive.items():
        if name == "server":
            continue
        with _ignore_missing():
            os.killpg(pid, signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline and process_running(pid, entries[name]["start"]):
            time.sleep(0.2)
        with _ignore_missing():
            os.killpg(pid, signal.SIGKILL)
        stopped.append(f"{name} (pid {pid})")
    if port is not None:
        stopped += [f"a Flower runtime process (pid {pid})" for pid in stop_runtime_processes(port)]
    os.remove(record)
    return stopped


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
    """``flower-superlink`` with its state in ``database`` (None: in memory), run through
    :mod:`nnunet_fed.deployment.superlink` (a longer SQLite busy timeout than Flower's)."""
    cmd = [sys.executable, "-m", "nnunet_fed.deployment.superlink", "--host", host, "--port", str(port),
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


def gateway_command(host: str, port: int, superlink_port: int, tls: TLS, loopback: TLS) -> list[str]:
    """The Fleet-API-only gateway on ``host:port`` (the operator's ``tls``) in front of the SuperLink on
    ``127.0.0.1:superlink_port`` (``loopback`` TLS)."""
    cmd = [sys.executable, "-m", "nnunet_fed.deployment.gateway", "--listen", f"{host}:{port}",
           "--target", f"127.0.0.1:{superlink_port}"]
    if not tls.insecure:
        cmd += ["--ssl-certfile", tls.certfile, "--ssl-keyfile", tls.keyfile]
    if not loopback.insecure:
        cmd += ["--target-ca-certfile", loopback.ca_certfile]
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
                          timeout=timeout, preexec_fn=_die_with_parent)
    if check and proc.returncode != 0:
        raise LaunchError(f"flwr {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _flwr_json(args: list[str], flwr_home: str) -> dict:
    proc = flwr([*args, CONNECTION, "--format", "json"], flwr_home, check=False)
    try:
        return json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        raise LaunchError(f"flwr {' '.join(args)}: no answer in JSON:\n{proc.stdout}\n{proc.stderr}") from None


def sync_supernode_keys(flwr_home: str, public_keys: list[str], record: str) -> dict[str, str]:
    """Make the SuperLink admit exactly the nodes holding ``public_keys`` (OpenSSH public key files).

    Flower keeps registered keys in the SuperLink's database across restarts, refuses to register a key twice
    ("Public key already in use") and lists nodes without their keys; so ``record`` (JSON, node id -> key) keeps
    which node each key became. Nodes not registered through the current list (a key dropped from it, or any
    node the record does not know) are unregistered; keys without a live node are registered. Returns the
    record. Raises :class:`LaunchError` for a key Flower refuses (e.g. one unregistered earlier in this database:
    Flower does not take a public key twice)."""
    wanted = {}
    for path in public_keys:
        with open(path) as f:
            wanted[" ".join(f.read().split()[:2])] = path  # type and key; the comment is not part of the key
    known = {}
    if os.path.isfile(record):
        with open(record) as f:
            known = json.load(f)
    listed = _flwr_json(["supernode", "list"], flwr_home)
    if not listed.get("success"):
        raise LaunchError(f"flwr supernode list failed: {listed.get('error-message')}")
    live = {str(n["node-id"]) for n in listed.get("nodes", []) if n.get("status") != "unregistered"}
    kept = {}
    for node in sorted(live):
        if known.get(node) in wanted:
            kept[node] = known[node]
            continue
        out = _flwr_json(["supernode", "unregister", node], flwr_home)
        if not out.get("success"):
            raise LaunchError(f"flwr supernode unregister {node} failed: {out.get('error-message')}")
    for key, path in wanted.items():
        if key in kept.values():
            continue
        out = _flwr_json(["supernode", "register", path], flwr_home)
        if not out.get("success"):
            raise LaunchError(f"registering {path} with the SuperLink failed: {out.get('error-message')}"
                              + (" (this database had the key and it was removed since; Flower does not take a key"
                                 " twice: give that site a new key pair, or start over with --fresh)"
                                 if "already in use" in str(out.get("error-message")) else ""))
        kept[str(out["node-id"])] = key
    with open(record + ".tmp", "w") as f:
        json.dump(kept, f, indent=1)
    os.replace(record + ".tmp", record)
    return kept


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


class ErrorRelay:
    """Copies the error lines a Flower process writes to its log (``ERROR``/``CRITICAL`` records, tracebacks)
    into the federation's own log, so ``federation_server.log`` says why a run failed or stalled (SQLite locks, TLS
    handshakes, tokens) without reading ``superlink.log``."""

    PATTERN = re.compile(r"\bERROR\b|\bCRITICAL\b|Traceback|Exit Code|Error:")

    def __init__(self, source: str, target: str, prefix: str):
        self.source, self.target, self.prefix = source, target, prefix
        self.offset = os.path.getsize(source) if os.path.isfile(source) else 0  # only what this start writes

    def copy_new(self) -> list[str]:
        if not os.path.isfile(self.source):
            return []
        with open(self.source, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        cut = data.rfind(b"\n") + 1  # whole lines only
        self.offset += cut
        lines = [ANSI.sub("", x).rstrip() for x in data[:cut].decode(errors="replace").splitlines()]
        found = [x for x in lines if self.PATTERN.search(x)]
        if found:
            append_log(self.target, self.prefix, found)
        return found


ANSI = re.compile(r"\x1b\[[0-9;]*m")
SERVER_LOG = "federation_server.log"  # the federation's own log, in the global model's fold folder


def append_log(path: str, source: str, lines: list[str]) -> None:
    """Append ``lines`` to a federation log, each as ``<date> <time> [source] line``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S ")
    with open(path, "a") as f:
        f.writelines(f"{stamp}[{source}] {x}\n" for x in lines)


def follow_run(flwr_home: str, run_id: int, watched: list["FlowerProcess"], relays: list[ErrorRelay],
               superlink_port: int, poll: float = 1.0) -> str:
    """Print the run's logs (ServerApp output) until the run is finished, copying the watched processes' error
    lines into the federation's log as they appear. Returns the run's final status (``finished:completed``, ...).

    ``flwr log --stream`` can end before the run does (it exits on an error of the Control API); it is then
    started again, and the lines it prints again from the run's start are skipped. Raises :class:`LaunchError`
    when a watched process (SuperLink, gateway) exits first, or when the run is unfinished and none of the
    processes of the SuperLink on ``127.0.0.1:superlink_port`` is left to finish it (:func:`runtime_processes`),
    instead of waiting on a run that can no longer finish."""
    import threading

    printed = 0

    def relay() -> None:
        for r in relays:
            r.copy_new()

    def pump(stream) -> None:
        nonlocal printed
        seen = 0
        for line in stream:
            seen += 1
            if seen > printed:
                sys.stdout.write(line)
                sys.stdout.flush()
                printed = seen

    while True:
        proc = subprocess.Popen([flower_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"],
                                env={**os.environ, "FLWR_HOME": flwr_home}, stdout=subprocess.PIPE, text=True,
                                errors="replace", preexec_fn=_die_with_parent)
        reader = threading.Thread(target=pump, args=(proc.stdout,), daemon=True)
        reader.start()
        try:
            while proc.poll() is None:
                relay()
                for p in watched:
                    if p.poll() is not None:
                        relay()
                        raise LaunchError(f"{p.name} exited with code {p.poll()} during the run; see "
                                          f"{p.log_path}:\n{p.tail(1500)}")
                time.sleep(poll)
            reader.join(10)
            relay()
        finally:
            if proc.poll() is None:
                proc.terminate()
                with _ignore_missing():
                    proc.wait(10)
        status = run_status(flwr_home, run_id)
        if status.startswith("finished"):
            return status
        if status == "running" and not runtime_processes(superlink_port):
            logs = ", ".join(p.log_path for p in watched if p.log_path)
            raise LaunchError(f"the run is {status!r} but no process of the SuperLink on 127.0.0.1:{superlink_port} "
                              f"is left to finish it; see {logs}")
        time.sleep(max(poll, 2.0))  # the stream ended first: follow the run again

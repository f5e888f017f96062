"""TLS set-up checks of the Flower deployment, made before any Flower process starts: a certificate whose names do
not cover the address is named at the server and at the site (instead of Flower's "Connection to the SuperLink
is unavailable"); the Fleet gateway passes SuperNode calls only."""
import os
import socket
import ssl
import threading

import pytest

from conftest import cli, nnunet_fed_cmd, run_cli


@pytest.fixture
def example_org_tls(tmp_path):
    """A CA and a certificate made, as in the README, for server.example.org and 10.0.0.5 only."""
    from nnunet_fed.deployment.launch import write_certificates

    return write_certificates(str(tmp_path / "tls"), ("server.example.org",), ("10.0.0.5",))


def test_server_names_a_certificate_that_does_not_cover_its_address(site_env, example_org_tls, tmp_path, capsys):
    tls = example_org_tls
    # (--wait-for-sites: were a check missed, the server would give up waiting instead of hanging the test)
    code, _, err = cli(capsys, "server", "--min-sites", "1", "-c", "2d", "--host", "127.0.0.1",
                       "--wait-for-sites", "30", "--ssl-certfile", tls.certfile, "--ssl-keyfile", tls.keyfile,
                       "--flower-dir", tmp_path / "flower")
    assert code == 2
    assert "not valid for '127.0.0.1'" in err and "DNS:server.example.org, IP:10.0.0.5" in err
    assert not os.path.exists(tmp_path / "flower")  # nothing started, nothing written
    # node authentication over plain HTTP would send the nodes' signed headers in the clear
    code, _, err = cli(capsys, "server", "--min-sites", "1", "-c", "2d", "--insecure", "--wait-for-sites", "30",
                       "--auth-supernode-keys", tls.certfile)
    assert code == 2 and "needs TLS" in err


def test_site_names_a_certificate_that_does_not_cover_the_address(site_env, example_org_tls):
    """The site joins 127.0.0.1 while the server presents the example.org certificate: the join stops before
    its SuperNode starts, naming the mismatch and the certificate's names."""
    tls = example_org_tls
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.certfile, tls.keyfile)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        for _ in range(2):  # the verification, then the read of the names
            conn, _ = listener.accept()
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        proc = run_cli(nnunet_fed_cmd() + ["site", "join", "--superlink", f"127.0.0.1:{port}", "-d",
                                           site_env["ids"][0], "-c", "2d", "--root-certificates", tls.ca_certfile],
                       site_env["env"], check=False, timeout=120)
    finally:
        listener.close()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert site_env["names"][0] in err and "127.0.0.1" in err and "mismatch" in err, err
    assert "DNS:server.example.org, IP:10.0.0.5" in err, err


@pytest.mark.parametrize("method,path,passes", [
    ("POST", "/v1/fleet/register-node", True),
    ("POST", "/v1/fleet/pull-messages", True),
    ("POST", "/v1/control/start-run", False),
    ("POST", "/v1/control/register-supernode", False),
    ("POST", "/v1/runtime/pull-messages", False),
    ("GET", "/v1/fleet/get-run", False),
    ("POST", "/v1/fleet/../control/list-runs", False),
    ("POST", "/v1/fleet//../control/x", False),
    ("GET", "/docs", False),
])
def test_gateway_passes_fleet_calls_only(method, path, passes):
    from nnunet_fed.deployment.gateway import allowed

    assert allowed(method, path) == passes


def test_gateway_refuses_control_api_before_flower(tmp_path):
    """The gateway in front of a port where nothing listens: a Control API call is refused (403) by the gateway;
    a Fleet call is forwarded (and fails upstream: 502)."""
    from starlette.testclient import TestClient

    from nnunet_fed.deployment.gateway import make_app
    from nnunet_fed.deployment.launch import free_port

    with TestClient(make_app(f"127.0.0.1:{free_port()}", None)) as client:
        assert client.post("/v1/control/list-runs", content=b"").status_code == 403
        assert client.get("/v1/fleet/get-run").status_code == 403
        assert client.post("/v1/fleet/get-run", content=b"").status_code == 502

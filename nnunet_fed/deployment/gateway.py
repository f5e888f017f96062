"""The sites' only door into the SuperLink: a gateway that serves Flower's Fleet API and nothing else.

flwr 1.41's SuperLink serves its Fleet API (what SuperNodes use), its Control API (``flwr run``, ``flwr supernode
register``, ``flwr log``, ...) and its runtime API on one HTTP port, and the open-source Control API has no login.
Whoever reaches that port with the CA certificate every site holds could register their own node key and join as
a site. Flower has no option to serve the Control API elsewhere (``--control-api-address`` is deprecated and
ignored), so ``nnunet_fed server`` binds the SuperLink to loopback and puts this gateway on the public address:
it terminates TLS with the operator's certificate and forwards ``POST /v1/fleet/*`` (every call a SuperNode makes,
``flwr.supernode.fleet_http_client``) to the SuperLink; any other method or path is refused with 403 before it
reaches Flower. Node authentication is unchanged: the signed headers are forwarded and checked by the SuperLink.

The SuperLink on loopback has its own TLS (``launch.write_loopback_tls``), which the gateway verifies.
Run as ``python -m nnunet_fed.deployment.gateway --listen HOST:PORT --target 127.0.0.1:PORT [TLS files]``.
"""
from __future__ import annotations

import argparse
import contextlib
import ssl
import sys

FLEET_PREFIX = "/v1/fleet/"
#: headers that belong to one HTTP hop, not to the request or response forwarded
HOP_HEADERS = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                         "proxy-authorization", "proxy-authenticate", "content-length", "content-encoding"})


def allowed(method: str, path: str) -> bool:
    """Whether a request may pass: Fleet API calls only (SuperNodes POST every call)."""
    return method == "POST" and path.startswith(FLEET_PREFIX) and ".." not in path and "//" not in path


def make_app(target: str, ca_certfile: str | None, stop_runtime_on_exit: bool = False):
    """An ASGI app forwarding allowed requests to ``target`` (``host:port`` of the SuperLink on loopback; its TLS
    verified against ``ca_certfile`` when given, plain HTTP otherwise). ``stop_runtime_on_exit``: when the gateway
    ends, also end the SuperLink's runtime processes (``launch.stop_runtime_processes``): the gateway is started
    with ``nnunet_fed server`` and ends with it, even when the server is killed, while Flower's ServerApp does not
    end with its SuperLink."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    if ca_certfile:
        base, verify = f"https://{target}", ssl.create_default_context(cafile=ca_certfile)
    else:
        base, verify = f"http://{target}", False
    client = httpx.AsyncClient(base_url=base, verify=verify, timeout=httpx.Timeout(600.0))

    async def forward(request: Request) -> Response:
        if not allowed(request.method, request.url.path):
            return PlainTextResponse("this address serves Flower's Fleet API only\n", status_code=403)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        try:
            reply = await client.request(request.method, request.url.path, params=request.query_params,
                                         headers=headers, content=await request.body())
        except httpx.HTTPError as e:
            return PlainTextResponse(f"SuperLink unreachable: {type(e).__name__}\n", status_code=502)
        out = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_HEADERS}
        return Response(reply.content, status_code=reply.status_code, headers=out)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()
        if stop_runtime_on_exit:  # the server died (this gateway ends with it): so must the run's ServerApp
            from nnunet_fed.deployment.launch import stop_runtime_processes

            stop_runtime_processes(int(target.rsplit(":", 1)[1]))

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Fleet-API-only gateway in front of a loopback SuperLink")
    p.add_argument("--listen", required=True, help="HOST:PORT the sites connect to")
    p.add_argument("--target", required=True, help="HOST:PORT of the SuperLink (loopback)")
    p.add_argument("--ssl-certfile", help="the certificate the sites verify (PEM)")
    p.add_argument("--ssl-keyfile", help="its private key (PEM)")
    p.add_argument("--target-ca-certfile", help="CA of the SuperLink's loopback certificate (its TLS is verified)")
    args = p.parse_args(argv)
    import uvicorn

    host, port = args.listen.rsplit(":", 1)
    tls = dict(ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile) if args.ssl_certfile else {}
    uvicorn.run(make_app(args.target, args.target_ca_certfile, stop_runtime_on_exit=True), host=host,
                port=int(port), log_level="warning", access_log=False, **tls)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``nnunet_fed server`` and ``nnunet_fed site join``: a federation on Flower across machines.

The main command (``nnunet_fed/cli.py``) calls :func:`add_deployment_commands` on its sub-parsers, after the
planning commands (``site join`` joins their ``site`` command).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time

from nnunet_fed import sites as site_checks


def _tls_args(p: argparse.ArgumentParser, side: str) -> None:
    p.add_argument("--insecure", action="store_true",
                   help="no TLS: traffic is not encrypted; only for a test on one machine")
    if side == "server":
        p.add_argument("--ssl-certfile", help="TLS certificate the sites verify (PEM); its names must cover the "
                                              "address the sites connect to")
        p.add_argument("--ssl-keyfile", help="its private key (PEM)")
        p.add_argument("--ssl-ca-certfile", help="CA certificate that signed it (PEM; optional, the sites need it)")
        p.add_argument("--auth-supernode-keys", nargs="+", default=None, metavar="PUBLIC_KEY",
                       help="node authentication: only SuperNodes holding the private key of one of these public "
                            "keys (OpenSSH format) may connect")
    else:
        p.add_argument("--root-certificates", help="CA certificate that signed the SuperLink certificate (PEM)")
        p.add_argument("--auth-supernode-private-key", help="node authentication: this site's private key")


def _on_signal_exit():
    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _option_dict(items) -> dict:
    from nnunet_fed.cli import parse_options

    return parse_options(items)


def cmd_server(args) -> int:
    from nnunet_fed.deployment import launch
    from nnunet_fed.deployment.runconfig import RunSettings
    from nnunet_fed.federation.simulation import SimulationConfig, global_model_folder

    site_checks.require_nnunet_paths(("nnUNet_results",))
    trainer_cls = site_checks.find_trainer(args.trainer)
    options = _option_dict(args.option)
    trainer_cls.resolve_options(options)
    from nnunet_fed.cli import parse_fold

    run = RunSettings(trainer=args.trainer, configuration=args.configuration, plans=args.plans,
                      fold=str(parse_fold(args.fold)),
                      rounds=args.rounds, local_steps=args.local_steps, val_steps=args.val_steps,
                      fedprox_mu=args.fedprox_mu, trainer_options=options, seed=args.seed,
                      federation_name=args.federation_name, min_sites=args.min_sites,
                      round_timeout=args.round_timeout, wait_for_sites=args.wait_for_sites,
                      round_retries=args.round_retries, final_validation=not args.no_val, fresh=args.fresh,
                      strategy=args.strategy or "fedavg", strategy_options=_option_dict(args.strategy_option),
                      secure_aggregation=args.secure_aggregation, secagg_clip_range=args.secagg_clip_range,
                      secagg_max_weight=args.secagg_max_weight)
    run = RunSettings.from_run_config(run.to_run_config())  # the same checks the ServerApp makes
    strategy = trainer_cls.make_server_strategy(options, run.strategy, run.strategy_options)  # unknown rule/option
    if run.secure_aggregation:
        from nnunet_fed.deployment.secure_aggregation import check_strategy

        check_strategy(strategy)
    tls = launch.TLS(insecure=args.insecure, certfile=args.ssl_certfile, keyfile=args.ssl_keyfile,
                     ca_certfile=args.ssl_ca_certfile)
    try:
        tls.check("server")
    except launch.LaunchError as e:
        raise site_checks.FederationSetupError(str(e)) from None
    for key in args.auth_supernode_keys or []:
        if not os.path.isfile(key):
            raise site_checks.FederationSetupError(f"public key {key} does not exist")
    if args.auth_supernode_keys and tls.insecure:
        raise site_checks.FederationSetupError("--auth-supernode-keys needs TLS (a node's signed headers would "
                                               "travel in the clear); drop --insecure")
    if not tls.insecure and args.host not in ("0.0.0.0", "", "::"):
        try:  # the sites verify the certificate against the address they connect to
            launch.require_certificate_covers(tls.certfile, args.host, "nnunet_fed server --host")
        except launch.LaunchError as e:
            raise site_checks.FederationSetupError(str(e)) from None

    cfg = SimulationConfig(dataset_ids=[], configuration=run.configuration, trainer=run.trainer,
                           plans_identifier=run.plans, federation_name=run.federation_name)
    fold_dir = os.path.join(global_model_folder(cfg), f"fold_{run.fold}")
    work = os.path.abspath(args.flower_dir or os.path.join(fold_dir, "flower"))
    if args.fresh:
        for folder in (work, fold_dir):
            if os.path.isdir(folder):
                shutil.rmtree(folder)
    else:
        from nnunet_fed.federation.records import load_server_state

        state = load_server_state(fold_dir) if os.path.isdir(fold_dir) else None
        if state is not None and state["run_config"] != run.resume_key():
            raise site_checks.FederationSetupError(
                f"{fold_dir} holds a run with other settings ({state['run_config']}); use --fresh to start over "
                f"or --federation-name to write elsewhere")
        if state is not None:
            print(f"resuming {run.federation_name} after round {state['completed_rounds']}/{run.rounds}")
    flwr_home = os.path.join(work, "home")
    os.makedirs(work, exist_ok=True)
    processes = os.path.join(work, "processes.json")
    try:
        for what in launch.stop_leftovers(processes):
            print(f"stopped {what} left running by an earlier nnunet_fed server of this federation", flush=True)
    except launch.LaunchError as e:
        raise site_checks.FederationSetupError(str(e)) from None
    port = args.port or launch.free_port(args.host if args.host not in ("0.0.0.0", "") else "127.0.0.1")
    # the SuperLink (Fleet, Control and runtime APIs on one port) listens on loopback only, with its own TLS;
    # the sites reach it through the Fleet-API-only gateway on --host:--port (nnunet_fed.deployment.gateway)
    link_port = launch.free_port("127.0.0.1")
    link_tls = launch.TLS(insecure=True) if tls.insecure else launch.write_loopback_tls(os.path.join(work, "tls"))
    launch.write_connection(flwr_home, f"127.0.0.1:{link_port}", link_tls)
    run_config = launch.write_run_config(os.path.join(work, "run_config.toml"), run.to_run_config())

    _on_signal_exit()
    env = {**os.environ, "FLWR_HOME": flwr_home}
    server_log = os.path.join(fold_dir, launch.SERVER_LOG)
    relays = [launch.ErrorRelay(os.path.join(work, f"{n.lower()}.log"), server_log, n) for n in ("SuperLink", "gateway")]
    superlink = launch.FlowerProcess("SuperLink", launch.superlink_command(
        "127.0.0.1", link_port, link_tls, database=os.path.join(work, "superlink.db"),
        supernode_auth=bool(args.auth_supernode_keys)), os.path.join(work, "superlink.log"), env=env)
    gateway = None
    try:
        launch.write_process_record(processes, link_port, server=os.getpid(), superlink=superlink.pid)
        launch.wait_for_port("127.0.0.1", link_port, 120, superlink)
        gateway = launch.FlowerProcess("gateway", launch.gateway_command(args.host, port, link_port, tls, link_tls),
                                       os.path.join(work, "gateway.log"), env=env)
        launch.write_process_record(processes, link_port, server=os.getpid(), superlink=superlink.pid,
                                    gateway=gateway.pid)
        launch.wait_for_port(args.host, port, 60, gateway)
        if args.auth_supernode_keys:
            launch.sync_supernode_keys(flwr_home, [os.path.abspath(k) for k in args.auth_supernode_keys],
                                       os.path.join(work, "supernode_keys.json"))
        join = site_join_command(port, run.configuration, run.trainer, run.plans, tls.insecure, run.fold,
                                 node_auth=bool(args.auth_supernode_keys))
        print(f"sites connect to {args.host}:{port} (Fleet API only; SuperLink on 127.0.0.1:{link_port}, log: "
              f"{superlink.log_path}); sites join with:\n  {join}", flush=True)
        run_id = launch.submit_run(flwr_home, run_config)
        print(f"run {run_id}: {run.rounds} round(s), min-sites {run.min_sites}, federation {run.federation_name}",
              flush=True)
        status = launch.follow_run(flwr_home, run_id, [superlink, gateway], relays, superlink_port=link_port)
    except launch.LaunchError as e:
        for r in relays:
            r.copy_new()
        for p in (superlink, gateway):  # the cause, when a Flower process died under a later step
            if p is not None and p.poll() is not None and f"{p.name} exited" not in str(e):
                e = launch.LaunchError(f"{p.name} exited with code {p.poll()}; see {p.log_path}; then: {e}")
        print(f"nnunet_fed server: error: {e}", file=sys.stderr)
        launch.append_log(server_log, "nnunet_fed server", [f"nnunet_fed server stopped: {e}"])
        return 1
    except KeyboardInterrupt:
        print("nnunet_fed server: interrupted; run the same command again to resume after the last completed "
              "round", file=sys.stderr)
        return 130
    finally:
        if gateway is not None:
            gateway.stop()
        superlink.stop()
        launch.stop_runtime_processes(link_port)  # its ServerApp does not end with it
        if os.path.isfile(processes):
            os.remove(processes)
    ckpt = os.path.join(fold_dir, "checkpoint_final.pth")
    if not status.endswith("completed"):
        launch.append_log(server_log, "nnunet_fed server", [f"the run ended with status {status!r}"])
        print(f"nnunet_fed server: the run ended with status {status!r}; see {server_log} and {superlink.log_path}",
              file=sys.stderr)
        return 1
    if not os.path.isfile(ckpt):  # personalised trainer: every site holds its own model
        from nnunet_fed.federation.commands import predict_command

        print(f"federation records: {fold_dir}; each site predicts with its own model: "
              f"{predict_command('<site>', run.trainer, run.plans, run.configuration, run.fold)}")
        return 0
    from nnunet_fed.federation.commands import predict_command

    print(f"global model: {os.path.dirname(fold_dir)}")
    print(f"predict with: {predict_command(run.federation_name, run.trainer, run.plans, run.configuration, run.fold)}")
    return 0


def site_join_command(port: int, configuration: str, trainer: str, plans: str, insecure: bool, fold="0",
                      node_auth: bool = False) -> str:
    """The ``nnunet_fed site join`` a site runs to join this server (``<this host>``, ``<dataset>``, ``<ca.pem>``
    and, with node authentication, ``<site.key>`` are for the site to fill in); its plans, configuration and
    trainer are the server's."""
    tls = "--insecure" if insecure else "--root-certificates <ca.pem>"
    if node_auth:
        tls += " --auth-supernode-private-key <site.key>"
    return (f"nnunet_fed site join --superlink <this host>:{port} -d <dataset> -c {configuration} -tr {trainer} "
            f"-p {plans} -f {fold} {tls}")


def cmd_site_join(args) -> int:
    from nnunet_fed.deployment import launch

    site_checks.require_nnunet_paths()
    name = site_checks.dataset_name(args.dataset)
    plans = site_checks.check_preprocessed(name, args.plans, args.configuration)
    trainer_cls = site_checks.find_trainer(args.trainer)  # also puts the nnunet_fed trainers on nnUNet_extTrainer
    from nnunet_fed.site_data import verify_preprocessed_labels

    dataset_json = site_checks.read_json(os.path.join(os.environ["nnUNet_preprocessed"], name, "dataset.json"),
                                         f"site {name}: dataset.json")
    verify_preprocessed_labels(name, plans, args.configuration, dataset_json)  # every case's label values
    from nnunet_fed.cli import parse_fold

    trainer_cls.check_site_split(name, plans, args.configuration, parse_fold(args.fold))  # again at setup
    tls = launch.TLS(insecure=args.insecure, ca_certfile=args.root_certificates)
    try:
        tls.check("site")
    except launch.LaunchError as e:
        raise site_checks.FederationSetupError(str(e)) from None
    if args.auth_supernode_private_key and not os.path.isfile(args.auth_supernode_private_key):
        raise site_checks.FederationSetupError(f"private key {args.auth_supernode_private_key} does not exist")
    if not tls.insecure:
        try:  # a certificate whose names do not cover the address: said here, not as Flower's "unavailable"
            launch.check_tls_endpoint(args.superlink, tls.ca_certfile)
        except launch.LaunchError as e:
            raise site_checks.FederationSetupError(f"site {name}: {e}") from None
    node_config = {"dataset": name, "configuration": args.configuration, "trainer": args.trainer}
    if args.device:
        node_config["device"] = args.device
    port = args.runtime_port or launch.free_port()
    key = os.path.abspath(args.auth_supernode_private_key) if args.auth_supernode_private_key else None
    _on_signal_exit()
    worker = None
    with tempfile.TemporaryDirectory(prefix="nnunet_fed_site_") as private:  # mode 0700
        try:
            if not args.no_worker:
                node_config["worker"] = os.path.join(private, "worker.sock")
                worker = launch.SiteWorker(name, node_config["worker"], args.log_file)
                worker.start(wait=True)
            cmd = launch.supernode_command(args.superlink, port, node_config, tls, key)
            print(f"site {name}: joining {args.superlink} ({args.configuration}, {args.trainer})", flush=True)
            node = launch.FlowerProcess(f"SuperNode {name}", cmd, args.log_file, new_session=False,
                                        env=launch.supernode_env())
            try:
                while node.poll() is None:
                    if worker is not None:
                        worker.keep_alive()
                    time.sleep(1.0)
                return node.proc.returncode
            except KeyboardInterrupt:
                return 130
            finally:
                node.stop()
        finally:
            if worker is not None:
                worker.stop()


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-sites", type=int, required=True,
                   help="a round counts once this many sites sent a valid update")
    p.add_argument("-c", "--configuration", required=True, help="nnU-Net configuration, e.g. 2d or 3d_fullres")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainerFedAvg", help="federated trainer class")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier the sites train with")
    p.add_argument("-f", "--fold", default="0", help="nnU-Net fold (0-4 or 'all')")
    p.add_argument("--local-steps", type=int, default=50, help="training iterations per site and round")
    p.add_argument("--val-steps", type=int, default=10, help="pseudo-Dice validation batches per site and round")
    p.add_argument("--fedprox-mu", type=float, default=0.0, help="FedProx proximal weight (0: plain FedAvg)")
    p.add_argument("-o", "--option", action="append", default=[], metavar="NAME=VALUE",
                   help="trainer option (repeatable), as for simulate")
    from nnunet_fed.cli import add_strategy_args

    add_strategy_args(p)
    p.add_argument("--secure-aggregation", action="store_true",
                   help="Flower's SecAgg+: the server sees only the sum of the sites' updates (FedAvg, server "
                        "optimisers, client-level DP); each site validates (and under client-level DP clips) its own "
                        "update first")
    p.add_argument("--secagg-clip-range", type=float, default=8.0,
                   help="secure aggregation: a site's weighted update values must lie within +- this (sites refuse "
                        "larger ones, naming the value); client-level DP uses max(clip, 1)")
    p.add_argument("--secagg-max-weight", type=float, default=10000.0,
                   help="secure aggregation: the largest number of training cases of one site")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--federation-name", default="DatasetFed_flower", help="results folder of the global model")
    p.add_argument("--round-timeout", type=float, default=3600.0,
                   help="seconds a round waits for updates; sites that have not answered by then are left out")
    p.add_argument("--wait-for-sites", type=float, default=600.0,
                   help="seconds to wait for --min-sites connected sites before a round")
    p.add_argument("--round-retries", type=int, default=3,
                   help="times a round with fewer than --min-sites valid updates is repeated")
    p.add_argument("--no-val", action="store_true", help="skip nnU-Net's final validation at each site")
    p.add_argument("--fresh", action="store_true", help="discard a previous run of this federation and start over")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the SuperLink listens on (0.0.0.0: every interface, for sites on other machines)")
    p.add_argument("--port", type=int, default=None, help="SuperLink port (default: a free one, printed)")
    p.add_argument("--flower-dir", default=None,
                   help="SuperLink state, logs and Flower home (default: <global model fold>/flower)")
    _tls_args(p, "server")


def _site_subparsers(subparsers):
    site = subparsers.choices.get("site")
    if site is None:
        site = subparsers.add_parser("site", help="site-side commands (run at each site)")
        return site.add_subparsers(dest="site_command", required=True)
    return next(a for a in site._actions if isinstance(a, argparse._SubParsersAction))


def add_deployment_commands(subparsers) -> None:
    """Register ``server`` and ``site join`` on an argparse sub-parsers object."""
    p = subparsers.add_parser("server", help="start a Flower SuperLink and run the federation (sites join it)")
    add_server_args(p)
    p.set_defaults(func=cmd_server)

    p = _site_subparsers(subparsers).add_parser(
        "join", help="start a Flower SuperNode that trains this site's dataset in a federation")
    p.add_argument("--superlink", required=True, help="the server's address, HOST:PORT")
    p.add_argument("-d", "--dataset", required=True, help="this site's dataset ID or name")
    p.add_argument("-c", "--configuration", required=True, help="nnU-Net configuration (must match the server's)")
    p.add_argument("-f", "--fold", default="0", help="the server's fold, to check this site's split before joining "
                                                     "(checked again with the run's settings at setup)")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainerFedAvg", help="trainer (must match the server's)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (checked before joining)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu", "mps"], help="default: cuda if available")
    p.add_argument("--runtime-port", type=int, default=None,
                   help="local port of the SuperNode's runtime API (default: a free one)")
    p.add_argument("--log-file", default=None, help="write the SuperNode's output here instead of the terminal")
    p.add_argument("--no-worker", action="store_true",
                   help="no site worker: every message is answered in Flower's fresh ClientApp process, which "
                        "rebuilds the trainer from the round state files (slower; less memory between rounds)")
    _tls_args(p, "site")
    p.set_defaults(func=cmd_site_join)

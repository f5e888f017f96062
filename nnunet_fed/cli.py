"""The ``nnunet_fed`` command."""
from __future__ import annotations

import argparse
import sys

from nnunet_fed.sites import FederationSetupError


def _add_simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--datasets", nargs="+", required=True, help="dataset IDs or names, one per site")
    p.add_argument("-c", "--configuration", required=True, help="nnU-Net configuration, e.g. 2d or 3d_fullres")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainerFedAvg", help="federated trainer class")
    p.add_argument("-p", "--plans", default=None,
                   help="plans identifier (default nnUNetPlans; with --federated-planning the planner's plans, "
                        "nnUNetFedPlans)")
    p.add_argument("-pl", "--planner", default=None,
                   help="with --federated-planning: nnU-Net's experiment planner, as nnUNetv2_plan_and_preprocess "
                        "-pl (default ExperimentPlanner; e.g. nnUNetPlannerResEncM: plans nnUNetFedResEncUNetMPlans)")
    p.add_argument("-f", "--fold", default="0", help="nnU-Net fold (0-4 or 'all')")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=50, help="training iterations per site and round")
    p.add_argument("--val-steps", type=int, default=10, help="pseudo-Dice validation batches per site and round")
    p.add_argument("--fedprox-mu", type=float, default=0.0, help="FedProx proximal weight (0: plain FedAvg)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu", "mps"])
    p.add_argument("--federation-name", default=None,
                   help="results folder of the global model (default DatasetFed_<ids>)")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--no-val", action="store_true", help="skip nnU-Net's final validation at each site")
    p.add_argument("--fresh", action="store_true", help="discard a previous run of the same federation and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar; print nnU-Net's logs instead")
    p.add_argument("--federated-planning", action="store_true",
                   help="first plan the sites together from aggregate fingerprints (nnUNetFedPlans) and "
                        "preprocess every site with the shared plans")
    p.add_argument("--dp-epsilon", type=float, default=None,
                   help="with --federated-planning: epsilon of the noise added to each site's shared summary")
    p.add_argument("-o", "--option", action="append", default=[], metavar="NAME=VALUE",
                   help="trainer option (repeatable), e.g. -o target_epsilon=8; nnUNetv2_train reads the same "
                        "option from the variable nnUNet_fed_<NAME>")
    p.add_argument("-np", "--num-processes", type=int, default=2, help="processes for planning/preprocessing")
    add_strategy_args(p)
    p.add_argument("--diagnose", action="store_true",
                   help="record each round's update norms and the cosines between site updates in "
                        "federation_metrics.jsonl (holds every site's update in memory during a round)")


def add_strategy_args(p: argparse.ArgumentParser) -> None:
    from nnunet_fed.federation.aggregation import STRATEGIES

    p.add_argument("--strategy", default=None, choices=list(STRATEGIES), type=str.lower,
                   help="the server's aggregation rule (default: the trainer's, fedavg): Flower's FedAvgM, FedAdam, "
                        "FedYogi, FedAdagrad (server optimisers on the mean), FedMedian, FedTrimmedAvg, Krum")
    p.add_argument("--strategy-option", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting of the Flower rule (repeatable), e.g. --strategy fedavgm --strategy-option "
                        "server_momentum=0.9")


def parse_options(items) -> dict:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}`` (the trainer casts each value to its option's type)."""
    options = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"option {item!r} is not NAME=VALUE")
        options[name.strip()] = value.strip()
    return options


def parse_fold(text: str) -> int | str:
    """``-f``: a fold number or ``all``, with an error naming the argument."""
    text = str(text).strip()
    if text == "all":
        return "all"
    try:
        fold = int(text)
    except ValueError:
        fold = -1
    if fold < 0:
        raise FederationSetupError(f"-f/--fold must be a fold number (0-4 with nnU-Net's 5-fold split) or 'all', "
                                   f"got {text!r}")
    return fold


def cmd_simulate(args) -> int:
    from nnunet_fed.federation.commands import predict_command
    from nnunet_fed.federation.simulation import SimulationConfig, check_schedule, simulate
    from nnunet_fed.sites import find_trainer, require_nnunet_paths

    cfg = SimulationConfig(dataset_ids=args.datasets, configuration=args.configuration, trainer=args.trainer,
                           rounds=args.rounds, local_steps=args.local_steps, val_steps=args.val_steps,
                           fold=parse_fold(args.fold), plans_identifier=args.plans or "nnUNetPlans",
                           device=args.device, fedprox_mu=args.fedprox_mu, federation_name=args.federation_name,
                           seed=args.seed, final_validation=not args.no_val, fresh=args.fresh,
                           progress=not args.no_progress, trainer_options=parse_options(args.option),
                           strategy=args.strategy or "fedavg", strategy_options=parse_options(args.strategy_option),
                           diagnose=args.diagnose)
    if args.dp_epsilon is not None and not args.federated_planning:
        raise FederationSetupError("--dp-epsilon is the epsilon of the planning summaries: it needs "
                                   "--federated-planning")
    if args.planner is not None and not args.federated_planning:
        raise FederationSetupError("-pl chooses the planner of --federated-planning; without it, plan with "
                                   "nnUNetv2_plan_and_preprocess -pl ... and train with its -p")
    if args.federated_planning:  # everything is checked before round 0 plans and preprocesses the sites
        from nnunet_fed.plans.federated_planning import run_federated_planning
        from nnunet_fed.plans.planner import federated_planner, federated_plans_name

        require_nnunet_paths()
        check_schedule(cfg)
        trainer_cls = find_trainer(args.trainer)
        options = trainer_cls.resolve_options(cfg.trainer_options)
        if trainer_cls.private and args.dp_epsilon is None and not options.get("public_plans"):
            raise FederationSetupError(
                f"{args.trainer} is differentially private: plan with DP summaries (add --dp-epsilon E; E counts in "
                f"the same total as training) or declare the plans public (-o public_plans=true)")
        planned = federated_plans_name(federated_planner(args.planner or "ExperimentPlanner"))
        if args.plans is not None and args.plans != planned:
            raise FederationSetupError(
                f"-p {args.plans}: --federated-planning makes the plans {planned} with nnU-Net's "
                f"{args.planner or 'ExperimentPlanner'}; for nnU-Net's residual encoder presets choose the planner "
                f"(-pl nnUNetPlannerResEncM, nnUNetPlannerResEncL or nnUNetPlannerResEncXL: plans "
                f"nnUNetFedResEncUNetMPlans, ...), or leave -p out")
        cfg.plans_identifier = run_federated_planning(
            args.datasets, configurations=(args.configuration,), num_processes=args.num_processes,
            dp_epsilon=args.dp_epsilon, planner=args.planner or "ExperimentPlanner", reuse=not args.fresh,
            report=print)
    out = simulate(cfg)
    personalised = out["global_checkpoint"] is None  # local parameters: one personal model per site
    print(f"{'federation records' if personalised else 'global model'}: {out['global_model_folder']}")
    for site, folder in out["site_folders"].items():
        print(f"site {site}: {folder}")
    target = "<site>" if personalised else out["federation_name"]
    command = predict_command(target, cfg.trainer, cfg.plans_identifier, cfg.configuration, cfg.fold,
                              device=cfg.device)
    print(f"predict with: {command}"
          f"{' (personalised: each site predicts with its own model, <site> = its dataset)' if personalised else ''}")
    return 0


def cmd_make_data(args) -> int:
    from nnunet_fed.data.synthetic import make_federated_datasets
    from nnunet_fed.sites import require_nnunet_paths

    require_nnunet_paths(("nnUNet_raw",))
    names = make_federated_datasets(first_id=args.first_id, num_sites=args.sites, scenario=args.scenario,
                                    dim=args.dim, num_train=args.num_train, num_test=args.num_test, seed=args.seed,
                                    modality=args.modality, overwrite=args.overwrite, layout=args.layout,
                                    inverted_sites=args.inverted_sites)
    for n in names:
        print(n)
    return 0


def cmd_demo(args) -> int:
    from nnunet_fed.demo import run_demo

    run_demo(workdir=args.workdir, rounds=args.rounds, local_steps=args.local_steps, device=args.device,
             num_train=args.num_train, seed=args.seed)
    return 0


def cmd_trainer_path(args) -> int:
    import nnunet_fed

    print(nnunet_fed.trainer_folder())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet_fed", description="Federated training for nnU-Net v2")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="run a federation of local datasets on this machine")
    _add_simulate_args(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("make-data", help="write synthetic multi-site datasets to nnUNet_raw")
    p.add_argument("--scenario", default="shift", choices=["shift", "organs"])
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--dim", type=int, default=2, choices=[2, 3])
    p.add_argument("--first-id", type=int, default=101)
    p.add_argument("--num-train", type=int, default=40)
    p.add_argument("--num-test", type=int, default=10)
    p.add_argument("--modality", default="MRI", help="channel name written to dataset.json (e.g. MRI, CT)")
    p.add_argument("--layout", default="nifti", choices=["nifti", "rgb-png", "ignore-label", "regions", "no-foreground"],
                   help="how the sites store their cases: nifti (default), rgb-png (2D RGB .png), ignore-label "
                        "(sparse annotation, label 3 = ignore), regions (two channels, region-based labels), "
                        "no-foreground (healthy controls: every label 0); a tiny site: --num-train 3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inverted-sites", type=int, nargs="*", default=[], metavar="K",
                   help="indices (0-based) of sites with inverted contrast (bright tumour dark), e.g. --inverted-sites 2")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_make_data)

    p = sub.add_parser("demo", help="3 synthetic sites: plan, FedAvg, predict, Dice table against local training")
    p.add_argument("--workdir", default="nnunet_fed_demo")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--local-steps", type=int, default=None)
    p.add_argument("--num-train", type=int, default=None)
    p.add_argument("--device", default="cpu", choices=["cuda", "cpu", "mps"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    from nnunet_fed.plans.cli import add_planning_commands

    add_planning_commands(sub)

    from nnunet_fed.deployment.cli import add_deployment_commands

    add_deployment_commands(sub)

    from nnunet_fed.privacy.audit import add_audit_command

    add_audit_command(sub)

    from nnunet_fed.privacy.ledger import add_privacy_report_command

    add_privacy_report_command(sub)

    p = sub.add_parser("trainer-path", help="print the folder to put in nnUNet_extTrainer")
    p.set_defaults(func=cmd_trainer_path)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FederationSetupError, FileExistsError, ValueError) as e:
        print(f"nnunet_fed {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``nnunet_fed`` command."""
from __future__ import annotations

import argparse
import sys

from nnunet_fed.sites import FederationSetupError


def _add_simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--datasets", nargs="+", required=True, help="dataset IDs or names, one per site")
    p.add_argument("-c", "--configuration", required=True, help="nnU-Net configuration, e.g. 2d or 3d_fullres")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainerFedAvg", help="federated trainer class")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
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


def parse_options(items) -> dict:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}`` (the trainer casts each value to its option's type)."""
    options = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"option {item!r} is not NAME=VALUE")
        options[name.strip()] = value.strip()
    return options


def cmd_simulate(args) -> int:
    from nnunet_fed.federation.simulation import SimulationConfig, simulate

    fold = args.fold if args.fold == "all" else int(args.fold)
    plans_identifier = args.plans
    if args.dp_epsilon is not None and not args.federated_planning:
        raise FederationSetupError("--dp-epsilon is the epsilon of the planning summaries: it needs "
                                   "--federated-planning")
    if args.federated_planning:
        from nnunet_fed.sites import find_trainer

        trainer_cls = find_trainer(args.trainer)
        options = trainer_cls.resolve_options(parse_options(args.option))  # bad options fail before planning
        if trainer_cls.private and args.dp_epsilon is None and not options.get("public_plans"):
            raise FederationSetupError(
                f"{args.trainer} is differentially private: plan with DP summaries (add --dp-epsilon E; E counts in "
                f"the same total as training) or declare the plans public (-o public_plans=true)")  # round 0: fingerprint summaries, merged plans, site preprocessing
        from nnunet_fed.plans.federated_planning import run_federated_planning

        plans_identifier = run_federated_planning(args.datasets, configurations=(args.configuration,),
                                                  num_processes=args.num_processes, dp_epsilon=args.dp_epsilon)
    cfg = SimulationConfig(dataset_ids=args.datasets, configuration=args.configuration, trainer=args.trainer,
                           rounds=args.rounds, local_steps=args.local_steps, val_steps=args.val_steps, fold=fold,
                           plans_identifier=plans_identifier, device=args.device, fedprox_mu=args.fedprox_mu,
                           federation_name=args.federation_name, seed=args.seed, final_validation=not args.no_val,
                           fresh=args.fresh, progress=not args.no_progress,
                           trainer_options=parse_options(args.option))
    out = simulate(cfg)
    personalised = out["global_checkpoint"] is None  # local parameters: one personal model per site
    print(f"{'federation records' if personalised else 'global model'}: {out['global_model_folder']}")
    for site, folder in out["site_folders"].items():
        print(f"site {site}: {folder}")
    target = "<site>" if personalised else out["federation_name"]
    print(f"predict with: nnUNetv2_predict -d {target} -tr {cfg.trainer} -p {cfg.plans_identifier} "
          f"-c {cfg.configuration} -f {cfg.fold} -i <images> -o <output>"
          f"{' (personalised: each site predicts with its own model)' if personalised else ''}")
    return 0


def cmd_make_data(args) -> int:
    from nnunet_fed.data.synthetic import make_federated_datasets

    names = make_federated_datasets(first_id=args.first_id, num_sites=args.sites, scenario=args.scenario,
                                    dim=args.dim, num_train=args.num_train, num_test=args.num_test, seed=args.seed,
                                    modality=args.modality, overwrite=args.overwrite)
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
    p.add_argument("--seed", type=int, default=0)
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

"""``nnunet_fed site fingerprint|preprocess`` and ``nnunet_fed plan``.

The main command (``nnunet_fed/cli.py``) calls :func:`add_planning_commands` on its sub-parsers; every command
function takes the argparse namespace and returns an exit code (``FederationSetupError`` is left to the
caller, which prints it).
"""
from __future__ import annotations

import argparse
import os


def cmd_site_fingerprint(args) -> int:
    from nnunet_fed.plans.summary import DEFAULT_SUMMARY_FILENAME, summarize_site
    from nnunet_fed.sites import dataset_name, require_nnunet_paths

    require_nnunet_paths(("nnUNet_raw", "nnUNet_preprocessed"))
    output = args.output
    if output is None:
        output = os.path.join(os.environ["nnUNet_preprocessed"], dataset_name(args.dataset),
                              DEFAULT_SUMMARY_FILENAME)
    s = summarize_site(args.dataset, output_file=output, num_processes=args.num_processes,
                       dp_epsilon=args.dp_epsilon, verbose=args.verbose)
    dp = f", DP epsilon {s['dp']['epsilon']}" if s["dp"] else ""
    print(f"site {s['dataset_name']}: summary of {s['num_cases'] if s['dp'] is None else 'a noisy number of'} "
          f"cases{dp} written to {output} (nnU-Net's own fingerprint stays in nnUNet_preprocessed)")
    if s["dp"] is None and all(c["num_cases_with_foreground"] == 0 for c in s["foreground_intensities"].values()):
        print(f"site {s['dataset_name']}: no foreground in any of its {s['num_cases']} cases: it adds nothing to the "
              f"foreground intensity statistics and trains on background (e.g. healthy controls)")
    return 0


def cmd_plan(args) -> int:
    from nnunet_fed.plans.planner import plan_federation

    plans = plan_federation(args.fingerprints, args.output, gpu_memory_target_in_gb=args.gpu_memory_target,
                            federation_name=args.federation_name, planner_class=args.planner, quiet=not args.verbose)
    fed = plans["federation"]
    print(f"plans {plans['plans_name']} for {len(fed['sites'])} site(s), {fed['num_cases']} cases, "
          f"configurations {', '.join(plans['configurations'])}: {args.output}")
    return 0


def cmd_site_preprocess(args) -> int:
    from nnunet_fed.plans.preprocess import preprocess_site

    ident = preprocess_site(args.dataset, args.plans, configurations=args.configurations,
                            num_processes=args.num_processes, verbose=args.verbose)
    print(f"site {args.dataset}: preprocessed with plans {ident} ({', '.join(args.configurations)}); "
          f"train with -p {ident}")
    return 0


def add_planning_commands(subparsers) -> None:
    """Register ``site`` (``fingerprint``, ``preprocess``) and ``plan`` on an argparse sub-parsers object."""
    site = subparsers.add_parser("site", help="site-side federated planning steps (run at each site)")
    site_sub = site.add_subparsers(dest="site_command", required=True)

    p = site_sub.add_parser("fingerprint", help="nnU-Net fingerprint (kept local) + shareable aggregate summary")
    p.add_argument("-d", "--dataset", required=True, help="this site's dataset ID or name")
    p.add_argument("-o", "--output", default=None,
                   help="summary JSON to share (default nnUNet_preprocessed/<dataset>/nnUNetFed_site_summary.json)")
    p.add_argument("--dp-epsilon", type=float, default=None,
                   help="release the summary with epsilon-differential privacy (Laplace noise)")
    p.add_argument("-np", "--num-processes", type=int, default=2)
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=cmd_site_fingerprint)

    p = site_sub.add_parser("preprocess", help="install the federation's plans and run nnU-Net preprocessing")
    p.add_argument("-d", "--dataset", required=True, help="this site's dataset ID or name")
    p.add_argument("--plans", required=True, help="plans JSON made by 'nnunet_fed plan'")
    p.add_argument("-c", "--configurations", nargs="+", required=True, help="e.g. 2d 3d_fullres")
    p.add_argument("-np", "--num-processes", type=int, default=2)
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=cmd_site_preprocess)

    p = subparsers.add_parser("plan", help="merge site summaries and plan one nnU-Net experiment (nnUNetFedPlans)")
    p.add_argument("--fingerprints", nargs="+", required=True, help="site summary JSON files")
    p.add_argument("-o", "--output", required=True, help="plans JSON to write")
    p.add_argument("-pl", "--planner", default="ExperimentPlanner",
                   help="nnU-Net's experiment planner (as nnUNetv2_plan_and_preprocess -pl), e.g. nnUNetPlannerResEncM; "
                        "the plans are named after it: nnUNetFedPlans, nnUNetFedResEncUNetMPlans, ...")
    p.add_argument("--gpu-memory-target", type=float, default=None, help="GB (default: the planner's own, e.g. 8)")
    p.add_argument("--federation-name", default=None, help="dataset name recorded in the plans "
                                                           "(default DatasetFed_<ids>)")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with just these commands (tests, or ``python -m nnunet_fed.plans.cli``)."""
    parser = argparse.ArgumentParser(prog="nnunet_fed")
    sub = parser.add_subparsers(dest="command", required=True)
    add_planning_commands(sub)
    return parser


def main(argv=None) -> int:
    import sys

    from nnunet_fed.sites import FederationSetupError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FederationSetupError as e:
        print(f"nnunet_fed {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    import sys

    sys.exit(main())

"""All three federated-planning steps in one process (``nnunet_fed simulate --federated-planning``, round 0).

1. every site: ``summarize_site`` (nnU-Net fingerprint kept local, shareable summary written);
2. "server": ``plan_federation`` merges the summaries and plans with nnU-Net's planner (``nnUNetFedPlans``, or
   the plans of another nnU-Net planner, ``planner``);
3. every site: ``preprocess_site`` installs the shared plans and runs nnU-Net's preprocessing.

Before anything is written, every site's dataset.json is compared (same channel names, labels in nnU-Net's
terms, file ending) and every site's cases are verified (``nnunet_fed.site_data.verify_raw_site``). Plans made
earlier for exactly these sites (same planner, same DP epsilon, every site preprocessed with them) are reused
unless ``reuse`` is False: running the command again to resume a federation keeps the plans its weights were
trained with (and, with DP summaries, releases nothing new).
"""
from __future__ import annotations

import os
from typing import Sequence

from nnunet_fed.plans.planner import federated_planner, federated_plans_name, plan_federation
from nnunet_fed.plans.preprocess import load_federated_plans, preprocess_site
from nnunet_fed.plans.summary import summarize_site
from nnunet_fed.sites import (FederationSetupError, check_preprocessed, check_sites_compatible, dataset_name,
                              read_json, require_nnunet_paths)


def default_output_dir(names: Sequence[str]) -> str:
    """Where summaries and shared plans go by default: ``nnUNet_preprocessed/<first site>/federated_planning``."""
    return os.path.join(os.environ["nnUNet_preprocessed"], names[0], "federated_planning")


def existing_plans(names: Sequence[str], configurations: Sequence[str], output_dir: str, plans_identifier: str,
                   dp_epsilon: float | None) -> str | None:
    """The shared plans file made earlier for exactly these sites, with this DP epsilon, containing
    ``configurations``, with which every site is preprocessed; ``None`` if there is none (or it differs)."""
    plans_file = os.path.join(output_dir, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        return None
    try:
        plans = load_federated_plans(plans_file)
    except FederationSetupError:
        return None
    sites = plans["federation"]["sites"]
    if [s.get("dataset_name") for s in sites] != list(names) or \
            any(s.get("dp_epsilon") != (None if dp_epsilon is None else float(dp_epsilon)) for s in sites):
        return None
    if any(c not in plans["configurations"] for c in configurations):
        return None
    shared = {k: v for k, v in plans.items() if k != "dataset_name"}
    for name in names:
        site_file = os.path.join(os.environ["nnUNet_preprocessed"], name, plans_identifier + ".json")
        if not os.path.isfile(site_file):
            return None
        site_plans = read_json(site_file, f"site {name}: {site_file}")
        if {k: v for k, v in site_plans.items() if k != "dataset_name"} != shared:
            return None
        try:
            for c in configurations:
                check_preprocessed(name, plans_identifier, c)
        except FederationSetupError:
            return None
    return plans_file


def run_federated_planning(dataset_ids: Sequence, configurations: Sequence[str] = ("2d",),
                           output_dir: str | None = None, num_processes: int = 2,
                           dp_epsilon: float | None = None, reuse_fingerprints: bool = False,
                           verbose: bool = False, planner: str = "ExperimentPlanner", reuse: bool = False,
                           report=None) -> str:
    """Summarize every site, plan once, preprocess every site; returns the plans identifier (``nnUNetFedPlans``
    for nnU-Net's default planner).

    Summaries and the shared plans go to ``output_dir`` (default ``default_output_dir``):
    ``<site>_summary.json`` and ``<plans identifier>.json``. ``reuse``: keep plans made earlier for these sites
    (``existing_plans``) instead of planning again. ``report`` (e.g. ``print``) is told which happened.
    Raises ``FederationSetupError`` (naming the site, case, value) before anything is written.
    """
    from nnunet_fed.site_data import verify_raw_site

    require_nnunet_paths(("nnUNet_raw", "nnUNet_preprocessed"))
    if isinstance(configurations, str):
        configurations = (configurations,)
    if not dataset_ids:
        raise FederationSetupError("no site given")
    planner_cls = federated_planner(planner)
    plans_identifier = federated_plans_name(planner_cls)
    names = [dataset_name(d) for d in dataset_ids]
    check_sites_compatible(names, source="raw")  # before anything is written
    if output_dir is None:
        output_dir = default_output_dir(names)
    if reuse:
        found = existing_plans(names, configurations, output_dir, plans_identifier, dp_epsilon)
        if found is not None:
            if report is not None:
                report(f"reusing the federated plans {found} (every site is preprocessed with them; --fresh plans "
                       f"again)")
            return plans_identifier
    verified = {name: verify_raw_site(name, num_processes=int(num_processes)) for name in names}
    os.makedirs(output_dir, exist_ok=True)

    summary_files = []
    for name in names:
        f = os.path.join(output_dir, f"{name}_summary.json")
        summarize_site(name, output_file=f, num_processes=num_processes, dp_epsilon=dp_epsilon,
                       reuse_fingerprint=reuse_fingerprints, verbose=verbose, site_data=verified[name])
        summary_files.append(f)
    plans_file = os.path.join(output_dir, plans_identifier + ".json")
    plans = plan_federation(summary_files, plans_file, planner_class=planner_cls, quiet=not verbose)
    for c in configurations:
        if c not in plans["configurations"]:
            raise FederationSetupError(f"configuration {c!r} not in the federated plans {plans_file} "
                                       f"(available: {sorted(plans['configurations'])})")
    for name in names:
        preprocess_site(name, plans_file, configurations=configurations, num_processes=num_processes,
                        verbose=verbose, verified=True)
    if report is not None:
        report(f"planned {len(names)} site(s) together: {plans_file}")
    return plans.get("plans_name") or plans_identifier

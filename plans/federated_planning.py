"""All three federated-planning steps in one process (``nnunet_fed simulate --federated-planning``, round 0).

1. every site: ``summarize_site`` (nnU-Net fingerprint kept local, shareable summary written);
2. "server": ``plan_federation`` merges the summaries and plans with nnU-Net's planner (``nnUNetFedPlans``);
3. every site: ``preprocess_site`` installs the shared plans and runs nnU-Net's preprocessing.

The sites' dataset.json files are checked for the same channel names, labels and file ending before anything
is written.
"""
from __future__ import annotations

import os
from typing import Sequence

from nnunet_fed.plans.planner import FED_PLANS_IDENTIFIER, plan_federation
from nnunet_fed.plans.preprocess import preprocess_site
from nnunet_fed.plans.summary import summarize_site
from nnunet_fed.sites import FederationSetupError, check_sites_compatible, dataset_name, require_nnunet_paths

PLANS_FILENAME = FED_PLANS_IDENTIFIER + ".json"


def run_federated_planning(dataset_ids: Sequence, configurations: Sequence[str] = ("2d",),
                           output_dir: str | None = None, num_processes: int = 2,
                           dp_epsilon: float | None = None, reuse_fingerprints: bool = False,
                           verbose: bool = False) -> str:
    """Summarize every site, plan once, preprocess every site; returns the plans identifier ``nnUNetFedPlans``.

    Summaries and the shared plans go to ``output_dir`` (default
    ``nnUNet_preprocessed/<first site>/federated_planning/``): ``<site>_summary.json`` and ``nnUNetFedPlans.json``.
    """
    require_nnunet_paths(("nnUNet_raw", "nnUNet_preprocessed"))
    if isinstance(configurations, str):
        configurations = (configurations,)
    if not dataset_ids:
        raise FederationSetupError("no site given")
    names = [dataset_name(d) for d in dataset_ids]
    check_sites_compatible(names, source="raw")  # before anything is written
    if output_dir is None:
        output_dir = os.path.join(os.environ["nnUNet_preprocessed"], names[0], "federated_planning")
    os.makedirs(output_dir, exist_ok=True)

    summary_files = []
    for name in names:
        f = os.path.join(output_dir, f"{name}_summary.json")
        summarize_site(name, output_file=f, num_processes=num_processes, dp_epsilon=dp_epsilon,
                       reuse_fingerprint=reuse_fingerprints, verbose=verbose)
        summary_files.append(f)
    plans_file = os.path.join(output_dir, PLANS_FILENAME)
    plans = plan_federation(summary_files, plans_file, quiet=not verbose)
    for c in configurations:
        if c not in plans["configurations"]:
            raise FederationSetupError(f"configuration {c!r} not in the federated plans {plans_file} "
                                       f"(available: {sorted(plans['configurations'])})")
    for name in names:
        preprocess_site(name, plans_file, configurations=configurations, num_processes=num_processes,
                        verbose=verbose)
    return plans.get("plans_name") or FED_PLANS_IDENTIFIER

"""Planning and preprocessing of simulated sites with nnU-Net's own API (what nnUNetv2_extract_fingerprint,
nnUNetv2_plan_experiment, nnUNetv2_move_plans_between_datasets and nnUNetv2_preprocess run)."""
from __future__ import annotations

import contextlib
import io
from typing import Sequence


def plan_and_preprocess_sites(dataset_ids: Sequence[int], configurations: Sequence[str] = ("2d",),
                              num_processes: int = 2, verify_integrity: bool = True, quiet: bool = True,
                              plans_from_first_site: bool = True) -> None:
    """Fingerprint and plan each site with nnU-Net's ExperimentPlanner, then preprocess every site.

    With ``plans_from_first_site`` (the default) the first site's plans are moved to the others
    (``nnUNetv2_move_plans_between_datasets``) before preprocessing, so that all sites share one target spacing,
    normalisation and network: a federation refuses sites preprocessed with plans that differ there. These plans
    come from the first site's exact fingerprint: DP trainers accept them only with ``-o public_plans=true``
    (``--federated-planning --dp-epsilon`` is the private path). ``plans_from_first_site=False`` keeps each site's
    own plans (local training only).
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import \
        move_plans_between_datasets

    ids = [int(i) for i in dataset_ids]
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        extract_fingerprints(ids, num_processes=num_processes, check_dataset_integrity=verify_integrity,
                             clean=True, verbose=False, show_progress_bar=False)
        plans_identifier = plan_experiments(ids) or "nnUNetPlans"
        if plans_from_first_site:
            for i in ids[1:]:
                move_plans_between_datasets(ids[0], i, plans_identifier, plans_identifier)
        preprocess(ids, plans_identifier, configurations=tuple(configurations),
                   num_processes=[num_processes] * len(configurations), verbose=False,
                   show_progress_bar=False)

"""Per-site planning and preprocessing with nnU-Net's own API (what nnUNetv2_plan_and_preprocess runs)."""
from __future__ import annotations

import contextlib
import io
from typing import Sequence


def plan_and_preprocess_sites(dataset_ids: Sequence[int], configurations: Sequence[str] = ("2d",),
                              num_processes: int = 2, verify_integrity: bool = True, quiet: bool = True) -> None:
    """Fingerprint, plan (nnU-Net's ExperimentPlanner) and preprocess each site on its own data."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)

    ids = [int(i) for i in dataset_ids]
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        extract_fingerprints(ids, num_processes=num_processes, check_dataset_integrity=verify_integrity,
                             clean=True, verbose=False, show_progress_bar=False)
        plans_identifier = plan_experiments(ids)
        preprocess(ids, plans_identifier or "nnUNetPlans", configurations=tuple(configurations),
                   num_processes=[num_processes] * len(configurations), verbose=False,
                   show_progress_bar=False)

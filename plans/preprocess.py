"""Site side: install the federation's shared plans and run nnU-Net's preprocessing with them.

The plans file written by ``nnunet_fed plan`` carries a ``federation`` block with the dataset.json facts every
site must share (channel names, labels, file ending, regions). ``preprocess_site`` checks the site's own
``dataset.json`` against it before writing anything, then

1. writes the plans to ``nnUNet_preprocessed/<site>/<plans_name>.json`` (``nnUNetFedPlans.json``) with
   ``dataset_name`` set to the site (nnU-Net's trainer names its results folder after it),
2. copies the site's ``dataset.json`` (and ``splits_final.json`` if the raw folder has one) next to it, as
   nnU-Net's planner would have,
3. extracts nnU-Net's local fingerprint if the site has none (nnU-Net's trainer copies it to its results),
4. runs nnU-Net's ``preprocess_dataset`` for the requested configurations. Its preprocessor takes the
   normalization and, for CT, the clipping bounds / mean / std (``foreground_intensity_properties_per_channel``)
   from the plans, i.e. the federation's merged values, so every site normalizes identically.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from typing import Sequence

from nnunet_fed.plans.planner import PLANS_FEDERATION_FORMAT
from nnunet_fed.sites import (FederationSetupError, dataset_json_difference, dataset_name, read_json,
                              require_nnunet_paths)


def load_federated_plans(plans_file: str) -> dict:
    plans = read_json(plans_file, f"plans file {plans_file}")
    fed = plans.get("federation") if isinstance(plans, dict) else None
    if not isinstance(fed, dict) or fed.get("format") != PLANS_FEDERATION_FORMAT or "configurations" not in plans:
        raise FederationSetupError(f"{plans_file} is not a federated plans file (make it with 'nnunet_fed plan')")
    return plans


def check_site_matches_plans(name: str, site_dataset_json: dict, plans: dict, plans_file: str = "the plans") -> None:
    diff = dataset_json_difference(site_dataset_json, plans["federation"]["dataset_json"])
    if diff is not None:
        raise FederationSetupError(f"site {name}: {diff[0]} differ from the federation's plans ({plans_file}): "
                                   f"{diff[1]}. All sites must use the same {diff[0]}.")


def _dataset_id(name: str) -> int:
    m = re.match(r"Dataset(\d+)_", name)
    if not m:
        raise FederationSetupError(f"site {name}: not a DatasetXXX_ name")
    return int(m.group(1))


def preprocess_site(dataset_id_or_name, plans_file: str, configurations: Sequence[str] = ("2d",),
                    num_processes: int = 2, verbose: bool = False, verified: bool = False) -> str:
    """Install the shared plans at this site and preprocess it; returns the plans identifier.

    Before anything is written: the site's cases are verified (``nnunet_fed.site_data.verify_raw_site``; skipped
    with ``verified`` when the caller has just done it) and its dataset.json is compared with the plans'. Raises
    ``FederationSetupError`` naming the site (and case, value) otherwise."""
    from nnunet_fed.site_data import verify_raw_site

    require_nnunet_paths(("nnUNet_raw", "nnUNet_preprocessed"))
    if isinstance(configurations, str):
        configurations = (configurations,)
    configurations = tuple(configurations)
    if not configurations:
        raise FederationSetupError("no configuration given (-c)")
    name = dataset_name(dataset_id_or_name)
    plans = load_federated_plans(plans_file)

    raw_folder = os.path.join(os.environ["nnUNet_raw"], name)
    dj_file = os.path.join(raw_folder, "dataset.json")
    site_dj = read_json(dj_file, f"site {name}: {dj_file}")
    check_site_matches_plans(name, site_dj, plans, plans_file)
    missing = [c for c in configurations if c not in plans["configurations"]]
    if missing:
        raise FederationSetupError(f"site {name}: configuration(s) {missing} not in {plans_file} "
                                   f"(available: {sorted(plans['configurations'])})")
    dataset_number = _dataset_id(name)
    if not verified:
        verify_raw_site(name, num_processes=int(num_processes))

    # ------------------------------------------------------------------ validated: from here on we write
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

    plans_identifier = plans.get("plans_name") or "nnUNetFedPlans"
    site_plans = dict(plans)
    site_plans["dataset_name"] = name
    out_folder = os.path.join(os.environ["nnUNet_preprocessed"], name)
    os.makedirs(out_folder, exist_ok=True)
    with open(os.path.join(out_folder, plans_identifier + ".json"), "w") as f:
        json.dump(site_plans, f, indent=4, sort_keys=False)
    shutil.copyfile(dj_file, os.path.join(out_folder, "dataset.json"))
    splits = os.path.join(raw_folder, "splits_final.json")
    if os.path.isfile(splits) and not os.path.isfile(os.path.join(out_folder, "splits_final.json")):
        shutil.copyfile(splits, os.path.join(out_folder, "splits_final.json"))

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if not verbose else contextlib.nullcontext():
        if not os.path.isfile(os.path.join(out_folder, "dataset_fingerprint.json")):
            from nnunet_fed.plans.summary import nnunet_fingerprint

            nnunet_fingerprint(name, num_processes, overwrite=False, verbose=verbose)  # (a site without foreground too)
        preprocess_dataset(dataset_number, plans_identifier, configurations,
                           [max(1, int(num_processes))] * len(configurations), verbose=verbose,
                           show_progress_bar=verbose)
    return plans_identifier

"""Checks that run before any training starts: environment, dataset IDs, site compatibility, trainers.

Every error names the site (dataset) and the problem.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Sequence

import nnunet_fed

NNUNET_PATH_VARIABLES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


class FederationSetupError(RuntimeError):
    """A problem found before training: nothing has been written."""


def require_nnunet_paths(names: Sequence[str] = NNUNET_PATH_VARIABLES) -> dict[str, str]:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise FederationSetupError(
            f"environment variable(s) {', '.join(missing)} not set. nnunet_fed uses nnU-Net's folders: "
            f"export {'=... '.join(missing)}=... (see nnU-Net's documentation/setting_up_paths.md)")
    return {n: os.environ[n] for n in names}


def ensure_trainer_path() -> str:
    """Make nnU-Net find the nnunet_fed trainers (prepends our folder to ``nnUNet_extTrainer``)."""
    folder = nnunet_fed.trainer_folder()
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if folder not in current:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join([folder] + current)
    return folder


def dataset_name(dataset_id: str | int) -> str:
    """``DatasetXXX_Name`` for an ID or name, with an error that says where it looked."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(str(dataset_id) if not isinstance(dataset_id, str) else dataset_id)
    except (RuntimeError, ValueError) as e:
        where = ", ".join(f"{v}={os.environ.get(v, '<unset>')}" for v in NNUNET_PATH_VARIABLES)
        raise FederationSetupError(f"unknown dataset {dataset_id!r}: no matching DatasetXXX_ folder ({where}). "
                                   f"nnU-Net says: {e}") from None


def read_json(path: str, what: str) -> object:
    """Parse a JSON file; ``what`` names it in the error (e.g. "site X: /path/dataset.json")."""
    if not os.path.isfile(path):
        raise FederationSetupError(f"{what} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FederationSetupError(f"{what} is not valid JSON ({e})") from None


def write_json_atomic(obj, path: str, **dump_kwargs) -> str:
    """Write JSON through a temporary file, so that an interruption never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, **dump_kwargs)
    os.replace(path + ".tmp", path)
    return path


def describe(value) -> str:
    """Canonical text of a dataset.json entry, for comparing sites and naming differences."""
    return json.dumps(value, sort_keys=True)


def _load_dataset_json(name: str, source: str) -> dict:
    root = os.environ["nnUNet_raw" if source == "raw" else "nnUNet_preprocessed"]
    path = os.path.join(root, name, "dataset.json")
    return read_json(path, f"site {name}: {path}")


def check_sites_compatible(names: Sequence[str], source: str = "raw") -> dict:
    """Every site must have the same channel names, labels and file ending; returns the first dataset.json."""
    if not names:
        raise FederationSetupError("no site given")
    if len(set(names)) != len(names):
        raise FederationSetupError(f"a site is listed twice: {list(names)}")
    jsons = {n: _load_dataset_json(n, source) for n in names}
    ref_name = names[0]
    ref = jsons[ref_name]
    for key in ("channel_names", "labels", "file_ending"):
        if key not in ref:
            raise FederationSetupError(f"site {ref_name}: dataset.json has no {key!r}")
    for name in names[1:]:
        dj = jsons[name]
        for key in ("channel_names", "labels", "file_ending", "regions_class_order"):
            if describe(dj.get(key)) != describe(ref.get(key)):
                raise FederationSetupError(
                    f"site {name}: {key} differ from site {ref_name}: {describe(dj.get(key))} vs "
                    f"{describe(ref.get(key))}. All sites must use the same {key}.")
    return ref


def check_preprocessed(name: str, plans_identifier: str, configuration: str) -> dict:
    """The site's plans exist, contain ``configuration`` and its preprocessed data are there; returns the plans."""
    base = os.path.join(os.environ["nnUNet_preprocessed"], name)
    plans_file = os.path.join(base, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise FederationSetupError(
            f"site {name}: plans {plans_file} not found; run nnUNetv2_plan_and_preprocess -d <id> for this site "
            f"(or nnunet_fed simulate --federated-planning)")
    with open(plans_file) as f:
        plans = json.load(f)
    if configuration not in plans.get("configurations", {}):
        raise FederationSetupError(f"site {name}: configuration {configuration!r} not in {plans_file} "
                                   f"(available: {sorted(plans.get('configurations', {}))})")
    data_id = plans["configurations"][configuration].get("data_identifier")
    if data_id is not None and not os.path.isdir(os.path.join(base, data_id)):
        raise FederationSetupError(f"site {name}: preprocessed data {os.path.join(base, data_id)} missing; run "
                                   f"nnUNetv2_preprocess -d <id> -c {configuration} -plans_name {plans_identifier}")
    return plans


def find_trainer(trainer_name: str, require_federated: bool = True):
    """The trainer class, searched where nnUNetv2_train searches (nnU-Net's folder, then nnUNet_extTrainer)."""
    ensure_trainer_path()
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_fed.federation.trainer import nnUNetTrainerFederated

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net narrates its search
            cls = recursive_find_trainer_class_by_name(trainer_name)
    except RuntimeError:
        raise FederationSetupError(f"unknown trainer {trainer_name!r}: not found in nnU-Net's trainers nor in "
                                   f"nnUNet_extTrainer={os.environ.get('nnUNet_extTrainer')}") from None
    if require_federated and not issubclass(cls, nnUNetTrainerFederated):
        raise FederationSetupError(f"trainer {trainer_name!r} is not a federated trainer (it must derive from "
                                   f"nnunet_fed's nnUNetTrainerFederated, e.g. nnUNetTrainerFedAvg)")
    return cls

"""Checks that run before any training starts: environment, dataset IDs, site compatibility, trainers.

Every error names the site (dataset) and the problem.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
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


def _label_value(v):
    return sorted(int(x) for x in v) if isinstance(v, (list, tuple)) else int(v)


def _channel_text(name: str, value) -> str:
    return f"{name} ({', '.join(map(str, value))})" if isinstance(value, list) else f"{name} ({value})"


def label_channels(labels: dict, regions_class_order=None) -> dict:
    """What nnU-Net trains for a dataset.json ``labels`` entry, in its own terms.

    Integer labels: output channel = label value, so the order of the entries does not matter; returns
    ``{"labels": [[value, name], ...] sorted by value, "ignore": value or None}``. Region-based labels (a value is a
    list): nnU-Net's ``LabelManager`` makes output channel k the k-th region in the dict's order (background and
    ignore left out), so the order is part of the task; returns ``{"regions": [[name, sorted values], ...] in that
    order, "regions_class_order": ..., "ignore": ...}``. Raises ``FederationSetupError`` for entries nnU-Net cannot
    read."""
    if not isinstance(labels, dict):
        raise FederationSetupError(f"'labels' must be a JSON object, got {labels!r}")
    try:
        values = {str(k): _label_value(v) for k, v in labels.items()}
    except (TypeError, ValueError):
        raise FederationSetupError(f"'labels' must map names to an integer or a list of integers: {labels}") from None
    ignore = values.pop("ignore", None)
    if any(isinstance(v, list) and len(v) > 1 for v in values.values()):
        regions = [[k, v if isinstance(v, list) else [v]] for k, v in values.items() if k != "background"]
        return {"regions": regions, "regions_class_order": regions_class_order, "ignore": ignore}
    flat = {k: (v[0] if isinstance(v, list) else v) for k, v in values.items()}
    return {"labels": sorted([v, k] for k, v in flat.items()), "ignore": ignore}


def labels_difference(labels: dict, regions_class_order, ref_labels: dict, ref_regions_class_order) -> str | None:
    """``None`` when two ``labels`` (+ ``regions_class_order``) entries give nnU-Net the same task, else what
    differs ("here" is the first entry, "there" the reference)."""
    a = label_channels(labels, regions_class_order)
    b = label_channels(ref_labels, ref_regions_class_order)
    if a == b:
        return None
    if "regions" in a and "regions" in b and sorted(map(str, a["regions"])) == sorted(map(str, b["regions"])):
        k = next(i for i, (x, y) in enumerate(zip(a["regions"], b["regions"])) if x != y)
        return (f"the same regions in another order: output channel {k} is {_channel_text(*a['regions'][k])} here "
                f"and {_channel_text(*b['regions'][k])} there (nnU-Net maps output channels to regions in the order "
                f"of 'labels'; here {[r[0] for r in a['regions']]}, there {[r[0] for r in b['regions']]}): write "
                f"'labels' in the same order at every site (e.g. not with sorted keys)")
    if a.get("regions_class_order") != b.get("regions_class_order") and \
            {k: v for k, v in a.items() if k != "regions_class_order"} == \
            {k: v for k, v in b.items() if k != "regions_class_order"}:
        return f"regions_class_order {a['regions_class_order']} here, {b['regions_class_order']} there"
    return f"{describe(labels)} here, {describe(ref_labels)} there"


def dataset_json_difference(dj: dict, ref: dict) -> tuple[str, str] | None:
    """The first entry every site must share (channel names, labels in nnU-Net's terms, file ending) that differs
    between two dataset.json dicts, as ``(key, description)``; ``None`` when they agree."""
    for key in ("channel_names", "file_ending"):
        if describe(dj.get(key)) != describe(ref.get(key)):
            return key, f"{describe(dj.get(key))} vs {describe(ref.get(key))}"
    if dj.get("labels") is None or ref.get("labels") is None:
        if dj.get("labels") != ref.get("labels"):
            return "labels", f"{describe(dj.get('labels'))} vs {describe(ref.get('labels'))}"
        return None
    diff = labels_difference(dj["labels"], dj.get("regions_class_order"), ref["labels"],
                             ref.get("regions_class_order"))
    if diff is not None:
        return ("regions_class_order" if diff.startswith("regions_class_order") else "labels"), diff
    return None


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
        diff = dataset_json_difference(jsons[name], ref)
        if diff is not None:
            raise FederationSetupError(f"site {name}: {diff[0]} differ from site {ref_name}: {diff[1]}. All sites must "
                                       f"use the same {diff[0]}.")
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


def nnunet_fed_trainer(trainer_name: str):
    """One of nnunet_fed's own trainers (``trainers/<trainer_name>.py``, class of the same name), imported from its
    module; ``None`` for any other name, and when another folder comes before this one on ``nnUNet_extTrainer``
    (then nnU-Net's lookup decides, as nnUNetv2_train would).

    nnU-Net's lookup (``recursive_find_trainer_class_by_name``) imports every module of nnU-Net's trainer package
    before it reaches ``nnUNet_extTrainer``: on 2 CPU cores with a cold page cache a process that looks up
    ``nnUNetTrainerFedADP`` that way took 46-63 s against 16-17 s (about 2 s more CPU, the rest reading modules from
    disk), paid by every command and, in a Flower deployment, by every message a site answers (each runs in a fresh
    process). It would return the same class:
    nnU-Net ships no trainer of these names and :func:`ensure_trainer_path` puts this folder first on
    ``nnUNet_extTrainer`` (``tests/test_errors.py`` checks both lookups agree on every trainer)."""
    folder = nnunet_fed.trainer_folder()
    first = ([p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p] or [None])[0]
    if first is None or os.path.abspath(first) != folder or not re.fullmatch(r"nnUNetTrainer\w+", trainer_name) \
            or not os.path.isfile(os.path.join(folder, trainer_name + ".py")):
        return None
    return getattr(importlib.import_module(f"nnunet_fed.trainers.{trainer_name}"), trainer_name, None)


def find_trainer(trainer_name: str, require_federated: bool = True):
    """The trainer class nnUNetv2_train would use (nnU-Net's folder, then nnUNet_extTrainer); nnunet_fed's own
    trainers come straight from their module (:func:`nnunet_fed_trainer`). Raises ``FederationSetupError`` for an
    unknown trainer or (``require_federated``) one that is not federated."""
    ensure_trainer_path()
    from nnunet_fed.federation.trainer import nnUNetTrainerFederated

    cls = nnunet_fed_trainer(trainer_name)
    if cls is None:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

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


#: per configuration: what preprocessing, the network and the export of predictions depend on
PLANS_CONFIGURATION_KEYS = ("spacing", "patch_size", "normalization_schemes", "use_mask_for_norm",
                            "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg",
                            "resampling_fn_seg_kwargs", "resampling_fn_probabilities",
                            "resampling_fn_probabilities_kwargs", "architecture")
#: normalisation schemes that take the plans' foreground intensity properties (nnU-Net's CTNormalization)
INTENSITY_PROPERTY_SCHEMES = {"CTNormalization": ("mean", "std", "percentile_00_5", "percentile_99_5")}


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)), abs(float(b)))
    return a == b


def plans_difference(plans: dict, ref: dict, configuration: str) -> tuple[str, object, object] | None:
    """Where two sites' nnU-Net plans differ in what training and prediction depend on, as ``(key, value here,
    value there)``; ``None`` when they agree. Compared: ``transpose_forward``/``backward``, per configuration
    (nnU-Net's ``PlansManager``, inheritance resolved) ``PLANS_CONFIGURATION_KEYS`` (target spacing, patch size,
    normalisation, resampling, network), and the foreground intensity properties of every channel whose
    normalisation uses them (CT). Ignored: batch size, median image size, dataset name and the fingerprint's
    other statistics, which differ between sites without changing what the model sees."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    for key in ("transpose_forward", "transpose_backward"):
        if not _same(plans.get(key), ref.get(key)):
            return key, plans.get(key), ref.get(key)
    a = PlansManager(plans).get_configuration(configuration).configuration
    b = PlansManager(ref).get_configuration(configuration).configuration
    for key in PLANS_CONFIGURATION_KEYS:
        if not _same(a.get(key), b.get(key)):
            return key, a.get(key), b.get(key)
    props_a = plans.get("foreground_intensity_properties_per_channel", {})
    props_b = ref.get("foreground_intensity_properties_per_channel", {})
    for c, scheme in enumerate(a.get("normalization_schemes") or []):
        for prop in INTENSITY_PROPERTY_SCHEMES.get(scheme, ()):
            x = (props_a.get(str(c)) or {}).get(prop)
            y = (props_b.get(str(c)) or {}).get(prop)
            if not _same(x, y):
                return f"foreground_intensity_properties_per_channel (channel {c}, {scheme}: {prop})", x, y
    return None


def plans_difference_message(name: str, ref_name: str, diff: tuple, plans_identifier: str, configuration: str) -> str:
    key, here, there = diff
    return (f"site {name}: its plans ({plans_identifier}, {configuration}) differ from site {ref_name}'s where "
            f"training and prediction depend on them: {key} {json.dumps(here)} here, {json.dumps(there)} at "
            f"{ref_name}. The global model would preprocess every site's images like {ref_name}'s. Plan the sites "
            f"together (nnunet_fed simulate --federated-planning, or nnunet_fed site fingerprint / plan / site "
            f"preprocess), or give every site the same plans (nnUNetv2_move_plans_between_datasets -s <first site> "
            f"-t <site> -sp {plans_identifier} -tp {plans_identifier}, then nnUNetv2_preprocess -d <site> -plans_name "
            f"{plans_identifier} -c {configuration})")

"""A site's cases verified before any site command writes: raw data (``site fingerprint``, ``site preprocess``,
``--federated-planning``) and preprocessed data (``simulate``, ``site join``).

Raw data: nnU-Net's own dataset verification (``nnunetv2.experiment_planning.verify_dataset_integrity``), run per
case with its functions ``verify_labels`` (every label value declared in ``dataset.json``) and ``check_cases``
(image and label of the same shape and spacing, the declared number of channels, no NaN), plus its dataset-level
checks (required keys, ``numTraining``, a label file for every case, consecutive labels). nnU-Net's
``verify_dataset_integrity`` itself is not called: it prints its findings and raises a generic error or an
``AssertionError`` that names neither site nor value, and it starts a process pool for every dataset. Here the same
per-case functions run (in this process for small sites), and a failing case is read once more to name what is
wrong: ``FederationSetupError("site <name>: case <id> ...")`` with the value and what to do.

Preprocessed data: nnU-Net's preprocessing copies label values into the training data unchecked (a label 3 where
``dataset.json`` declares 0..2 fails only in the middle of training, in the loss). ``verify_preprocessed_labels``
reads every preprocessed segmentation (nnU-Net's dataset class) and refuses undeclared values the same way.
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
from dataclasses import dataclass

import numpy as np

from nnunet_fed.sites import FederationSetupError, read_json

REQUIRED_KEYS = ("labels", "channel_names", "numTraining", "file_ending")
PARALLEL_MIN_BYTES = 64 * 2 ** 20  # below this a process pool (spawn + imports) costs more than it saves
#: value nnU-Net's cropping writes into the segmentation outside the image's non-zero region
OUTSIDE_NONZERO_LABEL = -1


@dataclass
class SiteData:
    """What the verification learnt about a raw site (nothing of it leaves the site)."""
    name: str
    folder: str
    dataset_json: dict
    cases: dict  # identifier -> {"images": [...], "label": path} (nnU-Net's get_filenames_of_train_images_and_targets)
    reader_writer: type


def expected_label_values(dataset_json: dict) -> list[int]:
    """The values a label file may hold: nnU-Net's ``LabelManager.all_labels`` plus its ignore label."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    lm = LabelManager(dataset_json["labels"], regions_class_order=dataset_json.get("regions_class_order"))
    return sorted(set(lm.all_labels) | ({lm.ignore_label} if lm.has_ignore_label else set()))


def _describe_values(values) -> str:
    return ", ".join(str(int(v)) if float(v).is_integer() else f"{v:g}" for v in values)


def _label_advice(unexpected: list, expected: list[int]) -> str:
    if unexpected and all(v == 255 for v in unexpected) and 1 in expected:
        return ("masks saved as 0/255: map 255 to the label it stands for (e.g. 1) in every label file, then run the "
                "command again")
    return ("fix the label file, or, if the value is a structure every site labels, declare it in dataset.json "
            "'labels' at every site; then run the command again")


def _verify_case(name: str, case: str, image_files: list[str], label_file: str, channel_names: dict,
                 expected: list[int], reader_writer: type) -> str | None:
    """nnU-Net's per-case checks; ``None`` when the case is fine, else the message naming what is wrong."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import check_cases, verify_labels

    if not os.path.isfile(label_file):
        return (f"site {name}: case {case} has no label file ({label_file}): add "
                f"labelsTr/{os.path.basename(label_file)} or remove the case's images from imagesTr")
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints its findings; the message below names them
        try:
            labels_ok = verify_labels(label_file, reader_writer, expected)
            case_ok = check_cases(image_files, label_file, len(channel_names), reader_writer)
        except Exception as e:  # an unreadable file, or a reader's own assertion (e.g. an RGB PNG of 5 channels)
            return f"site {name}: case {case} cannot be read ({type(e).__name__}: {e}); files {image_files}, {label_file}"
    if labels_ok and case_ok:
        return None
    rw = reader_writer()
    seg, seg_props = rw.read_seg(label_file)
    if not labels_ok:
        found = np.unique(seg)
        unexpected = [v for v in found.tolist() if v not in expected]
        return (f"site {name}: case {case} ({label_file}) has label value {_describe_values(unexpected)}, which its "
                f"dataset.json does not declare (labels declare {_describe_values(expected)}): "
                f"{_label_advice(unexpected, expected)}")
    images, img_props = rw.read_images(image_files)
    if len(images) != len(channel_names):
        names = ", ".join(str(v) for v in channel_names.values())
        alpha = " (an RGBA image? save it as RGB)" if len(images) == 4 and len(channel_names) == 3 else ""
        return (f"site {name}: case {case} has {len(images)} channels in {[os.path.basename(f) for f in image_files]}, "
                f"its dataset.json declares {len(channel_names)} ({names}){alpha}: every case needs exactly the "
                f"declared channels")
    if images.shape[1:] != seg.shape[1:]:
        return (f"site {name}: case {case}: image shape {tuple(images.shape[1:])} and label shape "
                f"{tuple(seg.shape[1:])} differ ({[os.path.basename(f) for f in image_files]} vs "
                f"{os.path.basename(label_file)}): image and label of a case must cover the same voxels; resample or "
                f"re-export the label onto the image's grid")
    if not np.allclose(img_props["spacing"], seg_props["spacing"]):
        return (f"site {name}: case {case}: image spacing {tuple(img_props['spacing'])} and label spacing "
                f"{tuple(seg_props['spacing'])} differ: re-export the label with the image's geometry")
    if np.any(np.isnan(images)) or np.any(np.isnan(seg)):
        return f"site {name}: case {case} contains NaN values: replace them (nnU-Net cannot train on NaN)"
    return f"site {name}: case {case} fails nnU-Net's dataset verification ({image_files}, {label_file})"


def verify_raw_site(dataset_name: str, num_processes: int = 1) -> SiteData:
    """Verify every training case of the raw site ``dataset_name`` (``nnUNet_raw/<name>``) as nnU-Net's
    ``verify_dataset_integrity`` does; returns the site's files. Raises ``FederationSetupError`` naming the site,
    the case and the value. Reads every image and label once (twice for a failing case); writes nothing."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    folder = os.path.join(os.environ["nnUNet_raw"], dataset_name)
    dj_file = os.path.join(folder, "dataset.json")
    dj = read_json(dj_file, f"site {dataset_name}: {dj_file}")
    if not isinstance(dj, dict):
        raise FederationSetupError(f"site {dataset_name}: {dj_file} is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in dj]
    if missing:
        raise FederationSetupError(f"site {dataset_name}: dataset.json has no {', '.join(map(repr, missing))} "
                                   f"(nnU-Net needs {', '.join(REQUIRED_KEYS)})")
    try:
        expected = expected_label_values(dj)
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        raise FederationSetupError(f"site {dataset_name}: dataset.json 'labels' are not valid for nnU-Net ({e})") from None
    gaps = [b for a, b in zip(expected, expected[1:]) if b != a + 1]
    if expected[:1] != [0] or gaps:
        raise FederationSetupError(f"site {dataset_name}: dataset.json labels {_describe_values(expected)} are not "
                                   f"consecutive from 0 (0, 1, 2, ...), as nnU-Net requires")
    if "dataset" not in dj and not os.path.isdir(os.path.join(folder, "imagesTr")):
        raise FederationSetupError(f"site {dataset_name}: {os.path.join(folder, 'imagesTr')} does not exist")
    try:
        cases = get_filenames_of_train_images_and_targets(folder, dj)
    except (FileNotFoundError, OSError) as e:
        raise FederationSetupError(f"site {dataset_name}: training images not found ({e})") from None
    if not cases:
        raise FederationSetupError(f"site {dataset_name}: no training case in {folder} (imagesTr/<case>_0000"
                                   f"{dj['file_ending']})")
    if int(dj["numTraining"]) != len(cases):
        raise FederationSetupError(f"site {dataset_name}: dataset.json says numTraining={dj['numTraining']} but "
                                   f"imagesTr has {len(cases)} cases: set numTraining to {len(cases)}")
    for case, files in cases.items():
        absent = [f for f in files["images"] if not os.path.isfile(f)]
        if absent or not files["images"]:
            raise FederationSetupError(f"site {dataset_name}: case {case} has no image file {absent or ''}")
    rw = determine_reader_writer_from_dataset_json(dj, next(iter(cases.values()))["images"][0], verbose=False)
    jobs = [(dataset_name, case, files["images"], files["label"], dj["channel_names"], expected, rw)
            for case, files in cases.items()]
    total_bytes = sum(os.path.getsize(f) for j in jobs for f in j[2])
    if num_processes > 1 and len(jobs) > 1 and total_bytes >= PARALLEL_MIN_BYTES:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            problems = pool.starmap(_verify_case, jobs)
    else:
        problems = [_verify_case(*j) for j in jobs]
    problems = [p for p in problems if p]
    if problems:
        more = f" (and {len(problems) - 1} more case(s) with problems)" if len(problems) > 1 else ""
        raise FederationSetupError(problems[0] + more)
    return SiteData(dataset_name, folder, dj, cases, rw)


def verify_preprocessed_labels(dataset_name: str, plans: dict, configuration: str, dataset_json: dict) -> None:
    """Every preprocessed segmentation of ``configuration`` holds declared label values only (plus nnU-Net's -1
    outside the non-zero region). Raises ``FederationSetupError`` naming the site, the case and the value."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    base = os.path.join(os.environ["nnUNet_preprocessed"], dataset_name)
    data_id = plans["configurations"][configuration].get("data_identifier")
    folder = os.path.join(base, data_id) if data_id else None
    if folder is None or not os.path.isdir(folder):
        return  # check_preprocessed names a missing folder
    try:
        allowed = set(expected_label_values(dataset_json)) | {OUTSIDE_NONZERO_LABEL}
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        raise FederationSetupError(f"site {dataset_name}: dataset.json 'labels' are not valid for nnU-Net ({e})") from None
    dataset_class = infer_dataset_class(folder)
    dataset = dataset_class(folder)
    for case in sorted(dataset.identifiers):
        seg = np.asarray(dataset.load_case(case)[1][:])
        unexpected = sorted(set(np.unique(seg).tolist()) - allowed)
        if unexpected:
            declared = sorted(allowed - {OUTSIDE_NONZERO_LABEL})
            raise FederationSetupError(
                f"site {dataset_name}: case {case} of its preprocessed data ({folder}) has label value "
                f"{_describe_values(unexpected)}, which its dataset.json does not declare (labels declare "
                f"{_describe_values(declared)}): {_label_advice(unexpected, declared)}, and preprocess the site again "
                f"(nnUNetv2_plan_and_preprocess --verify_dataset_integrity, or nnunet_fed site preprocess)")

"""Server side of federated planning: validate and merge site summaries into one fingerprint.

``merge_summaries`` returns an nnU-Net-style fingerprint dict:

* ``foreground_intensity_properties_per_channel`` and ``median_relative_size_after_cropping`` exactly as in
  nnU-Net's ``dataset_fingerprint.json`` (the keys nnU-Net's planner copies into the plans and its
  preprocessor's CT normalization reads), computed from the merged aggregates;
* no per-case ``spacings`` / ``shapes_after_crop`` lists: instead ``federation.geometry`` holds the merged
  per-axis histograms (spacing, shape after cropping, physical extent) from which
  :class:`~nnunet_fed.plans.planner.FederatedExperimentPlanner` computes what nnU-Net's planner computes from
  those lists;
* ``federation``: the sites, the total number of cases, the dataset.json facts every site shares, the image
  reader/writer and the sites' DP records.

How the pooled intensity properties are obtained (nnU-Net weighs every case the same, see summary.py):
``mean = sum of per-case means / number of cases with foreground``,
``std = sqrt(sum of per-case mean squares / n - mean^2)`` (``np.std`` of the pooled sample),
percentiles 0.5 / 50 / 99.5, min and max from the merged intensity sketch. A site that released its summary
under DP has no exact sums; its sketch's moments are used instead.
"""
from __future__ import annotations

import math
import re

import numpy as np

from nnunet_fed.plans.sketch import LogSketch
from nnunet_fed.plans.summary import GEOMETRY_KINDS, SHARED_DATASET_KEYS, SUMMARY_FORMAT, SUMMARY_VERSION
from nnunet_fed.sites import FederationSetupError, dataset_json_difference

MERGED_FORMAT = "nnunet_fed.merged_fingerprint"


def _site(summary: dict, k: int) -> str:
    return str(summary.get("dataset_name") or f"#{k}")


def validate_summaries(summaries: list[dict]) -> None:
    """Every summary well formed; every site the same channel names, labels, file ending (and regions)."""
    if not summaries:
        raise FederationSetupError("no site summary given")
    for k, s in enumerate(summaries):
        if not isinstance(s, dict) or s.get("format") != SUMMARY_FORMAT:
            raise FederationSetupError(f"summary #{k} is not an nnunet_fed site summary")
        if int(s.get("version", -1)) > SUMMARY_VERSION:
            raise FederationSetupError(f"site {_site(s, k)}: summary version {s.get('version')} is newer than this "
                                       f"nnunet_fed understands ({SUMMARY_VERSION})")
        for key in ("dataset_json", "geometry", "foreground_intensities", "num_cases", "num_axes"):
            if key not in s:
                raise FederationSetupError(f"site {_site(s, k)}: summary has no {key!r}")
    names = [_site(s, k) for k, s in enumerate(summaries)]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise FederationSetupError(f"site {dup[0]}: summarised twice (each site must appear once)")
    ref, ref_name = summaries[0], names[0]
    for key in ("channel_names", "labels", "file_ending"):
        if ref["dataset_json"].get(key) is None:
            raise FederationSetupError(f"site {ref_name}: dataset.json has no {key!r}")
    for s, name in zip(summaries[1:], names[1:]):
        diff = dataset_json_difference(s["dataset_json"], ref["dataset_json"])
        if diff is not None:
            raise FederationSetupError(f"site {name}: {diff[0]} differ from site {ref_name}: {diff[1]}. All sites "
                                       f"must use the same {diff[0]}.")
        if int(s["num_axes"]) != int(ref["num_axes"]):
            raise FederationSetupError(f"site {name}: images have {s['num_axes']} axes, site {ref_name} "
                                       f"{ref['num_axes']} (2D and 3D sites cannot be planned together)")
        if set(s["foreground_intensities"]) != set(ref["foreground_intensities"]):
            raise FederationSetupError(f"site {name}: intensity statistics for channels "
                                       f"{sorted(s['foreground_intensities'])}, site {ref_name} for "
                                       f"{sorted(ref['foreground_intensities'])}")


def default_federation_name(site_names: list[str]) -> str:
    """``DatasetFed_<id>_<id>...`` (what ``nnunet_fed simulate`` calls the federation by default)."""
    ids = []
    for n in site_names:
        m = re.match(r"Dataset(\d+)_", n)
        ids.append(f"{int(m.group(1)):03d}" if m else re.sub(r"\W", "", n))
    return "DatasetFed_" + "_".join(ids)


def _merge_sketches(sketch_jsons: list[dict], where: str) -> LogSketch:
    try:
        return LogSketch.merge_all(LogSketch.from_json(j) for j in sketch_jsons)
    except ValueError as e:
        raise FederationSetupError(f"cannot merge the sites' {where} histograms: {e}") from None


def _intensity_properties(per_site: list[tuple[str, dict]], channel: str) -> dict:
    sketch = _merge_sketches([d["sketch"] for _, d in per_site], f"channel {channel} intensity")
    n = s1 = s2 = 0.0
    for site, d in per_site:
        if d.get("sum_of_case_means") is not None and d.get("num_cases_with_foreground") is not None:
            n += float(d["num_cases_with_foreground"])
            s1 += float(d["sum_of_case_means"])
            s2 += float(d["sum_of_case_mean_squares"])
        else:  # DP summary: moments of its (noisy) sketch
            t, m1, m2 = LogSketch.from_json(d["sketch"]).moments()
            n, s1, s2 = n + t, s1 + m1, s2 + m2
    if n <= 0 or sketch.total <= 0:
        raise FederationSetupError(
            f"channel {channel}: no foreground intensity in any site summary (no labelled foreground, or DP noise "
            f"with a small epsilon removed everything: use a larger --dp-epsilon)")
    mean = s1 / n
    std = math.sqrt(max(s2 / n - mean * mean, 0.0))
    return {
        "mean": float(mean),
        "median": float(sketch.quantile(0.5)),
        "std": float(std),
        "min": float(sketch.min()),
        "max": float(sketch.max()),
        "percentile_99_5": float(sketch.quantile(0.995)),
        "percentile_00_5": float(sketch.quantile(0.005)),
    }


def merge_summaries(summaries: list[dict], federation_name: str | None = None) -> dict:
    """One nnU-Net-style fingerprint from the sites' summaries (validated first)."""
    validate_summaries(summaries)
    names = [_site(s, k) for k, s in enumerate(summaries)]
    ref = summaries[0]
    num_axes = int(ref["num_axes"])

    raw_total = sum(float(s["num_cases"]) for s in summaries)
    num_cases = max(1, int(round(raw_total)))

    geometry = {}
    for kind in GEOMETRY_KINDS:
        geometry[kind] = []
        for a in range(num_axes):
            sk = _merge_sketches([s["geometry"][kind][a] for s in summaries], f"{kind} (axis {a})")
            if sk.total <= 0:
                raise FederationSetupError(f"merged {kind} histogram of axis {a} is empty (DP noise with a small "
                                           f"epsilon? use a larger --dp-epsilon)")
            geometry[kind].append(sk)
    rel = _merge_sketches([s["geometry"]["relative_size_after_cropping"] for s in summaries],
                          "relative size after cropping")
    if rel.total <= 0:
        raise FederationSetupError("merged relative-size histogram is empty (use a larger --dp-epsilon)")

    intensity = {}
    for ch in sorted(ref["foreground_intensities"], key=int):
        intensity[ch] = _intensity_properties([(n, s["foreground_intensities"][ch]) for n, s in zip(names, summaries)],
                                              ch)

    readers = [s.get("image_reader_writer") for s in summaries]
    order_median = lambda sk: np.median(sk.order_statistics(num_cases), 0)  # noqa: E731 (np.median of a list)
    return {
        "foreground_intensity_properties_per_channel": intensity,
        "median_relative_size_after_cropping": float(order_median(rel)),
        "federation": {
            "format": MERGED_FORMAT,
            "federation_name": federation_name or default_federation_name(names),
            "sites": [{"dataset_name": n, "num_cases": s["num_cases"], "dp": s.get("dp")}
                      for n, s in zip(names, summaries)],
            "num_cases": num_cases,
            "num_axes": num_axes,
            "dataset_json": {k: ref["dataset_json"].get(k) for k in SHARED_DATASET_KEYS},
            "image_reader_writer": max([r for r in readers if r], key=readers.count) if any(readers) else None,
            "geometry": {kind: [sk.to_json() for sk in geometry[kind]] for kind in GEOMETRY_KINDS},
            "median_spacing": [float(order_median(sk)) for sk in geometry["spacing"]],
            "median_shape_after_crop": [float(order_median(sk)) for sk in geometry["shape_after_crop"]],
        },
    }

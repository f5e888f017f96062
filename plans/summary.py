"""Site side of federated planning: nnU-Net's fingerprint, kept at the site, and a shareable summary.

``summarize_site`` runs nnU-Net's own :class:`DatasetFingerprintExtractor` on the site (its
``dataset_fingerprint.json``, which lists every case's spacing and shape, stays in the site's
``nnUNet_preprocessed/<name>/``; nnU-Net's trainer copies it into the results folder) and then builds a
summary that holds aggregates only and merges across sites (:mod:`nnunet_fed.plans.merge`).

What nnU-Net's planner needs from a (pooled) fingerprint, and how the summary keeps it mergeable:

* per-axis percentiles over cases of the spacing, of the shape after cropping to the non-zero region and of the
  shape after resampling to the target spacing (median, and the 10th spacing percentile for anisotropic data).
  Resampled shape = ``round(spacing * shape / target)``: per case this is ``round(extent / target)`` with
  ``extent = spacing * shape`` the physical size in mm, which does not depend on the (not yet known) target.
  The summary keeps one count histogram per axis of spacing, shape and extent, on fixed log grids
  (:class:`~nnunet_fed.plans.sketch.LogSketch`, relative resolution 1e-4): counts of cases per bucket, no list.
  Only per-axis marginals are needed, because nnU-Net takes every percentile axis by axis.
* the median over cases of the relative size after cropping: a count histogram of the same kind.
* foreground intensity properties per channel (mean, std, min, max, median, 0.5 and 99.5 percentiles).
  nnU-Net samples the same number of foreground voxels from every case (with replacement), so in its pooled
  fingerprint **every case weighs the same**, whatever its foreground size. The summary reproduces exactly
  that distribution: every case adds its foreground voxels with weight ``1 / n_foreground`` to a log-bucketed
  intensity sketch (relative resolution 0.1 %, merges across sites with any intensity range), and to exact
  sums of per-case means and per-case mean squares (mean and std of the pooled distribution).

Summary keys (JSON, never pickle)::

    format, version, dataset_name, num_cases, num_axes, image_reader_writer,
    dataset_json: {channel_names, labels, file_ending, regions_class_order}   # what every site must share
    geometry: {spacing: [sketch per axis], shape_after_crop: [...], extent_after_crop_mm: [...],
               relative_size_after_cropping: sketch}
    foreground_intensities: {"<channel>": {num_cases_with_foreground, sum_of_case_means,
                                            sum_of_case_mean_squares, sketch}}
    dp: null | {epsilon, mechanism, sensitivity, ...}
    software: {nnunetv2, nnunet_fed}

Differential privacy (``dp_epsilon``): neighbouring datasets differ by one training case (added or removed).
One case adds 1 to ``num_cases``, 1 count to each geometry histogram (``3 * num_axes + 1`` of them) and a
total weight of at most 1 to each channel's intensity sketch, so the released vector of counts has L1
sensitivity ``1 + 3 * num_axes + 1 + num_channels`` provided that every value lies in the histogram's fixed
domain: values are clamped to public bounds (``DP_BOUNDS``; intensities to ``|x| <= DP_INTENSITY_BOUND``).
Laplace noise with scale ``sensitivity / epsilon`` is added to ``num_cases`` and to *every* bucket of each
histogram's fixed domain (at a coarser DP resolution), which gives epsilon-DP for the whole summary; negative
counts are then set to 0 and counts below ``scale * ln(20 * number of buckets)`` dropped (post-processing, which
keeps the guarantee). The exact intensity sums are not released under DP (mean and std then come from the
noisy sketch). With few cases per site only a large epsilon leaves usable statistics.
"""
from __future__ import annotations

import contextlib
import io
import math
import multiprocessing
import os
from typing import Sequence

import numpy as np

from nnunet_fed.plans.sketch import LogSketch
from nnunet_fed.sites import FederationSetupError, dataset_name, read_json, require_nnunet_paths, write_json_atomic

SUMMARY_FORMAT = "nnunet_fed.site_summary"
SUMMARY_VERSION = 1
SHARED_DATASET_KEYS = ("channel_names", "labels", "file_ending", "regions_class_order")
GEOMETRY_KINDS = ("spacing", "shape_after_crop", "extent_after_crop_mm")

# fixed grids, identical at every site (they are what makes summaries mergeable)
GEOMETRY_WIDTH = 2e-4          # relative resolution ~1e-4: shapes up to ~5000 voxels are recovered exactly
GEOMETRY_ZERO = 1e-12
INTENSITY_WIDTH = 2e-3         # relative resolution ~1e-3 for every intensity quantile
INTENSITY_ZERO = 1e-6          # |intensity| below this counts as 0
# differential privacy: coarser grids (odd multiples of the above, so that summaries with and without DP merge)
DP_GEOMETRY_WIDTH = GEOMETRY_WIDTH * 51
DP_INTENSITY_WIDTH = INTENSITY_WIDTH * 15
DP_BOUNDS = {"spacing": (1e-3, 1e5), "shape_after_crop": (1.0, 1e5), "extent_after_crop_mm": (1e-3, 1e8),
             "relative_size_after_cropping": (1e-4, 1.0)}
DP_INTENSITY_BOUND = 1e6

DEFAULT_SUMMARY_FILENAME = "nnUNetFed_site_summary.json"


# ------------------------------------------------------------------------------------------ per case (local)
def _analyze_case(image_files: Sequence[str], label_file: str, reader_writer_name: str) -> dict:
    """Everything the summary needs from one case. Runs at the site; the result never leaves it as such."""
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    rw = recursive_find_reader_writer_by_name(reader_writer_name)()
    images, props = rw.read_images(image_files)
    seg, _ = rw.read_seg(label_file)
    # what nnU-Net's fingerprint extractor does (DatasetFingerprintExtractor.analyze_case)
    data, seg_cropped, _ = crop_to_nonzero(images, seg)
    shape_before = images.shape[1:]
    shape_after = data.shape[1:]
    fg = seg_cropped[0] > 0
    channels = []
    for c in range(len(data)):
        x = data[c][fg].astype(np.float64)
        if x.size == 0:
            channels.append(None)
            continue
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{image_files[c]}: non-finite foreground intensities")
        sk = LogSketch(INTENSITY_WIDTH, INTENSITY_ZERO).add(x, 1.0 / x.size)  # every case weighs 1 (as in nnU-Net)
        channels.append({"mean": float(x.mean()), "mean_sq": float(np.mean(x * x)), "sketch": sk})
    return {"spacing": [float(s) for s in props["spacing"]],
            "shape_after_crop": [int(s) for s in shape_after],
            "relative_size_after_cropping": float(np.prod(shape_after, dtype=np.float64) /
                                                  np.prod(shape_before, dtype=np.float64)),
            "foreground_voxels": int(fg.sum()),
            "channels": channels}


PARALLEL_MIN_BYTES = 64 * 2 ** 20  # below this, worker start-up (spawn + imports) costs more than it saves


def _analyze_cases(dataset: dict, reader_writer_name: str, num_processes: int) -> list[dict]:
    jobs = [(dataset[k]["images"], dataset[k]["label"], reader_writer_name) for k in dataset]
    total_bytes = sum(os.path.getsize(f) for j in jobs for f in j[0] if os.path.isfile(f))
    if num_processes <= 1 or len(jobs) <= 1 or total_bytes < PARALLEL_MIN_BYTES:
        return [_analyze_case(*j) for j in jobs]
    with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
        return pool.starmap(_analyze_case, jobs)


# --------------------------------------------------------------------------------------------- aggregation
def aggregate_cases(cases: list[dict], num_channels: int) -> dict:
    num_axes = len(cases[0]["spacing"])
    for c in cases:
        if len(c["spacing"]) != num_axes or len(c["shape_after_crop"]) != num_axes:
            raise FederationSetupError("cases with different numbers of axes in one dataset")
    geometry = {k: [LogSketch(GEOMETRY_WIDTH, GEOMETRY_ZERO) for _ in range(num_axes)] for k in GEOMETRY_KINDS}
    rel = LogSketch(GEOMETRY_WIDTH, GEOMETRY_ZERO)
    for c in cases:
        for a in range(num_axes):
            sp, sh = c["spacing"][a], c["shape_after_crop"][a]
            geometry["spacing"][a].add([sp])
            geometry["shape_after_crop"][a].add([sh])
            geometry["extent_after_crop_mm"][a].add([sp * sh])
        rel.add([c["relative_size_after_cropping"]])
    intensities = {}
    for ch in range(num_channels):
        per_case = [c["channels"][ch] for c in cases if c["channels"][ch] is not None]
        sketch = LogSketch.merge_all([p["sketch"] for p in per_case]) if per_case else \
            LogSketch(INTENSITY_WIDTH, INTENSITY_ZERO)
        intensities[str(ch)] = {"num_cases_with_foreground": len(per_case),
                                "sum_of_case_means": float(math.fsum(p["mean"] for p in per_case)),
                                "sum_of_case_mean_squares": float(math.fsum(p["mean_sq"] for p in per_case)),
                                "sketch": sketch}
    return {"num_cases": len(cases), "num_axes": num_axes, "geometry": geometry, "relative_size": rel,
            "intensities": intensities}


def dp_sensitivity(num_axes: int, num_channels: int) -> int:
    """L1 sensitivity of the released counts when one training case is added or removed."""
    return 1 + len(GEOMETRY_KINDS) * num_axes + 1 + num_channels


def _apply_dp(agg: dict, epsilon: float, rng: np.random.Generator) -> dict:
    num_axes = agg["num_axes"]
    num_channels = len(agg["intensities"])
    sensitivity = dp_sensitivity(num_axes, num_channels)
    scale = sensitivity / float(epsilon)
    thresholds = {}

    def geo(sketch: LogSketch, kind: str) -> LogSketch:
        lo, hi = DP_BOUNDS[kind]
        s = sketch.coarsened(DP_GEOMETRY_WIDTH).clamp_indices(hi, lo)
        noised, n_buckets, thr = s.laplace_noised(scale, hi, rng, min_magnitude=lo, signed=False)
        thresholds[kind] = {"buckets": n_buckets, "threshold": thr}
        return noised

    agg["num_cases"] = float(agg["num_cases"] + rng.laplace(0.0, scale))
    for kind in GEOMETRY_KINDS:
        agg["geometry"][kind] = [geo(s, kind) for s in agg["geometry"][kind]]
    agg["relative_size"] = geo(agg["relative_size"], "relative_size_after_cropping")
    for ch, d in agg["intensities"].items():
        s = d["sketch"].coarsened(DP_INTENSITY_WIDTH).clamp_indices(DP_INTENSITY_BOUND)
        noised, n_buckets, thr = s.laplace_noised(scale, DP_INTENSITY_BOUND, rng, signed=True)
        thresholds["foreground_intensity"] = {"buckets": n_buckets, "threshold": thr}
        agg["intensities"][ch] = {"num_cases_with_foreground": None, "sum_of_case_means": None,
                                  "sum_of_case_mean_squares": None, "sketch": noised}
    return {
        "epsilon": float(epsilon),
        "mechanism": "laplace",
        "sensitivity": sensitivity,
        "sensitivity_norm": "L1",
        "neighbouring": "datasets differing by one training case (added or removed)",
        "sensitivity_per_case": {"num_cases": 1, "geometry_histograms": f"1 count in each of "
                                 f"{len(GEOMETRY_KINDS) * num_axes + 1} histograms",
                                 "intensity_sketches": f"total weight <= 1 in each of {num_channels}"},
        "noise_scale": scale,
        "clamping": {**{k: list(v) for k, v in DP_BOUNDS.items()},
                     "foreground_intensity_abs_max": DP_INTENSITY_BOUND},
        "bucket_width": {"geometry": DP_GEOMETRY_WIDTH, "foreground_intensity": DP_INTENSITY_WIDTH},
        "post_processing": "negative counts set to 0; counts below the threshold dropped",
        "thresholds": thresholds,
        "not_released": ["exact sums of per-case intensity means (mean/std come from the noisy sketch)"],
    }


def _shared_dataset_json(dj: dict) -> dict:
    return {k: dj.get(k) for k in SHARED_DATASET_KEYS}


def _software_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("nnunetv2", "nnunet_fed"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


# ------------------------------------------------------------------------------------------------ public API
def summarize_site(dataset_id_or_name, output_file: str | None = None, num_processes: int = 2,
                   dp_epsilon: float | None = None, seed: int | None = None, reuse_fingerprint: bool = False,
                   verbose: bool = False, site_data=None) -> dict:
    """Verify the site's cases, fingerprint it with nnU-Net (kept local) and return (and write to ``output_file``)
    its summary.

    The site's cases are verified first (``nnunet_fed.site_data.verify_raw_site``: nnU-Net's dataset verification,
    every label value declared, image and label of the same size, ...): a bad case raises ``FederationSetupError``
    naming the site, the case and the value before anything is written. ``site_data`` (the result of that check)
    skips it when the caller has just run it. A site without any foreground voxel (e.g. healthy controls) is
    summarised with no foreground intensities (``num_cases_with_foreground`` 0); its nnU-Net fingerprint is written
    by ``nnunet_fingerprint``.

    ``seed`` seeds the DP noise (tests only: real noise must not be predictable; by default it comes from OS
    entropy, ``nnunet_fed.privacy.randomness``). ``reuse_fingerprint`` keeps
    an existing local ``dataset_fingerprint.json`` instead of re-extracting it (nnU-Net re-extracts by default).
    """
    from nnunet_fed.site_data import verify_raw_site

    require_nnunet_paths(("nnUNet_raw", "nnUNet_preprocessed"))
    if dp_epsilon is not None and not (float(dp_epsilon) > 0 and math.isfinite(float(dp_epsilon))):
        raise FederationSetupError(f"--dp-epsilon must be a positive number, got {dp_epsilon!r}")
    name = dataset_name(dataset_id_or_name)
    if site_data is None:
        site_data = verify_raw_site(name, num_processes=int(num_processes))  # before anything is written
    dj, dataset, rw = site_data.dataset_json, site_data.cases, site_data.reader_writer

    cases = _analyze_cases(dataset, rw.__name__, int(num_processes))
    fingerprint = nnunet_fingerprint(name, num_processes, overwrite=not reuse_fingerprint, verbose=verbose,
                                     foreground_voxels=sum(c["foreground_voxels"] for c in cases))
    if len(fingerprint.get("spacings", [])) != len(cases):
        raise FederationSetupError(
            f"site {name}: its dataset_fingerprint.json has {len(fingerprint.get('spacings', []))} cases but "
            f"imagesTr has {len(cases)}; extract the fingerprint again (without reuse)")
    agg = aggregate_cases(cases, len(dj["channel_names"]))
    del cases  # per-case values end here

    summary = build_summary(name, dj, rw.__name__, agg, dp_epsilon, seed)
    if output_file is not None:
        write_summary(summary, output_file)
    return summary


NNUNET_INTENSITY_KEYS = ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")


FINGERPRINT_OVERSAMPLING = 10  # foreground samples per foreground voxel, at most (see nnunet_fingerprint)


def nnunet_fingerprint(name: str, num_processes: int = 2, overwrite: bool = True, verbose: bool = False,
                       foreground_voxels: int | None = None) -> dict:
    """nnU-Net's ``dataset_fingerprint.json`` of the site, written to ``nnUNet_preprocessed/<name>/`` (it stays at
    the site; nnU-Net's trainer copies it into its results folder). Returns the fingerprint dict.

    nnU-Net's ``DatasetFingerprintExtractor.run`` takes percentiles of the site's pooled foreground samples, which
    fails (``IndexError: index -1 is out of bounds``) when no case has a foreground voxel. For such a site
    (``foreground_voxels`` 0; ``None``: the label files are read to find out) the fingerprint is made from
    nnU-Net's own per-case ``analyze_case`` (spacing, shape after cropping, relative size), with ``null``
    intensity properties: there is no foreground to describe, and federated plans take them from the other
    sites. With ``overwrite`` False an existing fingerprint is returned as it is.

    nnU-Net draws 1e8 foreground samples in total (with replacement, spread evenly over the cases) whatever the
    dataset's size, and takes percentiles of them: 24 s for a site of four 32x32 RGB images on two CPU cores
    (another job running). Given the site's number of foreground voxels (``foreground_voxels``, shared by all
    channels), it draws at most ``FINGERPRINT_OVERSAMPLING`` (10) samples per foreground voxel instead: the same
    estimate of the same empirical distribution, with sampling noise (that site: 3.1 s, means within 0.2 %,
    percentiles within one grey level); sites with more than 1e7 foreground voxels are fingerprinted exactly as
    nnU-Net does. (The intensity properties of this local fingerprint do not enter federated plans, which take
    them from the sites' summaries.)"""
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    out = os.path.join(os.environ["nnUNet_preprocessed"], name, "dataset_fingerprint.json")
    if not overwrite and os.path.isfile(out):
        return load_json(out)
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if not verbose else contextlib.nullcontext():
        fpe = DatasetFingerprintExtractor(name, num_processes=max(1, int(num_processes)), verbose=verbose)
        fpe.show_progress_bar = verbose
        if foreground_voxels:
            fpe.num_foreground_voxels_for_intensitystats = min(
                fpe.num_foreground_voxels_for_intensitystats, FINGERPRINT_OVERSAMPLING * int(foreground_voxels))
        first_image = fpe.dataset[next(iter(fpe.dataset))]["images"][0]
        rw = determine_reader_writer_from_dataset_json(fpe.dataset_json, first_image, verbose=False)
        if foreground_voxels is None:
            has_foreground = any(np.any(rw().read_seg(v["label"])[0] > 0) for v in fpe.dataset.values())
        else:
            has_foreground = foreground_voxels > 0
        if has_foreground:
            return fpe.run(overwrite_existing=True)
        results = [DatasetFingerprintExtractor.analyze_case(v["images"], v["label"], rw, 0)
                   for v in fpe.dataset.values()]
    fingerprint = {
        "spacings": [[float(x) for x in r[1]] for r in results],
        "shapes_after_crop": [[int(x) for x in r[0]] for r in results],
        "foreground_intensity_properties_per_channel": {
            str(c): {k: None for k in NNUNET_INTENSITY_KEYS} for c in range(len(fpe.dataset_json["channel_names"]))},
        "median_relative_size_after_cropping": float(np.median([r[4] for r in results])),
        "nnunet_fed": "no foreground voxel in any case: no foreground intensity properties",
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_json(fingerprint, out, sort_keys=False)
    return fingerprint


def build_summary(name: str, dataset_json: dict, reader_writer_name: str, agg: dict,
                  dp_epsilon: float | None = None, seed: int | None = None) -> dict:
    """The shareable summary from the site's aggregates (:func:`aggregate_cases`), with DP noise if ``dp_epsilon``."""
    dp = None
    if dp_epsilon is not None:
        from nnunet_fed.privacy import randomness

        rng = randomness.numpy_generator() if seed is None else np.random.default_rng(seed)
        dp = _apply_dp(agg, float(dp_epsilon), rng)
    return {
        "format": SUMMARY_FORMAT,
        "version": SUMMARY_VERSION,
        "dataset_name": name,
        "num_cases": agg["num_cases"],
        "num_axes": agg["num_axes"],
        "image_reader_writer": reader_writer_name,
        "dataset_json": _shared_dataset_json(dataset_json),
        "geometry": {
            **{k: [s.to_json() for s in agg["geometry"][k]] for k in GEOMETRY_KINDS},
            "relative_size_after_cropping": agg["relative_size"].to_json(),
        },
        "foreground_intensities": {ch: {**{k: v for k, v in d.items() if k != "sketch"},
                                        "sketch": d["sketch"].to_json()}
                                   for ch, d in agg["intensities"].items()},
        "dp": dp,
        "software": _software_versions(),
    }


def write_summary(summary: dict, output_file: str) -> str:
    return write_json_atomic(summary, output_file, indent=1, allow_nan=False)


def load_summary(path: str) -> dict:
    s = read_json(path, f"site summary {path}")
    if not isinstance(s, dict) or s.get("format") != SUMMARY_FORMAT:
        raise FederationSetupError(f"{path} is not an nnunet_fed site summary (made by 'nnunet_fed site "
                                   f"fingerprint')")
    return s

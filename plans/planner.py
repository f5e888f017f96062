"""nnU-Net's experiment planner, run on a merged federated fingerprint (no site image needed).

:class:`FederatedExperimentPlanner` subclasses nnU-Net's :class:`ExperimentPlanner` and changes only where the
data come from:

* ``__init__``: nnU-Net's planner reads ``nnUNet_raw/<name>/dataset.json`` and
  ``nnUNet_preprocessed/<name>/dataset_fingerprint.json``. The federated planner writes a private, temporary
  planning workspace that holds just those two files (the shared dataset.json facts with ``numTraining`` = the
  federation's number of cases, and the merged fingerprint) and points nnU-Net's path variables at it while
  nnU-Net's own code runs (``nnunetv2.paths`` reads ``os.environ`` lazily). No image is read.
* ``determine_reader_writer``: the reader/writer the sites reported (nnU-Net would open an example image).
* ``determine_fullres_target_spacing``: nnU-Net's method, fed with the merged per-axis order statistics.
* ``save_plans``: nnU-Net's, plus the reference median shape and a ``federation`` block (site list, shared
  dataset.json facts, DP records) that ``preprocess_site`` validates the sites against.

Why a short list of representative "cases" is still built: nnU-Net's ``plan_experiment`` computes the median
shape after resampling, the median spacing and the median shape *inline* from ``fingerprint['spacings']`` and
``fingerprint['shapes_after_crop']`` (it does not go through an overridable method), so the only way to feed
it merged aggregates without copying ``plan_experiment`` is to give it lists whose per-axis percentiles are the
merged ones. The planner builds, from the merged per-axis histograms, ``N`` (the federation's number of cases)
order statistics per axis: ``spacings[k]`` = the k-th smallest spacing, ``shapes_after_crop[k]`` =
``extent[k] / spacing[k]`` where ``extent[k]`` is the k-th smallest physical size. nnU-Net's
``compute_new_shape`` then yields ``round(extent[k] / target)``, whose per-axis median is the pooled median of
the resampled shapes (rounding is monotone), and every percentile nnU-Net takes of the spacings is the pooled
one. These pseudo-cases are no site's cases (axes are sorted independently); they exist only in the planner's
memory and in the throw-away workspace. The true median shape after cropping is written to the plans by
``save_plans``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from typing import Sequence

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunet_fed.plans.merge import MERGED_FORMAT, merge_summaries
from nnunet_fed.plans.sketch import LogSketch
from nnunet_fed.plans.summary import load_summary
from nnunet_fed.sites import FederationSetupError, write_json_atomic

FED_PLANS_IDENTIFIER = "nnUNetFedPlans"
PLANS_FEDERATION_FORMAT = "nnunet_fed.federated_plans"


@contextlib.contextmanager
def _environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class FederatedPlannerMixin:
    """Put in front of an nnU-Net experiment planner class to plan it from a merged fingerprint."""

    def __init__(self, merged_fingerprint: dict, gpu_memory_target_in_gb: float | None = None,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str | None = None,
                 overwrite_target_spacing: Sequence[float] | None = None, suppress_transpose: bool = False):
        fed = merged_fingerprint.get("federation") if isinstance(merged_fingerprint, dict) else None
        if not fed or fed.get("format") != MERGED_FORMAT:
            raise FederationSetupError("not a merged federated fingerprint (use nnunet_fed.plans.merge_summaries)")
        name = fed["federation_name"]
        if not name.startswith("Dataset"):
            raise FederationSetupError(f"federation name {name!r} must start with 'Dataset'")
        self.merged_fingerprint = merged_fingerprint
        self.federation = fed

        # the two files nnU-Net's planner reads, in a private workspace
        self._workspace = tempfile.TemporaryDirectory(prefix="nnunet_fed_planning_")
        root = self._workspace.name
        self._paths = {"nnUNet_raw": os.path.join(root, "nnUNet_raw"),
                       "nnUNet_preprocessed": os.path.join(root, "nnUNet_preprocessed")}
        dataset_json = {k: v for k, v in fed["dataset_json"].items() if v is not None}
        dataset_json.update({"name": name, "numTraining": int(fed["num_cases"]), "dataset": {}})
        if fed.get("image_reader_writer"):
            dataset_json["overwrite_image_reader_writer"] = fed["image_reader_writer"]
        for var, fname, content in (("nnUNet_raw", "dataset.json", dataset_json),
                                    ("nnUNet_preprocessed", "dataset_fingerprint.json", merged_fingerprint)):
            os.makedirs(os.path.join(self._paths[var], name), exist_ok=True)
            with open(os.path.join(self._paths[var], name, fname), "w") as f:
                json.dump(content, f)

        kwargs = {} if gpu_memory_target_in_gb is None else {"gpu_memory_target_in_gb": gpu_memory_target_in_gb}
        with self._nnunet_paths():  # (the nnU-Net planner's own default GPU memory target unless one is given)
            super().__init__(name, preprocessor_name=preprocessor_name,
                             plans_name=plans_name or federated_plans_name(type(self)),
                             overwrite_target_spacing=overwrite_target_spacing,
                             suppress_transpose=suppress_transpose, **kwargs)

        # per-axis order statistics of the merged histograms (see the module docstring)
        n = int(fed["num_cases"])
        geo = fed["geometry"]
        stats = {kind: np.stack([LogSketch.from_json(j).order_statistics(n) for j in geo[kind]], axis=1)
                 for kind in ("spacing", "shape_after_crop", "extent_after_crop_mm")}
        self.spacing_order_statistics = stats["spacing"]
        self.shape_order_statistics = np.rint(stats["shape_after_crop"])
        self.extent_order_statistics = stats["extent_after_crop_mm"]
        fingerprint = {k: v for k, v in merged_fingerprint.items() if k != "federation"}
        fingerprint["spacings"] = self.spacing_order_statistics.tolist()
        # chosen so that nnU-Net's compute_new_shape(shape, spacing, target) = round(extent / target)
        fingerprint["shapes_after_crop"] = (self.extent_order_statistics / self.spacing_order_statistics).tolist()
        self.dataset_fingerprint = fingerprint

    def _nnunet_paths(self):
        return _environ(**self._paths)

    def cleanup(self) -> None:
        self._workspace.cleanup()

    # ------------------------------------------------------------------------------------ nnU-Net overrides
    def determine_reader_writer(self):
        from nnunetv2.imageio.reader_writer_registry import (determine_reader_writer_from_file_ending,
                                                             recursive_find_reader_writer_by_name)

        rw = self.federation.get("image_reader_writer")
        if rw:
            return recursive_find_reader_writer_by_name(rw)
        return determine_reader_writer_from_file_ending(self.dataset_json["file_ending"], None, verbose=False)

    def determine_fullres_target_spacing(self) -> np.ndarray:
        # nnU-Net's rule (median spacing; 10th percentile along an anisotropic axis), with the true shape
        # order statistics for its anisotropy check
        fp = self.dataset_fingerprint
        self.dataset_fingerprint = {**fp, "shapes_after_crop": self.shape_order_statistics.tolist()}
        try:
            return super().determine_fullres_target_spacing()
        finally:
            self.dataset_fingerprint = fp

    def plan_experiment(self):
        # nnU-Net's VRAM estimate sets torch's thread count from nnUNet_n_proc_DA, which may be 0 (augmentation in
        # the main process): the planner's threads must not depend on that setting
        threads = str(max(1, int(os.environ.get("nnUNet_n_proc_DA") or 1)))
        with self._nnunet_paths(), _environ(nnUNet_n_proc_DA=threads):
            return super().plan_experiment()

    def save_plans(self, plans):
        tf = list(plans["transpose_forward"])
        plans["original_median_shape_after_transp"] = [
            int(round(i)) for i in np.median(self.shape_order_statistics, 0)[tf]]
        fed = self.federation
        plans["federation"] = {
            "format": PLANS_FEDERATION_FORMAT,
            "federation_name": fed["federation_name"],
            "sites": [{"dataset_name": s["dataset_name"], "num_cases": s["num_cases"],
                       "dp_epsilon": (s.get("dp") or {}).get("epsilon")} for s in fed["sites"]],
            "num_cases": fed["num_cases"],
            "dataset_json": fed["dataset_json"],
            "image_reader_writer": fed.get("image_reader_writer"),
        }
        with self._nnunet_paths():
            super().save_plans(plans)


class FederatedExperimentPlanner(FederatedPlannerMixin, ExperimentPlanner):
    """nnU-Net's default ``ExperimentPlanner`` (plans identifier ``nnUNetFedPlans``) on a merged fingerprint."""


DEFAULT_PLANNER = "ExperimentPlanner"


def federated_plans_name(planner_class: type) -> str:
    """The plans identifier of federated plans made with an nnU-Net planner: its own default plans name with
    ``Fed`` after ``nnUNet`` (``nnUNetPlans`` -> ``nnUNetFedPlans``, ``nnUNetResEncUNetMPlans`` ->
    ``nnUNetFedResEncUNetMPlans``), so that federated plans never overwrite a site's own nnU-Net plans."""
    import inspect

    base = next(c for c in planner_class.__mro__ if not issubclass(c, FederatedPlannerMixin))
    default = inspect.signature(base.__init__).parameters["plans_name"].default
    if not isinstance(default, str) or not default:
        default = "nnUNetPlans"
    return "nnUNetFed" + default[len("nnUNet"):] if default.startswith("nnUNet") else "Fed" + default


def federated_planner(name: str = DEFAULT_PLANNER) -> type:
    """The federated version of nnU-Net's experiment planner ``name`` (what ``nnUNetv2_plan_and_preprocess -pl``
    takes: ``ExperimentPlanner``, ``nnUNetPlannerResEncM``/``L``/``XL``, or a planner class of your own in
    nnunetv2.experiment_planning): ``FederatedPlannerMixin`` in front of it. Raises ``FederationSetupError`` for a
    name nnU-Net does not know."""
    if name in (None, "", DEFAULT_PLANNER):
        return FederatedExperimentPlanner
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    with contextlib.redirect_stdout(io.StringIO()):
        cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), name,
                                          current_module="nnunetv2.experiment_planning")
    if cls is None or not (isinstance(cls, type) and issubclass(cls, ExperimentPlanner)):
        raise FederationSetupError(f"-pl {name}: no such nnU-Net experiment planner in nnunetv2.experiment_planning "
                                   f"(e.g. ExperimentPlanner, nnUNetPlannerResEncM, nnUNetPlannerResEncL, "
                                   f"nnUNetPlannerResEncXL)")
    return type(f"Federated{name}", (FederatedPlannerMixin, cls), {"__module__": __name__})


def plan_federation(summary_files: Sequence[str], output_plans_file: str,
                    gpu_memory_target_in_gb: float | None = None, federation_name: str | None = None,
                    planner_class: type | str = FederatedExperimentPlanner, quiet: bool = True) -> dict:
    """Merge the sites' summaries, plan with nnU-Net's planner and write one plans JSON (returned).

    ``planner_class``: a federated planner class, or the name of an nnU-Net planner (``federated_planner(name)``).
    Everything is validated (planner, summaries readable, same channel names / labels / file ending) before the
    plans file is written.
    """
    if isinstance(planner_class, str):
        planner_class = federated_planner(planner_class)
    if not summary_files:
        raise FederationSetupError("no site summary given (--fingerprints)")
    summaries = [load_summary(f) for f in summary_files]
    merged = merge_summaries(summaries, federation_name=federation_name)
    kwargs = {} if gpu_memory_target_in_gb is None else {"gpu_memory_target_in_gb": gpu_memory_target_in_gb}
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        planner = planner_class(merged, **kwargs)
        try:
            planner.plan_experiment()
            plans = json.loads(json.dumps(planner.plans))  # plain JSON types (lists, not tuples)
        finally:
            planner.cleanup()
    write_json_atomic(plans, output_plans_file, indent=4, sort_keys=False)
    return plans

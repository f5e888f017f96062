"""Federated planning (nnunet_fed.plans): site summaries, merged nnU-Net plans, site preprocessing.

Data: ``make_federated_datasets`` 2D ``shift`` scenario, 3 sites x 12 cases of 64x64 with strong site
heterogeneity (intensity scale 400..2500, offsets, noise, bias, spacing 0.7..1.35 mm, object size).
The reference ("pooled") is nnU-Net's own fingerprint extractor and ExperimentPlanner run on one dataset that
holds all sites' training cases.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import math
import os
import shutil

import numpy as np
import pytest

NUM_SITES = 3
NUM_TRAIN = 12
IMAGE_SIZE = (64, 64)
REL_TOL = 0.01  # the acceptance bound for intensity statistics
INTENSITY_KEYS = ("percentile_00_5", "median", "percentile_99_5", "mean")
SITE_FINGERPRINT_VOXELS = 1e6


# ------------------------------------------------------------------------------------------------- helpers
def _set_nnunet_env(mp: pytest.MonkeyPatch, root) -> dict:
    paths = {}
    for var, sub in (("nnUNet_raw", "nnUNet_raw"), ("nnUNet_preprocessed", "nnUNet_preprocessed"),
                     ("nnUNet_results", "nnUNet_results")):
        p = os.path.join(str(root), sub)
        os.makedirs(p, exist_ok=True)
        mp.setenv(var, p)
        paths[var] = p
    return paths


def _cli(argv: list[str]) -> int:
    """A local harness for the planning sub-commands (the main CLI wires the same function)."""
    from nnunet_fed.plans.cli import add_planning_commands

    parser = argparse.ArgumentParser(prog="nnunet_fed")
    sub = parser.add_subparsers(dest="command", required=True)
    add_planning_commands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def _make_pooled_dataset(raw: str, site_names: list[str], pooled_id: int) -> str:
    """One nnU-Net dataset with every site's training cases (files copied, identifiers made unique)."""
    name = f"Dataset{pooled_id:03d}_PooledSites"
    folder = os.path.join(raw, name)
    os.makedirs(os.path.join(folder, "imagesTr"))
    os.makedirs(os.path.join(folder, "labelsTr"))
    n = 0
    for k, site in enumerate(site_names):
        for img in sorted(glob.glob(os.path.join(raw, site, "imagesTr", "*_0000.nii.gz"))):
            ident = os.path.basename(img)[:-len("_0000.nii.gz")]
            shutil.copyfile(img, os.path.join(folder, "imagesTr", f"site{k}_{ident}_0000.nii.gz"))
            shutil.copyfile(os.path.join(raw, site, "labelsTr", ident + ".nii.gz"),
                            os.path.join(folder, "labelsTr", f"site{k}_{ident}.nii.gz"))
            n += 1
    with open(os.path.join(raw, site_names[0], "dataset.json")) as f:
        dj = json.load(f)
    dj = {k: dj[k] for k in ("channel_names", "labels", "file_ending", "overwrite_image_reader_writer")}
    dj.update(name=name, numTraining=n)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dj, f)
    return name


def _lower_fingerprint_sampling(mp: pytest.MonkeyPatch) -> None:
    """Speed only: the site's own nnU-Net fingerprint (kept local) samples 1e8 foreground voxels for intensity
    statistics the federated plans never use (they come from the summary, which reads every foreground voxel).
    The pooled reference keeps nnU-Net's default (except in the 3D geometry check)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    original = DatasetFingerprintExtractor.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.num_foreground_voxels_for_intensitystats = SITE_FINGERPRINT_VOXELS

    mp.setattr(DatasetFingerprintExtractor, "__init__", init)


def _build_federation(root, mp: pytest.MonkeyPatch, modality: str, first_id: int, seed: int = 0, dim: int = 2,
                      image_size=IMAGE_SIZE, num_train: int = NUM_TRAIN, fast_pooled: bool = False) -> dict:
    from nnunet_fed.data.synthetic import make_federated_datasets

    paths = _set_nnunet_env(mp, root)
    names = make_federated_datasets(first_id=first_id, num_sites=NUM_SITES, scenario="shift", dim=dim,
                                    num_train=num_train, num_test=0, seed=seed, image_size=image_size,
                                    modality=modality)
    ids = [first_id + k for k in range(NUM_SITES)]
    summary_dir = os.path.join(str(root), "shared")
    summary_files = [os.path.join(summary_dir, f"{n}.json") for n in names]
    with pytest.MonkeyPatch.context() as site_mp:
        _lower_fingerprint_sampling(site_mp)
        for i, f in zip(ids, summary_files):  # at every site: nnunet_fed site fingerprint
            with _quiet():
                assert _cli(["site", "fingerprint", "-d", str(i), "-o", f, "-np", "1"]) == 0
    plans_file = os.path.join(summary_dir, "nnUNetFedPlans.json")
    with _quiet():  # at the server: nnunet_fed plan
        assert _cli(["plan", "--fingerprints", *summary_files, "-o", plans_file]) == 0

    # reference: nnU-Net on the pooled data of all sites
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    pooled_id = first_id + NUM_SITES
    pooled = _make_pooled_dataset(paths["nnUNet_raw"], names, pooled_id)
    with _quiet(), pytest.MonkeyPatch.context() as pooled_mp:
        if fast_pooled:
            _lower_fingerprint_sampling(pooled_mp)
        extract_fingerprints([pooled_id], num_processes=2, check_dataset_integrity=False, clean=True,
                             verbose=False, show_progress_bar=False)
        plan_experiments([pooled_id])
    with open(os.path.join(paths["nnUNet_preprocessed"], pooled, "nnUNetPlans.json")) as f:
        pooled_plans = json.load(f)
    with open(plans_file) as f:
        fed_plans = json.load(f)
    return {"root": str(root), "paths": paths, "names": names, "ids": ids, "summary_files": summary_files,
            "plans_file": plans_file, "fed_plans": fed_plans, "pooled_plans": pooled_plans, "modality": modality}


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """3 CT sites, their summaries (CLI), the federated plans (CLI) and nnU-Net's pooled plans."""
    with pytest.MonkeyPatch.context() as mp:
        yield _build_federation(tmp_path_factory.mktemp("fed_ct"), mp, "CT", first_id=401)


@pytest.fixture
def env(fed, monkeypatch):
    for var, p in fed["paths"].items():
        monkeypatch.setenv(var, p)
    return fed


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _compare_with_pooled(fed_plans: dict, pooled_plans: dict, configurations=("2d",)) -> dict:
    errors = {}
    for ch, ref in pooled_plans["foreground_intensity_properties_per_channel"].items():
        got = fed_plans["foreground_intensity_properties_per_channel"][ch]
        for k in ("percentile_00_5", "median", "percentile_99_5", "mean", "std", "min", "max"):
            errors[f"{ch}/{k}"] = _rel(got[k], ref[k])
    for k in INTENSITY_KEYS + ("std",):
        assert errors[f"0/{k}"] < REL_TOL, (k, errors)
    assert sorted(fed_plans["configurations"]) == sorted(pooled_plans["configurations"])
    for c in configurations:
        c_fed, c_pool = fed_plans["configurations"][c], pooled_plans["configurations"][c]
        assert c_fed["patch_size"] == c_pool["patch_size"], c
        np.testing.assert_allclose(c_fed["spacing"], c_pool["spacing"], rtol=1e-3)
        assert c_fed["architecture"] == c_pool["architecture"], c  # network topology
        for k in ("batch_size", "median_image_size_in_voxels", "normalization_schemes", "use_mask_for_norm"):
            assert c_fed[k] == c_pool[k], (c, k)
    for k in ("transpose_forward", "transpose_backward", "original_median_shape_after_transp",
              "image_reader_writer"):
        assert fed_plans[k] == pooled_plans[k], k
    np.testing.assert_allclose(fed_plans["original_median_spacing_after_transp"],
                               pooled_plans["original_median_spacing_after_transp"], rtol=1e-3)
    assert fed_plans["plans_name"] == "nnUNetFedPlans"
    assert fed_plans["experiment_planner_used"] == "FederatedExperimentPlanner"
    return errors


# ----------------------------------------------------------------------------------------------------- tests
def test_nnunet_paths_are_read_lazily(tmp_path, monkeypatch):
    """nnunetv2 2.8 reads nnUNet_raw & co. from os.environ at use time (so setenv after import works)."""
    import nnunetv2.paths

    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "r1"))
    assert os.fspath(nnunetv2.paths.nnUNet_raw) == str(tmp_path / "r1")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "r2"))
    assert os.fspath(nnunetv2.paths.nnUNet_raw) == str(tmp_path / "r2")


def test_merged_plans_match_pooled_plans_ct(fed):
    """Merged intensity percentiles / mean within 1 % of pooled nnU-Net; same patch size, spacing, network."""
    errors = _compare_with_pooled(fed["fed_plans"], fed["pooled_plans"])
    assert fed["fed_plans"]["configurations"]["2d"]["normalization_schemes"] == ["CTNormalization"]
    print("\nmerged vs pooled relative errors (CT):", json.dumps({k: float(f"{v:.3g}") for k, v in errors.items()}))
    # the sites really are heterogeneous: no single site's statistics come close to the pooled ones
    from nnunet_fed.plans.merge import merge_summaries
    from nnunet_fed.plans.summary import load_summary

    pooled = fed["pooled_plans"]["foreground_intensity_properties_per_channel"]["0"]
    for f in fed["summary_files"]:
        single = merge_summaries([load_summary(f)])["foreground_intensity_properties_per_channel"]["0"]
        assert max(_rel(single[k], pooled[k]) for k in INTENSITY_KEYS) > 0.2


def test_merged_plans_match_pooled_plans_mri(tmp_path):
    """The same comparison with a z-score (MRI) channel."""
    with pytest.MonkeyPatch.context() as mp:
        fed_mri = _build_federation(tmp_path, mp, "MRI", first_id=421, seed=1)
    errors = _compare_with_pooled(fed_mri["fed_plans"], fed_mri["pooled_plans"])
    assert fed_mri["fed_plans"]["configurations"]["2d"]["normalization_schemes"] == ["ZScoreNormalization"]
    print("\nmerged vs pooled relative errors (MRI):", json.dumps({k: float(f"{v:.3g}") for k, v in errors.items()}))


def test_merged_plans_match_pooled_plans_3d(tmp_path):
    """3D sites with different (anisotropic-ish) spacings: same 3d_fullres and 2d plans as pooled nnU-Net.

    Geometry check: the pooled reference samples 1e6 instead of 1e8 foreground voxels here (speed)."""
    with pytest.MonkeyPatch.context() as mp:
        fed3 = _build_federation(tmp_path, mp, "CT", first_id=431, dim=3, image_size=(16, 32, 32), num_train=4,
                                 fast_pooled=True)
    errors = _compare_with_pooled(fed3["fed_plans"], fed3["pooled_plans"], configurations=("3d_fullres", "2d"))
    print("\nmerged vs pooled relative errors (3D):", json.dumps({k: float(f"{v:.3g}") for k, v in errors.items()}))


def test_geometry_planning_matches_nnunet_on_anisotropic_heterogeneous_cases(tmp_path, monkeypatch):
    """Planner logic without images: per-case geometry with anisotropic, heterogeneous spacings and shapes.

    nnU-Net's ExperimentPlanner gets the per-case lists as its fingerprint; the federated planner gets three
    site summaries built from the same cases. 3d_fullres (10th-percentile z spacing) and 2d must
    be the same plans (3d_lowres too when nnU-Net makes one)."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    from nnunet_fed.plans.planner import plan_federation
    from nnunet_fed.plans.sketch import LogSketch
    from nnunet_fed.plans.summary import INTENSITY_WIDTH, INTENSITY_ZERO, aggregate_cases, build_summary, \
        write_summary

    paths = _set_nnunet_env(monkeypatch, tmp_path)
    rng = np.random.default_rng(3)
    dj = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}
    cases = []
    for _ in range(15):
        spacing = [float(rng.choice([2.5, 3.0, 4.0, 5.0, 6.5])), *[float(rng.choice([0.68, 0.75, 0.8, 0.9]))] * 2]
        shape = [int(rng.integers(18, 60)), int(rng.integers(200, 512)), int(rng.integers(200, 512))]
        x = rng.normal(rng.uniform(-100, 300), rng.uniform(20, 80), int(rng.integers(500, 3000)))
        cases.append({"spacing": spacing, "shape_after_crop": shape,
                      "relative_size_after_cropping": float(rng.uniform(0.5, 1.0)),
                      "channels": [{"mean": float(x.mean()), "mean_sq": float(np.mean(x * x)),
                                    "sketch": LogSketch(INTENSITY_WIDTH, INTENSITY_ZERO).add(x, 1.0 / x.size)}]})
    files = []
    for k, part in enumerate((cases[:5], cases[5:9], cases[9:])):
        name = f"Dataset{471 + k:03d}_Site{k}"
        files.append(write_summary(build_summary(name, dj, "SimpleITKIO", aggregate_cases(part, 1)),
                                   str(tmp_path / f"{name}.json")))
    fed_plans = plan_federation(files, str(tmp_path / "fed.json"))

    pooled = "Dataset470_Pooled"
    os.makedirs(os.path.join(paths["nnUNet_raw"], pooled))
    os.makedirs(os.path.join(paths["nnUNet_preprocessed"], pooled))
    with open(os.path.join(paths["nnUNet_raw"], pooled, "dataset.json"), "w") as f:
        json.dump({**dj, "numTraining": len(cases), "overwrite_image_reader_writer": "SimpleITKIO",
                   "dataset": {"c0": {"images": ["imagesTr/c0_0000.nii.gz"], "label": "labelsTr/c0.nii.gz"}}}, f)
    with open(os.path.join(paths["nnUNet_preprocessed"], pooled, "dataset_fingerprint.json"), "w") as f:
        json.dump({"spacings": [c["spacing"] for c in cases], "shapes_after_crop": [c["shape_after_crop"] for c in cases],
                   "median_relative_size_after_cropping": float(np.median([c["relative_size_after_cropping"]
                                                                            for c in cases])),
                   "foreground_intensity_properties_per_channel":
                       fed_plans["foreground_intensity_properties_per_channel"]}, f)
    with _quiet():
        pooled_plans = json.loads(json.dumps(ExperimentPlanner(pooled).plan_experiment()))

    assert sorted(fed_plans["configurations"]) == sorted(pooled_plans["configurations"])
    assert {"2d", "3d_fullres"} <= set(pooled_plans["configurations"])
    full_spacing = pooled_plans["configurations"]["3d_fullres"]["spacing"]
    assert full_spacing[0] < float(np.median([c["spacing"][0] for c in cases]))  # the anisotropy rule applied
    for name, ref in pooled_plans["configurations"].items():
        got = dict(fed_plans["configurations"][name])
        ref = dict(ref)
        if "data_identifier" in ref:
            assert got.pop("data_identifier").replace("nnUNetFedPlans", "") == \
                ref.pop("data_identifier").replace("nnUNetPlans", "")
        if "spacing" in ref:
            np.testing.assert_allclose(got.pop("spacing"), ref.pop("spacing"), rtol=1e-3)
            np.testing.assert_allclose(got.pop("median_image_size_in_voxels"),
                                       ref.pop("median_image_size_in_voxels"), atol=1)
        assert got == ref, name
    for k in ("transpose_forward", "original_median_shape_after_transp"):
        assert fed_plans[k] == pooled_plans[k], k
    np.testing.assert_allclose(fed_plans["original_median_spacing_after_transp"],
                               pooled_plans["original_median_spacing_after_transp"], rtol=1e-3)


def _collect(obj, numbers: list, strings: list, lists: list) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            strings.append(str(k))
            try:
                numbers.append(float(k))
            except ValueError:
                pass
            _collect(v, numbers, strings, lists)
    elif isinstance(obj, list):
        lists.append(obj)
        for v in obj:
            _collect(v, numbers, strings, lists)
    elif isinstance(obj, bool) or obj is None:
        pass
    elif isinstance(obj, (int, float)):
        numbers.append(float(obj))
    elif isinstance(obj, str):
        strings.append(obj)


def test_summaries_hold_no_per_case_value(env):
    """Every number / string / list in every shared summary is checked against the site's per-case values."""
    for name, summary_file in zip(env["names"], env["summary_files"]):
        summary = _assert_no_per_case_value(env, name, summary_file)
        # what it does hold: aggregates, no DP
        assert summary["num_cases"] == NUM_TRAIN and summary["dp"] is None
        assert set(summary["dataset_json"]) >= {"channel_names", "labels", "file_ending"}


def _assert_no_per_case_value(env, name: str, summary_file: str) -> dict:
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    raw, pre = env["paths"]["nnUNet_raw"], env["paths"]["nnUNet_preprocessed"]
    with open(summary_file) as f:
        text = f.read()
    summary = json.loads(text)
    numbers, strings, lists = [], [], []
    _collect(summary, numbers, strings, lists)

    # the site's own nnU-Net fingerprint (stays at the site) lists every case's spacing and shape
    with open(os.path.join(pre, name, "dataset_fingerprint.json")) as f:
        fingerprint = json.load(f)
    assert len(fingerprint["spacings"]) == NUM_TRAIN
    per_case_lists = [list(map(float, s)) for s in fingerprint["spacings"]] + \
                     [list(map(float, s)) for s in fingerprint["shapes_after_crop"]]
    per_case_scalars = set()
    for s in per_case_lists:
        per_case_scalars.update(s)
    # per-case values nnU-Net computes but does not store: intensity statistics, relative size, extent
    images = sorted(glob.glob(os.path.join(raw, name, "imagesTr", "*.nii.gz")))
    labels = sorted(glob.glob(os.path.join(raw, name, "labelsTr", "*.nii.gz")))
    identifiers = [os.path.basename(p)[:-len(".nii.gz")] for p in labels]
    for img, lab in zip(images, labels):
        shape, spacing, _, stats, rel = DatasetFingerprintExtractor.analyze_case([img], lab, SimpleITKIO, 10)
        per_case_scalars.update(float(v) for v in stats[0].values())
        per_case_scalars.add(float(rel))
        per_case_scalars.update(float(a) * float(b) for a, b in zip(spacing, shape))
    # 0 and 1 also serve as counts, indices and flags (and every 2D case has 1 voxel along its dummy axis);
    # they cannot tell anything about a case. The per-case *lists* containing them are checked below.
    per_case_scalars -= {0.0, 1.0}
    assert len(per_case_scalars) > 4 * NUM_TRAIN

    leaked = sorted({x for x in numbers for v in per_case_scalars if math.isclose(x, v, rel_tol=1e-9)})
    assert not leaked, f"{name}: per-case values in the shared summary: {leaked[:10]}"
    for lst in lists:
        if len(lst) == len(per_case_lists[0]) and all(isinstance(v, (int, float)) for v in lst):
            assert [float(v) for v in lst] not in per_case_lists, f"{name}: a per-case list {lst} is shared"
    for ident in identifiers + [os.path.basename(p) for p in images + labels]:
        assert ident not in text, f"{name}: case identifier {ident} in the shared summary"
    assert not any("imagesTr" in s or "labelsTr" in s for s in strings)
    return summary


@pytest.mark.parametrize("key, value", [("channel_names", {"0": "MRI"}),
                                        ("labels", {"background": 0, "organ": 1, "tumour": 2, "cyst": 3}),
                                        ("file_ending", ".nii")])
def test_merge_rejects_mismatching_site(env, tmp_path, key, value):
    from nnunet_fed.plans.merge import merge_summaries
    from nnunet_fed.plans.planner import plan_federation
    from nnunet_fed.sites import FederationSetupError

    summaries = []
    for f in env["summary_files"]:
        with open(f) as fh:
            summaries.append(json.load(fh))
    bad = env["names"][1]
    summaries[1]["dataset_json"][key] = value
    with pytest.raises(FederationSetupError, match=f"site {bad}: {key}") as e:
        merge_summaries(summaries)
    assert json.dumps(value, sort_keys=True) in str(e.value)

    files = []
    for s in summaries:
        files.append(str(tmp_path / f"{s['dataset_name']}.json"))
        with open(files[-1], "w") as fh:
            json.dump(s, fh)
    out = tmp_path / "out" / "plans.json"
    with pytest.raises(FederationSetupError, match=f"site {bad}: {key}"):
        _cli(["plan", "--fingerprints", *files, "-o", str(out)])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value", [("channel_names", {"0": "MRI"}),
                                        ("labels", {"background": 0, "organ": 1}),
                                        ("file_ending", ".nii")])
def test_preprocess_rejects_mismatching_site(env, key, value):
    from nnunet_fed.plans.preprocess import preprocess_site
    from nnunet_fed.sites import FederationSetupError

    raw, pre = env["paths"]["nnUNet_raw"], env["paths"]["nnUNet_preprocessed"]
    site_id = 450 + ["channel_names", "labels", "file_ending"].index(key)
    bad = f"Dataset{site_id:03d}_Mismatch"
    shutil.copytree(os.path.join(raw, env["names"][0]), os.path.join(raw, bad))
    with open(os.path.join(raw, bad, "dataset.json")) as f:
        dj = json.load(f)
    dj[key] = value
    with open(os.path.join(raw, bad, "dataset.json"), "w") as f:
        json.dump(dj, f)
    try:
        with pytest.raises(FederationSetupError, match=f"site {bad}: {key}") as e:
            preprocess_site(site_id, env["plans_file"], configurations=("2d",), num_processes=1)
        assert json.dumps(value, sort_keys=True) in str(e.value)
        with pytest.raises(FederationSetupError, match=f"site {bad}: {key}"):
            _cli(["site", "preprocess", "-d", str(site_id), "--plans", env["plans_file"], "-c", "2d"])
        assert not os.path.exists(os.path.join(pre, bad)), "nothing may be written for a mismatching site"
    finally:
        shutil.rmtree(os.path.join(raw, bad))


def test_run_federated_planning_rejects_mismatching_site_before_writing(env, tmp_path):
    from nnunet_fed.plans.federated_planning import run_federated_planning
    from nnunet_fed.sites import FederationSetupError

    raw = env["paths"]["nnUNet_raw"]
    bad = "Dataset460_Mismatch"
    shutil.copytree(os.path.join(raw, env["names"][0]), os.path.join(raw, bad))
    with open(os.path.join(raw, bad, "dataset.json")) as f:
        dj = json.load(f)
    dj["labels"] = {"background": 0, "organ": 1}
    with open(os.path.join(raw, bad, "dataset.json"), "w") as f:
        json.dump(dj, f)
    try:
        with pytest.raises(FederationSetupError, match=f"site {bad}: labels"):
            run_federated_planning([env["ids"][0], 460], output_dir=str(tmp_path / "fp"))
        assert not (tmp_path / "fp").exists()
    finally:
        shutil.rmtree(os.path.join(raw, bad))


def test_site_preprocessing_gives_identical_networks(env):
    """Every site installs the shared plans, preprocesses with them and builds the same network."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_fed.sites import check_preprocessed

    pre = env["paths"]["nnUNet_preprocessed"]
    for i in env["ids"]:  # at every site: nnunet_fed site preprocess
        with _quiet():
            assert _cli(["site", "preprocess", "-d", str(i), "--plans", env["plans_file"], "-c", "2d",
                         "-np", "1"]) == 0
    site_plans, shapes = [], []
    for name in env["names"]:
        plans = check_preprocessed(name, "nnUNetFedPlans", "2d")
        assert plans["dataset_name"] == name
        assert os.path.isfile(os.path.join(pre, name, "dataset.json"))
        assert os.path.isfile(os.path.join(pre, name, "dataset_fingerprint.json"))
        assert len(glob.glob(os.path.join(pre, name, "nnUNetFedPlans_2d", "*.pkl"))) == NUM_TRAIN
        assert plans["foreground_intensity_properties_per_channel"] == \
            env["fed_plans"]["foreground_intensity_properties_per_channel"]
        site_plans.append(plans)
        cm = PlansManager(plans).get_configuration("2d")
        net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, 1, 3, allow_init=False)
        shapes.append([(k, tuple(v.shape)) for k, v in net.state_dict().items()])
    for p in site_plans[1:]:
        assert p["configurations"]["2d"]["architecture"] == site_plans[0]["configurations"]["2d"]["architecture"]
        assert p["configurations"]["2d"]["patch_size"] == site_plans[0]["configurations"]["2d"]["patch_size"]
        assert {k: v for k, v in p.items() if k != "dataset_name"} == \
            {k: v for k, v in site_plans[0].items() if k != "dataset_name"}
    assert shapes[1] == shapes[0] and shapes[2] == shapes[0]

    # CT normalization used the merged properties: site 0 is at the target spacing (no resampling) and its
    # background lies below the merged 0.5 percentile, so its minimum is exactly the clipped lower bound
    props = env["fed_plans"]["foreground_intensity_properties_per_channel"]["0"]
    data = nnUNetDatasetBlosc2(os.path.join(pre, env["names"][0], "nnUNetFedPlans_2d")).load_case("case_0000")[0]
    expected_min = (props["percentile_00_5"] - props["mean"]) / props["std"]
    assert abs(float(np.asarray(data[:]).min()) - expected_min) < 1e-4


def test_dp_summary(env, tmp_path):
    from nnunet_fed.plans.planner import plan_federation
    from nnunet_fed.plans.summary import dp_sensitivity, load_summary, summarize_site

    name = env["names"][0]
    clean = load_summary(env["summary_files"][0])
    eps = 200.0
    with _quiet():
        noisy = summarize_site(name, output_file=str(tmp_path / "dp.json"), num_processes=1, dp_epsilon=eps,
                               seed=0, reuse_fingerprint=True)
        noisy2 = summarize_site(name, num_processes=1, dp_epsilon=eps, seed=1, reuse_fingerprint=True)
    dp = noisy["dp"]
    assert dp["epsilon"] == eps and dp["mechanism"] == "laplace"
    assert dp["sensitivity"] == dp_sensitivity(num_axes=3, num_channels=1) == 12
    assert dp["noise_scale"] == pytest.approx(12 / eps)
    assert noisy["num_cases"] != NUM_TRAIN and noisy["num_cases"] != noisy2["num_cases"]
    assert noisy["foreground_intensities"]["0"]["sum_of_case_means"] is None  # exact sums are not released
    clean_w = clean["geometry"]["spacing"][1]["positive"]["weight"]
    noisy_w = noisy["geometry"]["spacing"][1]["positive"]["weight"]
    assert noisy_w and noisy_w != clean_w and clean_w == [NUM_TRAIN]
    assert load_summary(str(tmp_path / "dp.json"))["dp"]["epsilon"] == eps
    _assert_no_per_case_value(env, name, str(tmp_path / "dp.json"))

    # still plans: one DP site with two plain ones, and all three with DP
    with _quiet():
        all_dp = [str(tmp_path / "dp.json")]
        for k, n in enumerate(env["names"][1:]):
            all_dp.append(str(tmp_path / f"dp{k}.json"))
            summarize_site(n, output_file=all_dp[-1], num_processes=1, dp_epsilon=eps, seed=10 + k,
                           reuse_fingerprint=True)
    for files in ([str(tmp_path / "dp.json")] + env["summary_files"][1:], all_dp):
        plans = plan_federation(files, str(tmp_path / "plans.json"))
        assert plans["plans_name"] == "nnUNetFedPlans"
        assert plans["federation"]["sites"][0]["dp_epsilon"] == eps
        assert plans["configurations"]["2d"]["patch_size"] == env["fed_plans"]["configurations"]["2d"]["patch_size"]
        props = plans["foreground_intensity_properties_per_channel"]["0"]
        assert props["percentile_00_5"] < props["median"] < props["percentile_99_5"] and props["std"] > 0


def test_run_federated_planning_end_to_end(env, tmp_path):
    """What ``nnunet_fed simulate --federated-planning`` runs as round 0."""
    from nnunet_fed.plans.federated_planning import run_federated_planning
    from nnunet_fed.sites import check_preprocessed

    out = tmp_path / "round0"
    ident = run_federated_planning(env["ids"], configurations=("2d",), output_dir=str(out), num_processes=1,
                                   reuse_fingerprints=True)
    assert ident == "nnUNetFedPlans"
    assert sorted(os.listdir(out)) == sorted([f"{n}_summary.json" for n in env["names"]] + ["nnUNetFedPlans.json"])
    with open(out / "nnUNetFedPlans.json") as f:
        shared = json.load(f)
    assert shared["configurations"]["2d"]["architecture"] == env["fed_plans"]["configurations"]["2d"]["architecture"]
    for name in env["names"]:
        plans = check_preprocessed(name, ident, "2d")
        assert plans["configurations"] == shared["configurations"]


def test_sketch_merges_across_resolutions_and_ranges():
    from nnunet_fed.plans.sketch import LogSketch

    rng = np.random.default_rng(0)
    a = rng.normal(-300, 50, 20000)  # negative range (e.g. CT fat)
    b = rng.lognormal(7, 0.3, 20000)  # large positive range
    fine = LogSketch(2e-3, 1e-6).add(a, 1 / a.size)
    coarse = LogSketch(2e-3 * 15, 1e-6).add(b, 1 / b.size)
    merged = LogSketch.merge_all([fine, coarse])
    assert merged.width == pytest.approx(0.03) and merged.total == pytest.approx(2.0)
    pooled = np.concatenate([a, b])
    for q in (0.005, 0.25, 0.75, 0.995):  # (the median falls in the gap between the two modes)
        assert _rel(merged.quantile(q), np.quantile(pooled, q)) < 0.02
    exact = LogSketch(2e-4, 1e-12).add([0.7] * 5 + [1.0] * 4 + [1.35] * 3)
    np.testing.assert_allclose(exact.order_statistics(12), [0.7] * 5 + [1.0] * 4 + [1.35] * 3, rtol=1e-4)
    assert LogSketch.from_json(json.loads(json.dumps(exact.to_json()))).order_statistics(12).tolist() == \
        exact.order_statistics(12).tolist()

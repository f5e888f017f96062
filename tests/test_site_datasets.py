"""Every dataset a hospital has: sites without foreground, tiny sites, undeclared labels, region order, plans that
differ, checks before anything is written, and the predict command printed after training.

Each test makes tiny nnU-Net raw sites (``make_federated_datasets``, 2d 32x32, a few cases) of the kind it is about
and runs the real commands on them (``nnunet_fed.cli.main`` in this process, nnU-Net's own code underneath). A
refusal must name the site, the case and the value and say what to do, before anything is written; what was there
before must still be there. Augmentation runs in the main process (``nnUNet_n_proc_DA=0``, a common setting on
small machines that once crashed federated planning).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import cli
from nnunet_fed.cli import main
from nnunet_fed.data.synthetic import make_federated_datasets

SIZE = (32, 32)
QUICK = ["--rounds", "1", "--local-steps", "1", "--val-steps", "1", "--no-val", "--device", "cpu", "--no-progress",
         "-np", "1"]


# ------------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def raw_env(tmp_path, monkeypatch):
    """Empty nnU-Net folders for this test; augmentation in the main process; no nnUNet_extTrainer."""
    return _nnunet_env(tmp_path, monkeypatch)


def _nnunet_env(root, mp) -> dict:
    paths = {v: os.path.join(str(root), v) for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for var, p in paths.items():
        os.makedirs(p, exist_ok=True)
        mp.setenv(var, p)
    mp.setenv("nnUNet_n_proc_DA", "0")
    mp.delenv("nnUNet_extTrainer", raising=False)
    return paths


def make_sites(first_id, layout="nifti", num_sites=1, num_train=4, num_test=1, seed=0):
    return make_federated_datasets(first_id=first_id, num_sites=num_sites, scenario="shift", dim=2,
                                   num_train=num_train, num_test=num_test, seed=seed, image_size=SIZE, layout=layout)


def snapshot(*roots) -> dict:
    """Every file under ``roots`` with its size and modification time (to show nothing was written or lost)."""
    out = {}
    for root in roots:
        for folder, _, files in os.walk(root):
            for f in files:
                p = os.path.join(folder, f)
                st = os.stat(p)
                out[p] = (st.st_size, st.st_mtime_ns)
    return out


def raw_case(name, sub, identifier, ending=".nii.gz"):
    return os.path.join(os.environ["nnUNet_raw"], name, sub, identifier + ending)


def rewrite_label(name, identifier, change):
    """Replace a NIfTI label file of a raw site by ``change(array)`` (same spacing, new shape allowed)."""
    path = raw_case(name, "labelsTr", identifier)
    ref = sitk.ReadImage(path)
    arr = change(sitk.GetArrayFromImage(ref))
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(ref.GetSpacing())
    sitk.WriteImage(img, path, useCompression=True)


def assert_refused(code, err, *fragments):
    assert code == 2, err
    for f in fragments:
        assert f in err, f"{f!r} not in: {err}"


# ------------------------------------------------------------------------------ 1. a site without foreground
def test_site_without_foreground_is_fingerprinted(raw_env, capsys):
    """A site of healthy controls (every label 0) has nothing to add to the foreground intensity statistics but
    is fingerprinted (nnU-Net's own fingerprint included) instead of crashing with an IndexError."""
    name = make_sites(511, layout="no-foreground")[0]
    out_file = os.path.join(str(raw_env["nnUNet_results"]), "..", "nofg_summary.json")
    code, out, err = cli(capsys, "site", "fingerprint", "-d", 511, "-o", out_file, "-np", 1)
    assert code == 0, err
    with open(out_file) as f:
        summary = json.load(f)
    assert summary["num_cases"] == 4
    assert summary["foreground_intensities"]["0"]["num_cases_with_foreground"] == 0
    assert "no foreground" in out
    assert os.path.isfile(os.path.join(raw_env["nnUNet_preprocessed"], name, "dataset_fingerprint.json"))


# ------------------------------------------------------------------ 2, 4, 13. site data verified before writing
def _bad_value_3(name):
    rewrite_label(name, "case_0002", lambda a: np.where(a == 2, 3, a))
    return "case_0002", ["label value 3", "labels", "0, 1, 2"]


def _labels_0_255(name):
    for i in range(4):
        rewrite_label(name, f"case_{i:04d}", lambda a: np.where(a > 0, 255, 0))
    return "case_0000", ["label value 255", "0/255"]


def _label_larger_than_image(name):
    rewrite_label(name, "case_0001", lambda a: np.pad(a, 4))
    return "case_0001", ["32, 32)", "40, 40)"]


def _missing_label(name):
    os.remove(raw_case(name, "labelsTr", "case_0003"))
    return "case_0003", ["no label file", "labelsTr"]


def _rgba_png(name):
    from skimage import io

    path = raw_case(name, "imagesTr", "case_0001_0000", ".png")
    rgb = io.imread(path)
    io.imsave(path, np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], -1), check_contrast=False)
    return "case_0001", ["4 channels", "3", "R, G, B"]


@pytest.mark.parametrize("layout, damage", [
    ("nifti", _bad_value_3),               # 2: a label dataset.json does not declare
    ("nifti", _labels_0_255),              # 13: masks saved as 0/255
    ("nifti", _label_larger_than_image),   # 4: image and label of different size
    ("nifti", _missing_label),             # 13: a missing label file
    ("rgb-png", _rgba_png),                # 13: an RGBA PNG at a site declared R, G, B
], ids=["undeclared-label", "labels-0-255", "size-mismatch", "missing-label", "rgba-png"])
def test_site_data_verified_before_anything_is_written(raw_env, capsys, layout, damage):
    """``site fingerprint`` and ``simulate --federated-planning`` run nnU-Net's dataset verification first and name
    the site, the case and the value; nothing is written, and what another site already wrote stays."""
    good = make_sites(521, layout=layout)[0]
    bad = make_sites(522, layout=layout)[0]
    case, fragments = damage(bad)
    assert cli(capsys, "site", "fingerprint", "-d", 521, "-np", 1)[0] == 0  # the good site, fingerprinted before
    before = snapshot(raw_env["nnUNet_preprocessed"], raw_env["nnUNet_results"])

    code, _, err = cli(capsys, "site", "fingerprint", "-d", 522, "-np", 1)
    assert_refused(code, err, f"site {bad}", case, *fragments)
    code, _, err = cli(capsys, "simulate", "-d", 521, 522, "-c", "2d", "--federated-planning", *QUICK)
    assert_refused(code, err, f"site {bad}", case, *fragments)
    assert snapshot(raw_env["nnUNet_preprocessed"], raw_env["nnUNet_results"]) == before
    assert not os.path.exists(os.path.join(raw_env["nnUNet_preprocessed"], bad))
    assert good  # (the good site's files are in ``before``)


def test_undeclared_label_in_preprocessed_data_is_named(site_env, capsys):
    """Data preprocessed without nnU-Net's integrity check (label 3 where dataset.json declares 0..2) is refused
    by ``simulate`` before training, naming the site, the case and the value."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    pre = site_env["env"]["nnUNet_preprocessed"]
    src = os.path.join(pre, site_env["names"][0])
    name = "Dataset296_BadLabel"
    dst = os.path.join(pre, name)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    plans_file = os.path.join(dst, "nnUNetPlans.json")
    with open(plans_file) as f:
        plans = json.load(f)
    plans["dataset_name"] = name
    with open(plans_file, "w") as f:
        json.dump(plans, f)
    folder = os.path.join(dst, plans["configurations"]["2d"]["data_identifier"])
    data, seg, _, props = nnUNetDatasetBlosc2(folder).load_case("case_0001")
    seg = np.asarray(seg[:]).copy()
    seg[seg == 2] = 3
    seg[0, 0, 0, 0] = 3
    for f in ("case_0001.b2nd", "case_0001_seg.b2nd"):
        os.remove(os.path.join(folder, f))
    nnUNetDatasetBlosc2.save_case(np.asarray(data[:]), seg, props, os.path.join(folder, "case_0001"),
                                  chunks=data.chunks, blocks=data.blocks)
    try:
        code, _, err = cli(capsys, "simulate", "-d", site_env["ids"][0], 296, "-c", "2d", *QUICK)
        assert_refused(code, err, f"site {name}", "case_0001", "label value 3", "0, 1, 2")
        assert os.listdir(site_env["results"]) == []
    finally:
        shutil.rmtree(dst)


# ------------------------------------------------------------------------------------ 8. region order
def _region_sites(first_id):
    names = make_sites(first_id, layout="regions", num_sites=2)
    dj_file = os.path.join(os.environ["nnUNet_raw"], names[1], "dataset.json")
    with open(dj_file) as f:
        dj = json.load(f)
    with open(dj_file, "w") as f:
        json.dump(dj, f, sort_keys=True)  # saved with sorted keys: regions in another order
    return names


def test_region_order_is_compared_as_nnunet_maps_channels(raw_env, capsys):
    """nnU-Net maps output channel k to the k-th region in ``labels``; a site listing the same regions in another
    order would average different regions' heads. Refused, naming the site and both orders."""
    names = _region_sites(551)
    code, _, err = cli(capsys, "simulate", "-d", 551, 552, "-c", "2d", "--federated-planning", *QUICK)
    assert_refused(code, err, f"site {names[1]}", "output channel", "whole_organ", "tumour")
    assert os.listdir(raw_env["nnUNet_preprocessed"]) == [] and os.listdir(raw_env["nnUNet_results"]) == []

    # the summaries of `site fingerprint` are compared the same way by `plan`
    files = []
    for i in (551, 552):
        files.append(os.path.join(str(raw_env["nnUNet_results"]), "..", f"{i}.json"))
        assert cli(capsys, "site", "fingerprint", "-d", i, "-o", files[-1], "-np", 1)[0] == 0
    out = os.path.join(str(raw_env["nnUNet_results"]), "..", "plans", "p.json")
    code, _, err = cli(capsys, "plan", "--fingerprints", *files, "-o", out)
    assert_refused(code, err, f"site {names[1]}", "output channel")
    assert not os.path.exists(out)


def test_label_order_does_not_matter_without_regions(raw_env):
    """Integer labels name their output channel by value: another order of the same labels is the same task."""
    from nnunet_fed.sites import check_sites_compatible

    names = make_sites(561, num_sites=2, num_train=1, num_test=0)
    dj_file = os.path.join(raw_env["nnUNet_raw"], names[1], "dataset.json")
    with open(dj_file) as f:
        dj = json.load(f)
    dj["labels"] = {"tumour": 2, "background": 0, "organ": 1}
    with open(dj_file, "w") as f:
        json.dump(dj, f)
    check_sites_compatible(names, source="raw")


# ------------------------------------------------------------------------------ 9. plans that differ
def _clone_preprocessed(site_env, new_id, change_plans):
    pre = site_env["env"]["nnUNet_preprocessed"]
    name = f"Dataset{new_id}_Replanned{new_id}"
    dst = os.path.join(pre, name)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(os.path.join(pre, site_env["names"][0]), dst)
    with open(os.path.join(dst, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    plans["dataset_name"] = name
    change_plans(plans)
    with open(os.path.join(dst, "nnUNetPlans.json"), "w") as f:
        json.dump(plans, f)
    return str(new_id), name


def _ct(properties):
    def change(plans):
        plans["configurations"]["2d"]["normalization_schemes"] = ["CTNormalization"]
        plans["foreground_intensity_properties_per_channel"]["0"].update(properties)
    return change


@pytest.mark.parametrize("changes, fragment", [
    ([lambda p: p["configurations"]["2d"].update(spacing=[0.7, 0.7])], "spacing"),
    ([_ct({})], "normalization_schemes"),
    ([_ct({"mean": 100.0}), _ct({"mean": 300.0})], "foreground_intensity_properties_per_channel"),
], ids=["spacing", "normalization", "ct-intensities"])
def test_plans_that_differ_where_it_matters_are_refused(site_env, capsys, changes, fragment):
    """The same network, but another target spacing or CT normalisation: the global model would preprocess every
    site like the first. Refused, naming the site and the difference, and how to plan together."""
    ids, names = [site_env["ids"][0]], [site_env["names"][0]]
    for k, change in enumerate(changes):
        i, n = _clone_preprocessed(site_env, 281 + k, change)
        ids.append(i)
        names.append(n)
    if len(changes) == 2:  # two CT sites with different intensity statistics
        ids, names = ids[1:], names[1:]
    try:
        code, _, err = cli(capsys, "simulate", "-d", *ids, "-c", "2d", *QUICK)
        assert_refused(code, err, f"site {names[-1]}", fragment, names[0], "--federated-planning",
                       "nnUNetv2_move_plans_between_datasets")
        assert os.listdir(site_env["results"]) == []
    finally:
        for n in names:
            if n not in site_env["names"]:
                shutil.rmtree(os.path.join(site_env["env"]["nnUNet_preprocessed"], n))


# ---------------------------------------------------------------- 10, 11. planners; checks before planning
def test_federated_planning_with_an_nnunet_planner(raw_env, capsys):
    """``-pl`` plans with one of nnU-Net's planners (residual encoder presets); a ``-p`` that federated planning
    cannot honour is refused before anything is written."""
    make_sites(571, num_sites=2, num_train=2, num_test=0)
    code, _, err = cli(capsys, "simulate", "-d", 571, 572, "-c", "2d", "--federated-planning",
                       "-p", "nnUNetResEncUNetMPlans", *QUICK)
    assert_refused(code, err, "-p nnUNetResEncUNetMPlans", "-pl nnUNetPlannerResEncM")
    assert os.listdir(raw_env["nnUNet_preprocessed"]) == [] and os.listdir(raw_env["nnUNet_results"]) == []

    files = []
    for i in (571, 572):
        files.append(os.path.join(str(raw_env["nnUNet_results"]), "..", f"{i}.json"))
        assert cli(capsys, "site", "fingerprint", "-d", i, "-o", files[-1], "-np", 1)[0] == 0
    out = os.path.join(str(raw_env["nnUNet_results"]), "..", "resenc.json")
    code, stdout, err = cli(capsys, "plan", "-pl", "nnUNetPlannerResEncM", "--fingerprints", *files, "-o", out)
    assert code == 0, err
    with open(out) as f:
        plans = json.load(f)
    assert plans["plans_name"] == "nnUNetFedResEncUNetMPlans"
    assert plans["configurations"]["2d"]["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    code, _, err = cli(capsys, "plan", "-pl", "nnUNetPlannerDoesNotExist", "--fingerprints", *files, "-o", out + "x")
    assert_refused(code, err, "nnUNetPlannerDoesNotExist")


@pytest.mark.parametrize("bad", [["-o", "target_epsilonn=8"], ["--rounds", "0"], ["--local-steps", "0"],
                                 ["-f", "abc"]], ids=["option", "rounds", "local-steps", "fold"])
def test_federated_planning_checks_everything_first(raw_env, capsys, bad):
    """Trainer, options and schedule are checked before any site is planned or preprocessed."""
    make_sites(581, num_sites=2, num_train=2, num_test=0)
    args = ["simulate", "-d", 581, 582, "-c", "2d", "--federated-planning", *QUICK, *bad]
    code, _, err = cli(capsys, *args)
    assert_refused(code, err, bad[1].split("=")[0] if bad[0] == "-o" else bad[0])
    assert os.listdir(raw_env["nnUNet_preprocessed"]) == [] and os.listdir(raw_env["nnUNet_results"]) == []


# ------------------------------------------------------------------------ 12. bad values write nothing
DP = ["-tr", "nnUNetTrainerFedADP", "-o", "public_plans=true"]


@pytest.mark.parametrize("extra, named", [
    (DP + ["-o", "target_epsilon=0"], "target_epsilon"),
    (DP + ["-o", "target_epsilon=-1"], "target_epsilon"),
    (DP + ["-o", "target_epsilon=nan"], "target_epsilon"),
    (["--rounds", "0"], "--rounds"),
    (["--local-steps", "0"], "--local-steps"),
    (["--val-steps", "0"], "--val-steps"),
    (["--fedprox-mu", "-1"], "--fedprox-mu"),
    (["-f", "abc"], "-f"),
    (["--dp-epsilon", "1"], "--federated-planning"),
], ids=["eps0", "eps-1", "eps-nan", "rounds", "local-steps", "val-steps", "fedprox-mu", "fold", "dp-epsilon"])
def test_bad_values_write_nothing(site_env, capsys, extra, named):
    """Refused before anything is written, naming the argument; a previous run's files stay as they were."""
    fold = os.path.join(site_env["results"], "DatasetFed_201_202_203", "earlier_run")
    os.makedirs(fold)
    with open(os.path.join(fold, "federation_metrics.jsonl"), "w") as f:
        f.write('{"round": 0}\n')
    before = snapshot(site_env["results"])
    args = ["simulate", "-d", *site_env["ids"], "-c", "2d", *QUICK]
    for k in range(0, len(extra), 2):  # later values override the defaults in QUICK
        args.append(extra[k])
        args.append(extra[k + 1])
    code, _, err = cli(capsys, *args)
    assert_refused(code, err, named)
    assert snapshot(site_env["results"]) == before


# --------------------------------------------------------------- 6. printed commands run as printed
def test_server_prints_commands_that_parse():
    """The site join and predict commands ``nnunet_fed server`` prints are accepted by the commands they call."""
    from nnunet_fed.cli import build_parser
    from nnunet_fed.deployment.cli import site_join_command
    from nnunet_fed.federation.commands import predict_command

    join = site_join_command(port=9092, configuration="2d", trainer="nnUNetTrainerFedADP", plans="nnUNetFedPlans",
                             insecure=False, fold="all", node_auth=True)
    argv = shlex.split(join.replace("<this host>", "server.example.org").replace("<dataset>", "101")
                       .replace("<ca.pem>", "ca.pem").replace("<site.key>", "site.key"))
    assert argv[0] == "nnunet_fed"
    args = build_parser().parse_args(argv[1:])
    assert (args.plans, args.trainer, args.configuration, args.fold, args.auth_supernode_private_key) == \
        ("nnUNetFedPlans", "nnUNetTrainerFedADP", "2d", "all", "site.key")
    cmd = predict_command("DatasetFed_flower", "nnUNetTrainerFedADP", "nnUNetFedPlans", "2d", 0, device="cpu")
    argv = shlex.split(cmd)
    assert argv[0].startswith("nnUNet_extTrainer=") and argv[1] == "nnUNetv2_predict"
    assert argv[argv.index("-device") + 1] == "cpu"


def test_site_that_cannot_train_is_refused_at_join_with_its_reason(site_env, capsys):
    """A one-case DP site whose only case falls in the server's validation fold has nothing to train on: ``site
    join`` refuses it, naming the site and why, before any Flower process starts (before, such a site joined and
    answered every round with an error); with another fold the same site passes the check."""
    import glob

    from nnunet_fed.privacy.dp_trainer import hash_split

    pre = site_env["env"]["nnUNet_preprocessed"]
    name = "Dataset298_OneCase"
    dst = os.path.join(pre, name)
    shutil.copytree(os.path.join(pre, site_env["names"][0]), dst)
    try:
        data = os.path.join(dst, "nnUNetPlans_2d")
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        cases = sorted(infer_dataset_class(data).get_identifiers(data))
        for f in glob.glob(os.path.join(dst, "splits_final.json")) + [
                p for c in cases[1:] for pattern in (c + ".*", c + "_seg.*")
                for p in glob.glob(os.path.join(data, pattern)) + glob.glob(os.path.join(dst, "gt_segmentations",
                                                                                         pattern))]:
            os.remove(f)
        fold = next(f for f in range(5) if hash_split(cases[:1], f)[0] == [])
        join = ["site", "join", "--superlink", "127.0.0.1:9", "-d", name, "-c", "2d", "-tr", "nnUNetTrainerFedADP",
                "--insecure", "--no-worker"]
        code, _, err = cli(capsys, *join, "-f", fold)
        assert_refused(code, err, f"site {name}", f"fold {fold}", "no training case")
        from nnunet_fed.sites import find_trainer

        with open(os.path.join(dst, "nnUNetPlans.json")) as f:
            plans = json.load(f)
        find_trainer("nnUNetTrainerFedADP").check_site_split(name, plans, "2d", (fold + 1) % 5)  # trains there
    finally:
        shutil.rmtree(dst)


# --------------------------------------- make-data layouts: plan, federate, predict with the printed command
FEDERATIONS = {  # layout of the federation -> (layouts of its sites, training cases of each)
    "rgb-png": (("rgb-png", 4), ("rgb-png", 4)),
    "ignore-label": (("ignore-label", 4), ("ignore-label", 4)),
    "regions": (("regions", 4), ("regions", 4)),
    # a site of 5 cases, a tiny site (3: too few for nnU-Net's 5-fold split) and a site without foreground
    "tiny-no-foreground": (("nifti", 5), ("nifti", 3), ("no-foreground", 4)),
}
TRAINERS = {
    "nnUNetTrainerFedAvg": [],
    # only target_epsilon: the default rule (largest) falls back to nnU-Net's batch, above half these sites' counts
    "nnUNetTrainerFedADP": ["-o", "public_plans=true", "-o", "target_epsilon=8"],
    "nnUNetTrainerFedOAP": ["-o", "finetune_steps=1"],
}


# Each federation with one or two trainers (FedAvg and FedADP on two, FedOAP on one); the tiny and foreground-free
# sites train twice, the second time on the federated plans of the first. (Planning, one round and prediction take
# 45-95 s per federation on two CPU cores: every layout x trainer pair would take the test suite past its time.)
LAYOUT_TRAINERS = [("tiny-no-foreground", ("nnUNetTrainerFedAvg", "nnUNetTrainerFedADP")),
                   ("rgb-png", ("nnUNetTrainerFedAvg",)), ("regions", ("nnUNetTrainerFedADP",)),
                   ("ignore-label", ("nnUNetTrainerFedOAP",))]


def make_layout_sites(layout, root, mp) -> dict:
    """Raw sites of one layout, made with ``nnunet_fed make-data``, in their own nnU-Net folders."""
    paths = _nnunet_env(root, mp)
    ids = []
    for k, (site_layout, n) in enumerate(FEDERATIONS[layout]):
        i = 701 + k
        assert main(["make-data", "--layout", site_layout, "--sites", "1", "--first-id", str(i), "--num-train",
                     str(n), "--num-test", "1", "--seed", str(k)]) == 0
        ids.append(str(i))
    return {"layout": layout, "paths": paths, "ids": ids}


@pytest.mark.parametrize("layout, trainers", LAYOUT_TRAINERS, ids=[layout for layout, _ in LAYOUT_TRAINERS])
def test_make_data_layouts_federate_and_predict(layout, trainers, capsys, monkeypatch, tmp_path):
    """Each layout plans together (round 0 of ``simulate --federated-planning``), trains one short round with
    FedAvg, FedADP or FedOAP, and predicts held-out images with the ``nnUNetv2_predict`` command ``simulate``
    printed, as printed (no nnUNet_extTrainer set). A second trainer on the same sites reuses the federated plans
    instead of planning again."""
    federation = make_layout_sites(layout, tmp_path / "nnunet", monkeypatch)
    for k, trainer in enumerate(trainers):
        _federate_and_predict(federation, trainer, capsys, tmp_path / f"pred_{k}", planned_before=k > 0)


def _federate_and_predict(federation, trainer, capsys, pred_dir, planned_before: bool):
    ids = federation["ids"]
    pre = federation["paths"]["nnUNet_preprocessed"]
    from nnunet_fed.sites import dataset_name

    names = [dataset_name(i) for i in ids]
    shared = os.path.join(pre, names[0], "federated_planning", "nnUNetFedPlans.json")
    assert os.path.isfile(shared) == planned_before
    mtime = os.stat(shared).st_mtime_ns if planned_before else None

    code, out, err = cli(capsys, "simulate", "-d", *ids, "-c", "2d", "-tr", trainer, "--federated-planning",
                         *QUICK, *TRAINERS[trainer])
    assert code == 0, err
    assert "-p nnUNetFedPlans" in out
    if planned_before:  # planned by the earlier trainer on these sites: reused, not planned again
        assert os.stat(shared).st_mtime_ns == mtime and "reusing the federated plans" in out
    for name in names:  # every site preprocessed with the shared plans
        assert os.path.isfile(os.path.join(pre, name, "nnUNetFedPlans.json"))
    results = federation["paths"]["nnUNet_results"]
    model = os.path.join(results, "DatasetFed_" + "_".join(ids), f"{trainer}__nnUNetFedPlans__2d")
    # the model predicted with: the global one, or (FedOAP) each site's personalised one
    predicted = os.path.join(results, names[-1], os.path.basename(model)) if "OAP" in trainer else model
    with open(os.path.join(predicted, "plans.json")) as f:
        assert json.load(f)["plans_name"] == "nnUNetFedPlans"
    with open(os.path.join(model, "fold_0", "federation_metrics.jsonl")) as f:
        rounds = [json.loads(line) for line in f]
    assert len(rounds) == 1 and set(rounds[0]["sites"]) == set(names)
    if federation["layout"] == "tiny-no-foreground" and trainer == "nnUNetTrainerFedAvg":
        assert rounds[0]["sites"][names[1]]["num_examples"] == 3  # all its cases: too few for a 5-fold split
    if trainer == "nnUNetTrainerFedADP":  # only target_epsilon set: the default batch rule, recorded with its reason
        for name in names:
            with open(os.path.join(results, name, os.path.basename(model), "fold_0", "privacy_report.json")) as f:
                rep = json.load(f)
            conf, half = rep["configuration"], rep["noisy_num_training_cases"] / 2
            assert conf["rule"] == "largest" and "Sander et al. 2023" in conf["reason"]
            assert rep["expected_batch_size"] == max(rep["physical_batch_size"], min(256, half)) == \
                conf["expected_batch_size"] and 0 < rep["epsilon"] <= 8
            # the rest of the configuration, each part with its reason: noise, steps, learning rate
            assert conf["noise"]["noise_multiplier"] == rep["noise_multiplier"]
            assert "target_epsilon=8" in conf["noise"]["reason"]
            assert conf["steps"]["total"] == rep["steps"] == rep["rounds"] * rep["local_steps"]
            assert conf["learning_rate"]["initial_lr"] == 0.01 and "poly" in conf["learning_rate"]["reason"]

    line = next(ln for ln in out.splitlines() if ln.startswith("predict with: "))
    command = line[len("predict with: "):].split(" (personalised")[0]
    site = names[-1]
    ending = ".png" if federation["layout"] == "rgb-png" else ".nii.gz"
    images = os.path.join(federation["paths"]["nnUNet_raw"], site, "imagesTs")
    command = command.replace("<images>", shlex.quote(images)).replace("<output>", shlex.quote(str(pred_dir)))
    command = command.replace("<site>", site)
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    proc = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    predicted = [f for f in os.listdir(pred_dir) if f.endswith(ending)]
    assert predicted == ["test_0000" + ending]

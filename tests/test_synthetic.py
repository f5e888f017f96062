"""nnunet_fed.data.synthetic: synthetic multi-site nnU-Net v2 raw datasets."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnunet_fed.data.synthetic import make_federated_datasets


def _read(path):
    img = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(img), img.GetSpacing()


def _cases(folder, sub):
    return sorted(glob.glob(os.path.join(folder, sub, "*.nii.gz")))


def _site_arrays(folder, sub_img="imagesTr", sub_lab="labelsTr"):
    imgs = [_read(p)[0] for p in _cases(folder, sub_img)]
    labs = [_read(p)[0] for p in _cases(folder, sub_lab)]
    return imgs, labs


@pytest.fixture(scope="module")
def shift2d(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("raw_shift"))
    names = make_federated_datasets(first_id=101, num_sites=3, scenario="shift", dim=2, num_train=20, num_test=4,
                                    seed=0, raw_root=root)
    return root, names


@pytest.fixture(scope="module")
def organs2d(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("raw_organs"))
    names = make_federated_datasets(first_id=104, num_sites=4, scenario="organs", dim=2, num_train=6, num_test=2,
                                    seed=3, raw_root=root)
    return root, names


def test_folder_names_and_ids(shift2d, organs2d):
    root, names = shift2d
    assert names == ["Dataset101_ShiftSite0", "Dataset102_ShiftSite1", "Dataset103_ShiftSite2"]
    assert sorted(os.listdir(root)) == names
    _, onames = organs2d
    assert onames == ["Dataset104_OrgansSite0", "Dataset105_OrgansSite1", "Dataset106_OrgansSite2",
                      "Dataset107_OrgansSite3"]


def test_file_counts_and_naming(shift2d):
    root, names = shift2d
    for n in names:
        f = os.path.join(root, n)
        tr = _cases(f, "imagesTr")
        assert len(tr) == 20 and len(_cases(f, "labelsTr")) == 20
        assert len(_cases(f, "imagesTs")) == 4 and len(_cases(f, "labelsTs")) == 4
        assert os.path.basename(tr[0]) == "case_0000_0000.nii.gz"
        assert os.path.isfile(os.path.join(f, "labelsTr", "case_0019.nii.gz"))
        assert os.path.isfile(os.path.join(f, "imagesTs", "test_0003_0000.nii.gz"))
        assert os.path.isfile(os.path.join(f, "labelsTs", "test_0003.nii.gz"))


def test_dataset_json(shift2d, organs2d):
    root, names = shift2d
    for k, n in enumerate(names):
        with open(os.path.join(root, n, "dataset.json")) as f:
            dj = json.load(f)
        assert dj["channel_names"] == {"0": "MRI"}
        assert dj["labels"] == {"background": 0, "organ": 1, "tumour": 2}
        assert dj["numTraining"] == 20
        assert dj["file_ending"] == ".nii.gz"
        syn = dj["synthetic"]
        assert syn["scenario"] == "shift" and syn["site"] == k and syn["seed"] == 0
        sp = syn["site_params"]
        for key in ("spacing_zyx", "intensity_scale", "intensity_offset", "noise_std", "bias_field_amplitude",
                    "object_size_factor", "object_elongation", "gamma", "family"):
            assert key in sp
        assert sp["family"] == "ellipse"
        # recorded spacing is the one written into the images
        _, spacing = _read(os.path.join(root, n, "imagesTr", "case_0000_0000.nii.gz"))
        assert np.allclose(spacing[::-1], sp["spacing_zyx"])
    root, onames = organs2d
    fams = [json.load(open(os.path.join(root, n, "dataset.json")))["synthetic"]["site_params"]["family"]
            for n in onames]
    assert fams == ["ellipse", "rim", "bean", "ellipse"]


def test_image_types_and_shapes(shift2d, tmp_path):
    root, names = shift2d
    img = sitk.ReadImage(os.path.join(root, names[1], "imagesTr", "case_0003_0000.nii.gz"))
    lab = sitk.ReadImage(os.path.join(root, names[1], "labelsTr", "case_0003.nii.gz"))
    assert img.GetDimension() == 2 and img.GetSize() == (64, 64)
    assert img.GetPixelID() == sitk.sitkFloat32 and lab.GetPixelID() == sitk.sitkUInt8
    assert img.GetSpacing() == lab.GetSpacing()

    names3 = make_federated_datasets(first_id=110, num_sites=1, scenario="organs", dim=3, num_train=2, num_test=1,
                                     image_size=(20, 32, 36), raw_root=str(tmp_path))
    img = sitk.ReadImage(os.path.join(str(tmp_path), names3[0], "imagesTr", "case_0000_0000.nii.gz"))
    assert img.GetDimension() == 3 and img.GetSize() == (36, 32, 20)
    assert img.GetSpacing()[2] > img.GetSpacing()[0]


def test_determinism(tmp_path):
    kw = dict(first_id=150, num_sites=2, scenario="organs", dim=2, num_train=3, num_test=1, seed=7)
    a = make_federated_datasets(raw_root=str(tmp_path / "a"), **kw)
    b = make_federated_datasets(raw_root=str(tmp_path / "b"), **kw)
    c = make_federated_datasets(raw_root=str(tmp_path / "c"), **{**kw, "seed": 8})
    for na, nb, nc in zip(a, b, c):
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            for pa in _cases(str(tmp_path / "a" / na), sub):
                rel = os.path.relpath(pa, str(tmp_path / "a" / na))
                xa, sa = _read(pa)
                xb, sb = _read(os.path.join(str(tmp_path / "b" / nb), rel))
                xc, _ = _read(os.path.join(str(tmp_path / "c" / nc), rel))
                assert xa.dtype == xb.dtype and xa.tobytes() == xb.tobytes() and sa == sb
                if sub.startswith("images"):
                    assert not np.array_equal(xa, xc)
        ja = json.load(open(tmp_path / "a" / na / "dataset.json"))
        jb = json.load(open(tmp_path / "b" / nb / "dataset.json"))
        assert ja == jb


def _check_labels(labs, dim):
    n_tumour = 0
    structure = ndimage.generate_binary_structure(dim, dim)  # 8- / 26-neighbourhood
    for lab in labs:
        assert set(np.unique(lab).tolist()) <= {0, 1, 2}
        assert (lab == 1).sum() > 0
        tumour = lab == 2
        if tumour.any():
            n_tumour += 1
            # every tumour voxel and all its neighbours lie inside the organ: tumour is surrounded by organ
            assert not np.any(ndimage.binary_dilation(tumour, structure) & (lab == 0))
            # no tumour voxel on the image border
            assert not any(np.take(tumour, idx, axis=ax).any() for ax in range(dim) for idx in (0, -1))
    return n_tumour


def test_labels_and_tumour_inside_organ(shift2d, organs2d, tmp_path):
    total, with_tumour = 0, 0
    for root, names in (shift2d, organs2d):
        for n in names:
            _, labs = _site_arrays(os.path.join(root, n))
            total += len(labs)
            with_tumour += _check_labels(labs, 2)
    # tumour in most but not all cases (~85 %)
    assert 0.65 * total <= with_tumour < total

    names3 = make_federated_datasets(first_id=120, num_sites=3, scenario="organs", dim=3, num_train=3, num_test=0,
                                     raw_root=str(tmp_path))
    for n in names3:
        _, labs = _site_arrays(os.path.join(str(tmp_path), n))
        assert labs[0].shape == (32, 48, 48)
        _check_labels(labs, 3)


def test_tumour_and_organ_intensity_differ(shift2d):
    """Learnability sanity check: tumour brighter than organ, organ brighter than background."""
    root, names = shift2d
    for n in names:
        imgs, labs = _site_arrays(os.path.join(root, n))
        img, lab = np.stack(imgs), np.stack(labs)
        bg, organ, tumour = (img[lab == i].mean() for i in (0, 1, 2))
        sd = img[lab == 1].std()
        assert tumour - organ > 1.5 * sd and organ - bg > 1.5 * sd


def test_inverted_site_has_the_contrast_the_other_way(tmp_path):
    """An inverted site: tumour darker than organ, organ darker than background, even after nnU-Net's z-score;
    the anatomy (labels) is the same as without inversion."""
    root = str(tmp_path)
    kw = dict(first_id=150, num_sites=2, num_train=4, num_test=1, image_size=(32, 32))
    plain = make_federated_datasets(raw_root=os.path.join(root, "plain"), **kw)
    inverted = make_federated_datasets(raw_root=os.path.join(root, "inv"), inverted_sites=[1], **kw)
    for k in (0, 1):
        imgs, labs = _site_arrays(os.path.join(root, "inv", inverted[k]))
        _, ref_labs = _site_arrays(os.path.join(root, "plain", plain[k]))
        assert all(np.array_equal(a, b) for a, b in zip(labs, ref_labs))
        z = [(i - i.mean()) / i.std() for i in imgs]
        bg, organ, tumour = (np.concatenate([x[lab == c] for x, lab in zip(z, labs)]).mean() for c in (0, 1, 2))
        params = json.load(open(os.path.join(root, "inv", inverted[k], "dataset.json")))["synthetic"]["site_params"]
        assert params["contrast_inverted"] == (k == 1)
        if k == 1:
            assert tumour < organ < bg
        else:
            assert tumour > organ > bg
    with pytest.raises(ValueError, match="inverted_sites"):
        make_federated_datasets(raw_root=os.path.join(root, "bad"), inverted_sites=[2], **kw)
    assert not os.path.exists(os.path.join(root, "bad"))


def test_site_heterogeneity(shift2d):
    root, names = shift2d
    spacings, means, stds, params = [], [], [], []
    for n in names:
        imgs, _ = _site_arrays(os.path.join(root, n))
        _, sp = _read(os.path.join(root, n, "imagesTr", "case_0000_0000.nii.gz"))
        spacings.append(sp)
        all_px = np.concatenate([i.ravel() for i in imgs])
        means.append(all_px.mean())
        stds.append(all_px.std())
        params.append(json.load(open(os.path.join(root, n, "dataset.json")))["synthetic"]["site_params"])
        assert imgs[0].shape == (64, 64)  # identical pixel grid at every site
    assert len(set(spacings)) == len(names)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert abs(means[i] - means[j]) > 0.1 * max(means[i], means[j])
            assert abs(stds[i] - stds[j]) > 0.1 * max(stds[i], stds[j])
    for key in ("intensity_scale", "intensity_offset", "noise_std", "bias_field_amplitude", "object_size_factor"):
        assert len({p[key] for p in params}) == len(names), key


def test_exists_error_and_overwrite(tmp_path):
    root = str(tmp_path)
    kw = dict(first_id=130, num_sites=2, num_train=2, num_test=1, raw_root=root)
    names = make_federated_datasets(**kw)
    with pytest.raises(FileExistsError, match=names[0]):
        make_federated_datasets(**kw)
    # only the second folder exists: nothing must be written before raising
    other = str(tmp_path / "other")
    os.makedirs(os.path.join(other, "Dataset141_ShiftSite1"))
    with pytest.raises(FileExistsError, match="Dataset141_ShiftSite1"):
        make_federated_datasets(**{**kw, "first_id": 140, "raw_root": other})
    assert os.listdir(other) == ["Dataset141_ShiftSite1"]
    # overwrite replaces the content
    marker = os.path.join(root, names[0], "imagesTr", "stale_0000.nii.gz")
    open(marker, "w").close()
    assert make_federated_datasets(**kw, overwrite=True) == names
    assert not os.path.exists(marker)
    assert len(_cases(os.path.join(root, names[0]), "imagesTr")) == 2


@pytest.mark.parametrize("kwargs, bad", [({"scenario": "weird"}, "weird"), ({"dim": 4}, "4"),
                                         ({"num_sites": 0}, "0"), ({"num_train": 0}, "0")])
def test_value_errors(tmp_path, kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        make_federated_datasets(raw_root=str(tmp_path), **kwargs)
    assert os.listdir(str(tmp_path)) == []


def test_raw_root_from_env(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(RuntimeError, match="nnUNet_raw"):
        make_federated_datasets(num_train=1, num_test=0)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    names = make_federated_datasets(num_sites=1, num_train=1, num_test=0)
    assert os.path.isdir(os.path.join(str(tmp_path), names[0], "imagesTr"))


def test_nnunet_plan_and_preprocess(tmp_path):
    """nnU-Net's own fingerprint extraction, integrity check, planning and 2d preprocessing accept the sites,
    and two 'shift' sites (different spacing/intensities) get the same 2d patch size and network."""
    env = {"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "preprocessed"),
           "nnUNet_results": str(tmp_path / "results")}
    for p in env.values():
        os.makedirs(p)
    names = make_federated_datasets(first_id=161, num_sites=2, scenario="shift", dim=2, num_train=6, num_test=1,
                                    raw_root=env["nnUNet_raw"])
    argv = ["nnUNetv2_plan_and_preprocess", "-d", "161", "162", "-c", "2d", "-npfp", "1", "-np", "1",
            "--verify_dataset_integrity"]
    # nnUNetv2_plan_and_preprocess = extract_fingerprint (+ integrity check) + plan_experiment + preprocess
    code = ("import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
            f"plan_and_preprocess_entry as f; sys.argv = {argv!r}; f()")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env, "nnUNet_def_n_proc": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    plans = []
    for n in names:
        pre = os.path.join(env["nnUNet_preprocessed"], n)
        with open(os.path.join(pre, "nnUNetPlans.json")) as f:
            plans.append(json.load(f))
        cfg = plans[-1]["configurations"]["2d"]
        assert list(cfg["patch_size"]) == [64, 64]
        pre_files = os.listdir(os.path.join(pre, cfg["data_identifier"]))
        assert sorted(f for f in pre_files if f.endswith(".pkl")) == [f"case_{i:04d}.pkl" for i in range(6)]
    c0, c1 = (p["configurations"]["2d"] for p in plans)
    assert c0["spacing"] != c1["spacing"]  # different scanners ...
    assert c0["patch_size"] == c1["patch_size"]  # ... same network
    assert c0["architecture"] == c1["architecture"]
    assert c0["batch_size"] == c1["batch_size"]

"""Bad input is refused before training, with a message that names the site and the problem."""
import json
import os
import shutil

import pytest

from conftest import cli


def simulate_args(ids, trainer="nnUNetTrainerFedAvg"):
    return ["simulate", "-d", *ids, "-c", "2d", "-tr", trainer, "--rounds", "1", "--local-steps", "1",
            "--device", "cpu", "--no-progress"]


def assert_nothing_written(site_env):
    assert os.listdir(site_env["results"]) == []


@pytest.mark.parametrize("var", ["nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"])
def test_missing_nnunet_variable(site_env, capsys, monkeypatch, var):
    monkeypatch.delenv(var)
    code, _, err = cli(capsys, *simulate_args(site_env["ids"]))
    assert code == 2 and var in err and "not set" in err
    assert_nothing_written(site_env)


def test_unknown_dataset_id(site_env, capsys):
    code, _, err = cli(capsys, *simulate_args(site_env["ids"][:2] + ["987"]))
    assert code == 2 and "unknown dataset '987'" in err
    assert_nothing_written(site_env)


def test_unknown_trainer(site_env, capsys):
    code, _, err = cli(capsys, *simulate_args(site_env["ids"], trainer="nnUNetTrainerDoesNotExist"))
    assert code == 2 and "unknown trainer 'nnUNetTrainerDoesNotExist'" in err
    assert_nothing_written(site_env)


def test_trainer_lookup_agrees_with_nnunet(monkeypatch, tmp_path):
    """nnunet_fed imports its own trainers straight from their module; nnUNetv2_train's lookup (nnU-Net's package,
    then nnUNet_extTrainer) must find the same class, from the same file, for every one of them. Any other name goes
    through nnU-Net's lookup."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    import nnunet_fed
    from nnunet_fed.sites import find_trainer, nnunet_fed_trainer

    monkeypatch.setenv("nnUNet_extTrainer", nnunet_fed.trainer_folder())
    names = sorted(f[:-3] for f in os.listdir(nnunet_fed.trainer_folder()) if f.startswith("nnUNetTrainer"))
    assert len(names) >= 11
    for name in names:
        ours = find_trainer(name, require_federated=False)
        assert ours is nnunet_fed_trainer(name) and ours.__name__ == name
        theirs = recursive_find_trainer_class_by_name(name)
        # nnU-Net imported it from the trainer folder (module = file name; nnU-Net's own would be nnunetv2.*) and
        # it is the same class body on the same bases
        assert theirs.__name__ == name and theirs.__module__ == name and ours.__module__.endswith("." + name)
        assert theirs.__mro__[1:] == ours.__mro__[1:] and theirs.__doc__ == ours.__doc__
        assert sorted(theirs.__dict__) == sorted(ours.__dict__)
    assert nnunet_fed_trainer("nnUNetTrainer") is None and nnunet_fed_trainer("../sites") is None
    assert find_trainer("nnUNetTrainer", require_federated=False) is recursive_find_trainer_class_by_name(
        "nnUNetTrainer")
    # another folder first on nnUNet_extTrainer: nnU-Net's lookup decides, as nnUNetv2_train would
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([str(tmp_path), nnunet_fed.trainer_folder()]))
    assert nnunet_fed_trainer("nnUNetTrainerFedAvg") is None
    assert find_trainer("nnUNetTrainerFedAvg").__name__ == "nnUNetTrainerFedAvg"


def test_non_federated_trainer(site_env, capsys):
    code, _, err = cli(capsys, *simulate_args(site_env["ids"], trainer="nnUNetTrainer"))
    assert code == 2 and "not a federated trainer" in err
    assert_nothing_written(site_env)


def clone_site(site_env, new_id, mutate):
    """A copy of site 0's preprocessed folder under a new dataset ID, with its dataset.json changed."""
    src = os.path.join(site_env["env"]["nnUNet_preprocessed"], site_env["names"][0])
    name = f"Dataset{new_id}_Mismatch{new_id}"
    dst = os.path.join(site_env["env"]["nnUNet_preprocessed"], name)
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    for f in ("dataset.json", "nnUNetPlans.json", "dataset_fingerprint.json"):
        shutil.copy(os.path.join(src, f), dst)
    with open(os.path.join(dst, "dataset.json")) as f:
        dj = json.load(f)
    mutate(dj)
    with open(os.path.join(dst, "dataset.json"), "w") as f:
        json.dump(dj, f)
    return str(new_id), name


@pytest.mark.parametrize("new_id, key, mutate", [
    (291, "labels", lambda dj: dj["labels"].update({"metastasis": 3})),
    (292, "channel_names", lambda dj: dj.update(channel_names={"0": "CT"})),
    (293, "file_ending", lambda dj: dj.update(file_ending=".mha")),
])
def test_site_mismatch_named(site_env, capsys, new_id, key, mutate):
    bad_id, bad_name = clone_site(site_env, new_id, mutate)
    code, _, err = cli(capsys, *simulate_args(site_env["ids"][:2] + [bad_id]))
    assert code == 2
    assert f"site {bad_name}: {key} differ from site {site_env['names'][0]}" in err
    assert_nothing_written(site_env)


def test_missing_plans_named(site_env, capsys):
    bad_id, bad_name = clone_site(site_env, 294, lambda dj: None)
    os.remove(os.path.join(site_env["env"]["nnUNet_preprocessed"], bad_name, "nnUNetPlans.json"))
    code, _, err = cli(capsys, *simulate_args(site_env["ids"][:1] + [bad_id]))
    assert code == 2 and f"site {bad_name}: plans" in err and "nnUNetv2_plan_and_preprocess" in err
    assert_nothing_written(site_env)


def test_different_networks_named(site_env, capsys):
    """Sites whose plans give different networks cannot be averaged."""
    def smaller_net(plans):
        arch = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
        arch["features_per_stage"] = [f // 2 for f in arch["features_per_stage"]]
    bad_id, bad_name = clone_site(site_env, 295, lambda dj: None)
    plans_file = os.path.join(site_env["env"]["nnUNet_preprocessed"], bad_name, "nnUNetPlans.json")
    with open(plans_file) as f:
        plans = json.load(f)
    smaller_net(plans)
    plans["dataset_name"] = bad_name
    with open(plans_file, "w") as f:
        json.dump(plans, f)
    data_id = plans["configurations"]["2d"]["data_identifier"]
    shutil.copytree(os.path.join(site_env["env"]["nnUNet_preprocessed"], site_env["names"][0], data_id),
                    os.path.join(site_env["env"]["nnUNet_preprocessed"], bad_name, data_id))
    code, _, err = cli(capsys, *simulate_args(site_env["ids"][:1] + [bad_id]))
    assert code == 2 and f"site {bad_name}: parameter" in err and "plan them together" in err
    assert_nothing_written(site_env)


def test_bad_schedule(site_env, capsys):
    args = simulate_args(site_env["ids"])
    args[args.index("--rounds") + 1] = "0"
    code, _, err = cli(capsys, *args)
    assert code == 2 and "rounds" in err

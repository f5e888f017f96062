"""End-to-end: nnunet_fed simulate on real nnU-Net code paths, predict, evaluate, resume, rejected updates."""
import json
import os
import signal
import subprocess
import time

import numpy as np
import torch

from conftest import nnunet_fed_cmd, run_cli

FED_NAME = "DatasetFed_201_202_203"


def sim_args(site_env, rounds, local_steps, *extra):
    return nnunet_fed_cmd() + ["simulate", "-d", *site_env["ids"], "-c", "2d", "-tr", "nnUNetTrainerFedAvg",
                               "--rounds", str(rounds), "--local-steps", str(local_steps), "--val-steps", "1",
                               "--device", "cpu", *extra]


def global_fold(site_env):
    return os.path.join(site_env["results"], FED_NAME, "nnUNetTrainerFedAvg__nnUNetPlans__2d", "fold_0")


def read_metrics(site_env):
    path = os.path.join(global_fold(site_env), "federation_metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["network_weights"]


def test_simulate_predict_evaluate(site_env, tmp_path):
    env = site_env["env"]
    proc = run_cli(sim_args(site_env, 2, 3), env)
    assert "nnUNetv2_predict -d " + FED_NAME in proc.stdout

    # nnU-Net's results layout, per site and for the global model
    gfold = global_fold(site_env)
    global_ckpt = os.path.join(gfold, "checkpoint_final.pth")
    assert os.path.isfile(global_ckpt)
    for f in ("plans.json", "dataset.json"):
        assert os.path.isfile(os.path.join(os.path.dirname(gfold), f))
    gw = load_weights(global_ckpt)
    for name in site_env["names"]:
        site_fold = os.path.join(site_env["results"], name, "nnUNetTrainerFedAvg__nnUNetPlans__2d", "fold_0")
        sw = load_weights(os.path.join(site_fold, "checkpoint_final.pth"))
        assert sw.keys() == gw.keys()
        for k in gw:  # FedAvg: every site ends with the global parameters
            assert torch.equal(sw[k], gw[k]), k
        assert os.path.isfile(os.path.join(site_fold, "validation", "summary.json"))  # nnU-Net's final validation
        # nnU-Net's per-site outputs: progress.png (drawn once at the end) and checkpoint_best.pth (from a round state)
        assert os.path.getsize(os.path.join(site_fold, "progress.png")) > 1000
        best = torch.load(os.path.join(site_fold, "checkpoint_best.pth"), map_location="cpu", weights_only=False)
        assert best["network_weights"].keys() == gw.keys() and best["current_epoch"] in (1, 2)
        assert best["_best_ema"] is not None

    # per-round metrics: every site, every round
    rows = read_metrics(site_env)
    assert [r["round"] for r in rows] == [0, 1]
    for r in rows:
        assert set(r["sites"]) == set(site_env["names"]) and r["rejected"] == []
        for m in r["sites"].values():
            assert m["num_examples"] > 0 and m["seconds"] > 0 and m["local_steps"] == 3
            assert 0 <= m["pseudo_dice"] <= 1 and np.isfinite(m["train_loss"])
    assert os.path.getsize(os.path.join(gfold, "federation_progress.png")) > 1000

    # nnUNetv2_predict and nnUNetv2_evaluate_folder, unchanged, on the global model
    site = site_env["names"][0]
    raw = os.path.join(env["nnUNet_raw"], site)
    pred = str(tmp_path / "pred")
    penv = {**env, "nnUNet_extTrainer": run_cli(nnunet_fed_cmd() + ["trainer-path"], env).stdout.strip()}
    run_cli(["nnUNetv2_predict", "-i", os.path.join(raw, "imagesTs"), "-o", pred, "-d", FED_NAME,
             "-tr", "nnUNetTrainerFedAvg", "-c", "2d", "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1",
             "--disable_tta"], penv)
    assert len([f for f in os.listdir(pred) if f.endswith(".nii.gz")]) == len(os.listdir(os.path.join(raw, "labelsTs")))
    model = os.path.dirname(gfold)
    run_cli(["nnUNetv2_evaluate_folder", os.path.join(raw, "labelsTs"), pred, "-djfile",
             os.path.join(model, "dataset.json"), "-pfile", os.path.join(model, "plans.json"), "-np", "1"], penv)
    with open(os.path.join(pred, "summary.json")) as f:
        summary = json.load(f)
    assert set(summary["mean"]) == {"1", "2"}
    assert all(0 <= v["Dice"] <= 1 for v in summary["mean"].values())


def test_resume_after_kill_continues_from_last_round(site_env):
    """Kill the simulation mid-run; the same command resumes after the last completed round and ends
    with the weights an uninterrupted run produces (optimizer, LR position and RNG streams persisted)."""
    env = {**site_env["env"], "nnUNet_n_proc_DA": "0"}  # single-process augmentation: reproducible streams
    rounds = 4
    args = sim_args(site_env, rounds, 3, "--no-val", "--no-progress")

    proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(read_metrics(site_env)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_metrics(site_env)
    gfold = global_fold(site_env)
    from nnunet_fed.federation.records import load_server_state

    completed = load_server_state(gfold)["completed_rounds"]  # what was committed when the process died
    assert 1 <= completed < rounds and len(before) >= completed, "the run must be interrupted mid-way"
    assert not os.path.isfile(os.path.join(gfold, "checkpoint_final.pth"))

    resumed = run_cli(args, env)
    assert f"after round {completed}/{rounds}" in resumed.stdout
    after = read_metrics(site_env)
    assert [r["round"] for r in after] == list(range(rounds))
    assert after[:completed] == before[:completed]  # completed rounds are kept, not redone

    # the poly learning rate continued over the whole federated schedule
    site_fold = os.path.join(site_env["results"], site_env["names"][0], "nnUNetTrainerFedAvg__nnUNetPlans__2d",
                             "fold_0")
    ckpt = torch.load(os.path.join(site_fold, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    lrs = ckpt["logging"]["lrs"]
    np.testing.assert_allclose(lrs, [0.01 * (1 - r / rounds) ** 0.9 for r in range(rounds)], rtol=1e-6)
    assert len(ckpt["logging"]["train_losses"]) == rounds
    resumed_global = load_weights(os.path.join(gfold, "checkpoint_final.pth"))

    # the same run without interruption, written elsewhere
    straight = run_cli(args + ["--federation-name", "DatasetFed_straight"], env)
    assert "resuming" not in straight.stdout
    straight_global = load_weights(os.path.join(site_env["results"], "DatasetFed_straight",
                                                "nnUNetTrainerFedAvg__nnUNetPlans__2d", "fold_0",
                                                "checkpoint_final.pth"))
    for k in straight_global:
        torch.testing.assert_close(resumed_global[k], straight_global[k], rtol=1e-5, atol=1e-6)


def test_sites_share_one_copy_of_the_shared_weights(site_env, monkeypatch):
    """All sites' shared tensors live in one storage; local parameters and optimizer state stay per site,
    and a site's turn neither reads nor changes another site's local parameters."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    from nnunet_fed.federation.simulation import SimulationConfig, prepare, start_sites

    cfg = SimulationConfig(dataset_ids=site_env["ids"][:2], configuration="2d", trainer="nnUNetTrainerFedOAP",
                           rounds=2, local_steps=2, val_steps=1, device="cpu", progress=False)
    sites = list(start_sites(cfg, prepare(cfg), torch.device("cpu")))
    global_arrays = sites[0].trainer.get_shared_arrays()
    a, b = (s.trainer.plain_network.state_dict(keep_vars=True) for s in sites)
    shared, local = sites[0].trainer.shared_parameter_names(), sites[0].trainer.local_parameter_names()
    assert shared and local
    assert all(a[k].data_ptr() == b[k].data_ptr() for k in shared)
    assert not any(a[k].data_ptr() == b[k].data_ptr() for k in local)

    upd0 = sites[0].run_round(0, global_arrays)
    local0 = {k: a[k].detach().clone() for k in local}
    momentum0 = {id(p): st["momentum_buffer"].clone() for p, st in sites[0].trainer.optimizer.state.items()}
    upd1 = sites[1].run_round(0, global_arrays)
    for k in local:  # site 1's turn left site 0's local parameters alone
        torch.testing.assert_close(a[k], local0[k], rtol=0, atol=0)
    for p, st in sites[0].trainer.optimizer.state.items():  # and its momentum
        torch.testing.assert_close(st["momentum_buffer"], momentum0[id(p)], rtol=0, atol=0)
    opt_a, opt_b = (s.trainer.optimizer.state for s in sites)
    assert len(opt_a) == len(opt_b) > 0
    assert not {v["momentum_buffer"].data_ptr() for v in opt_a.values()} & {
        v["momentum_buffer"].data_ptr() for v in opt_b.values()}
    # both sites trained from the global weights: their updates differ from them and from each other
    k = next(iter(global_arrays))
    assert not np.array_equal(upd0.arrays[k], global_arrays[k]) and not np.array_equal(upd1.arrays[k], upd0.arrays[k])
    for s in sites:
        s.trainer.release_dataloaders()


NAN_TRAINER = '''
import numpy as np
from nnunet_fed.federation.trainer import nnUNetTrainerFederated


class nnUNetTrainerFedAvgBrokenSite(nnUNetTrainerFederated):
    """Test trainer: the second site sends NaN weights."""
    def on_round_end(self):
        update = super().on_round_end()
        if self.site_name.endswith("Site1"):
            first = next(iter(update.arrays))
            update.arrays[first][...] = np.nan
        return update
'''


def test_nan_update_is_rejected_and_named(site_env, tmp_path, monkeypatch):
    folder = tmp_path / "extra_trainers"
    folder.mkdir()
    (folder / "nnUNetTrainerFedAvgBrokenSite.py").write_text(NAN_TRAINER)
    monkeypatch.setenv("nnUNet_extTrainer", str(folder))
    from nnunet_fed.federation.simulation import SimulationConfig, simulate

    out = simulate(SimulationConfig(dataset_ids=site_env["ids"], configuration="2d",
                                    trainer="nnUNetTrainerFedAvgBrokenSite", rounds=1, local_steps=2, val_steps=1,
                                    device="cpu", final_validation=False, progress=False))
    rec = out["metrics"][0]
    bad = [n for n in site_env["names"] if n.endswith("Site1")][0]
    assert [r["site"] for r in rec["rejected"]] == [bad]
    assert "NaN" in rec["rejected"][0]["reason"] and bad in rec["rejected"][0]["reason"]
    assert set(rec["sites"]) == set(site_env["names"]) - {bad}
    gw = load_weights(out["global_checkpoint"])
    assert all(torch.isfinite(v).all() for v in gw.values() if v.is_floating_point())


def test_fedprox_pulls_towards_global(site_env):
    from nnunet_fed.federation.simulation import SimulationConfig, _make_trainer, prepare

    cfg = SimulationConfig(dataset_ids=site_env["ids"][:1], configuration="2d", device="cpu", fedprox_mu=0.5,
                           progress=False)
    cls = prepare(cfg)
    trainer = _make_trainer(cfg, cfg.site_names[0], cls, torch.device("cpu"))
    trainer.initialize()
    glob = trainer.get_shared_arrays()
    trainer.on_round_start({k: v - 1.0 for k, v in glob.items()})  # global reference = current - 1 after loading
    trainer.set_shared_arrays(glob)
    for p in trainer.plain_network.parameters():
        p.grad = torch.zeros_like(p)
    trainer._add_proximal_gradient(trainer.optimizer, (), {})
    for p in trainer.plain_network.parameters():  # grad = mu * (w - w_global) = 0.5 * 1
        torch.testing.assert_close(p.grad, torch.full_like(p, 0.5))

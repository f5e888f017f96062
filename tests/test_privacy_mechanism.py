"""Sample-level DP: exact per-case clipping on nnU-Net's networks, accounting against dp_accounting, budget
refusal, adaptive clipping, and the DP trainers end to end (nnunet_fed simulate, plain nnUNetv2_train)."""
import glob
import json
import os

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from conftest import cli, dp_accounting_epsilon, nnunet_fed_cmd, run_cli
from nnunet_fed.privacy import accountant as acct
from nnunet_fed.privacy.adaptive import AdaptiveClip
from nnunet_fed.privacy.dp_trainer import RELEASED_METRICS
from nnunet_fed.privacy.per_sample import CLIP_MARGIN, PerSampleClipper


def _net(arch, dim):
    conv = torch.nn.Conv2d if dim == 2 else torch.nn.Conv3d
    norm = torch.nn.InstanceNorm2d if dim == 2 else torch.nn.InstanceNorm3d
    kw = dict(conv_bias=True, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
              nonlin_kwargs={"inplace": True}, deep_supervision=True)
    if arch == "plain":
        return PlainConvUNet(1, 4, [4, 8, 16, 16], conv, 3, [1, 2, 2, 2], [2, 2, 2, 2], 3, [2, 2, 2], **kw)
    return ResidualEncoderUNet(1, 4, [4, 8, 16, 16], conv, 3, [1, 2, 2, 2], [1, 2, 2, 2], 3, [1, 1, 1], **kw)


def _loss(batch_dice):
    ws = np.array([1, 0.5, 0.25, 0.0])
    return DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False},
                                                 {}, weight_ce=1, weight_dice=1, ignore_label=None,
                                                 dice_class=MemoryEfficientSoftDiceLoss), ws / ws.sum())


def _case(arch, dim, batch, seed=0):
    torch.manual_seed(seed)
    net = _net(arch, dim).double()
    shape = (16, 16) if dim == 2 else (8, 16, 16)
    x = torch.randn(batch, 1, *shape, dtype=torch.float64)
    sizes = [shape]
    for _ in range(3):
        sizes.append(tuple(max(1, s // 2) if i or dim == 2 else s for i, s in enumerate(sizes[-1])))
    # targets at the deep-supervision resolutions the network outputs
    with torch.no_grad():
        outs = net(x)
    ys = [torch.randint(0, 3, (batch, 1, *o.shape[2:])).double() for o in outs]
    loss = _loss(batch_dice=True)

    def per_sample_losses(out, indices):
        return torch.stack([loss([o[j:j + 1] for o in out], [y[i:i + 1] for y in ys]) for j, i in enumerate(indices)])
    return net, x, ys, loss, per_sample_losses


CASES = [("plain", 2), ("res", 2), ("plain", 3), ("res", 3)]


def _count_paths(clipper):
    """Counts, per ``clipped_sum``, the layers whose norm took the ghost identity and those summed by the batched
    weight-gradient pass (the others reuse their kept per-case gradients)."""
    paths = {"ghost": 0, "ghost_layers": [], "batched": 0}
    ghost, batched = clipper._ghost_sq_norms, clipper._batched

    def counted_ghost(module, inp, grad):
        paths["ghost"] += 1
        paths["ghost_layers"].append(type(module).__name__)
        return ghost(module, inp, grad)

    def counted_batched(module, inp, grad):
        paths["batched"] += 1
        return batched(module, inp, grad)
    clipper._ghost_sq_norms, clipper._batched = counted_ghost, counted_batched
    return paths


@pytest.mark.parametrize("arch,dim", CASES)
def test_per_sample_gradients_are_exact(arch, dim):
    """Both strategies' clipped sums, norms and losses equal those of single-sample backward passes, each clipped
    (float64, L2 and L1), and leave the parameters' grad and requires_grad as they were."""
    batch = 3
    net, x, ys, loss, psl = _case(arch, dim, batch)
    for norm_type, clip in ((2.0, 0.05), (1.0, 5.0)):
        ref = {p: torch.zeros_like(p) for p in net.parameters()}
        ref_norms, ref_losses = [], []
        for i in range(batch):
            net.zero_grad(set_to_none=True)
            l = loss([o for o in net(x[i:i + 1])], [y[i:i + 1] for y in ys])
            l.backward()
            n = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]),
                                         ord=norm_type)
            ref_norms.append(n)
            ref_losses.append(l.detach())
            for p in net.parameters():
                if p.grad is not None:
                    ref[p] += p.grad * min(1.0, clip / (float(n) * (1 + CLIP_MARGIN)))
        assert float(min(ref_norms)) > clip  # the test clips every case
        sentinel = {p: torch.full_like(p, 7.0) for p in net.parameters()}
        for method in ("hooks", "loop"):
            for p in net.parameters():
                p.grad = sentinel[p]
            clipper = PerSampleClipper(net, norm_type=norm_type, method=method)
            paths = _count_paths(clipper)
            acc, norms, losses = clipper.clipped_sum(x, psl, clip)
            if method == "hooks":
                # the network takes every path of the hooks: ghost norms (L2 only; transposed convolutions
                # included), per-case gradients kept for the sum, and the batched weight-gradient pass
                n_layers = len(clipper.layers)
                assert 0 < paths["batched"] < n_layers and paths["ghost"] < n_layers - paths["batched"]
                assert ("ConvTranspose" in " ".join(paths["ghost_layers"])) == (norm_type == 2)
            torch.testing.assert_close(norms, torch.stack(ref_norms), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(losses, torch.stack(ref_losses), rtol=1e-12, atol=1e-12)
            for p in net.parameters():
                torch.testing.assert_close(acc.get(p, torch.zeros_like(p)), ref[p], rtol=1e-9, atol=1e-12)
                assert p.requires_grad and p.grad is sentinel[p] and bool((p.grad == 7.0).all())
                assert p not in acc or acc[p].data_ptr() != p.grad.data_ptr()


def test_strategy_choice():
    """"auto" takes the loop for one sample or large samples (3d_fullres patches) and the hooks for batches of
    small ones; unknown names are refused."""
    from nnunet_fed.privacy.per_sample import LOOP_MIN_VOXELS

    net = _net("plain", 3)
    auto = PerSampleClipper(net).method_for
    assert auto(torch.zeros(2, 1, 48, 64, 64)) == "loop"
    assert auto(torch.zeros(24, 1, 64, 64)) == "hooks" and auto(torch.zeros(1, 1, 64, 64)) == "loop"
    assert auto(torch.zeros(2, 3, LOOP_MIN_VOXELS)) == "loop"
    assert auto(torch.zeros(2, 3, LOOP_MIN_VOXELS - 1)) == "hooks"
    assert PerSampleClipper(net, method="hooks").method_for(torch.zeros(2, 1, 48, 64, 64)) == "hooks"
    with pytest.raises(ValueError, match="choose one of auto, hooks, loop"):
        PerSampleClipper(net, method="ghost")


@pytest.mark.parametrize("method", ["hooks", "loop"])
@pytest.mark.parametrize("arch,dim", CASES)
def test_a_case_contributes_at_most_the_clip_norm(arch, dim, method):
    """Removing one case changes the clipped sum by at most C (L2), and by at most C in L1 in Laplace mode."""
    batch = 4
    net, x, ys, loss, psl = _case(arch, dim, batch, seed=1)
    for norm_type, clip in ((2.0, 0.01), (1.0, 0.5)):
        clipper = PerSampleClipper(net, norm_type=norm_type, method=method)
        full, norms, _ = clipper.clipped_sum(x, psl, clip)
        assert float(norms.max()) > clip
        keep = [0, 1, 3]  # case 2 left out

        def psl_without(out, indices, keep=keep):
            return torch.stack([loss([o[j:j + 1] for o in out], [y[keep[i]:keep[i] + 1] for y in ys])
                                for j, i in enumerate(indices)])
        part, _, _ = clipper.clipped_sum(x[keep], psl_without, clip)
        diff = torch.cat([(full[p] - part.get(p, torch.zeros_like(p))).flatten() for p in full])
        size = float(diff.norm(p=norm_type))
        assert size <= clip * (1 + 1e-9)
        assert size > 0.5 * clip  # the bound is attained by a clipped case, not trivially small


def test_epsilon_matches_dp_accounting():
    """Opacus RDP and PRV (our accountants) against Google's dp_accounting RDP and PLD, heterogeneous history."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    history = [[1.1, 0.02, 400], [0.9, 0.02, 200], [1.5, 0.05, 100]]
    delta = 1e-5

    def event():
        return dp_accounting.ComposedDpEvent([
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), n) for s, q, n in history])
    orders = [1 + x / 20 for x in range(1, 200)] + list(range(12, 256))
    rdp = rdp_privacy_accountant.RdpAccountant(orders).compose(event()).get_epsilon(delta)
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4).compose(event()).get_epsilon(delta)
    ours_rdp = acct.epsilon(history, delta, "rdp")
    ours_prv = acct.epsilon(history, delta, "prv")
    assert abs(ours_rdp - rdp) / rdp < 0.01, (ours_rdp, rdp)
    assert abs(ours_prv - pld) / pld < 0.01, (ours_prv, pld)
    assert ours_prv < ours_rdp  # PRV is tighter than RDP's conversion


def test_calibration_meets_the_target_and_refuses_what_it_cannot():
    q, steps, rounds = 0.01, 100, 10
    for accountant in ("rdp", "prv"):
        sigma = acct.calibrate(4.0, 1e-5, q, steps, rounds, accountant)
        eps = acct.epsilon(acct.schedule_history([sigma] * rounds, q, steps), 1e-5, accountant)
        assert 0.97 * 4.0 <= eps <= 4.0
    # a decaying schedule: calibrated jointly over all rounds
    sigma0 = acct.calibrate(4.0, 1e-5, q, steps, rounds, "rdp", decay=0.9)
    eps = acct.epsilon(acct.schedule_history([sigma0 * 0.9 ** r for r in range(rounds)], q, steps), 1e-5)
    assert 0.99 * 4.0 <= eps <= 4.0 and sigma0 > sigma
    # Laplace: pure epsilon, Poisson amplification, basic composition
    b = acct.calibrate(8.0, 0.0, q, steps, rounds, mechanism="laplace")
    per_step = np.log1p(q * np.expm1(1 / b))
    assert 0.99 * 8.0 <= steps * rounds * per_step <= 8.0
    with pytest.raises(acct.BudgetError, match=r"cannot be met.*would reach epsilon [0-9.]+"):
        acct.calibrate(0.05, 1e-5, 0.5, 1000, 10, max_noise_multiplier=5.0)
    # adaptive clipping: the count query must leave budget for the gradient
    assert acct.effective_noise_multiplier(acct.gradient_noise_multiplier(1.2, 3.0), 3.0) == pytest.approx(1.2)
    with pytest.raises(acct.BudgetError, match="count_noise_multiplier"):
        acct.gradient_noise_multiplier(2.0, 0.9)


def test_adaptive_threshold_converges_to_the_target_quantile():
    """Fixed log-normal gradient norms: the noisy geometric update settles at the target quantile."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    n, q = 2000, 0.1
    norms = rng.lognormal(mean=0.0, sigma=1.0, size=n)
    for gamma in (0.3, 0.5, 0.8):
        ada = AdaptiveClip(initial=0.01, target_quantile=gamma, learning_rate=0.2, count_noise_multiplier=n * q / 20)
        clips = []
        for step in range(600):
            sampled = norms[rng.uniform(size=n) < q]
            ada.update(int((sampled <= ada.clip).sum()), len(sampled), n * q)
            clips.append(ada.clip)
        final = float(np.mean(clips[-200:]))
        assert abs(float((norms <= final).mean()) - gamma) < 0.03, (gamma, final)


# ---------------------------------------------------------------------- end to end on nnU-Net's code paths
def test_simulate_fedadp_end_to_end(site_env):
    env = {**site_env["env"], "nnUNet_n_proc_DA": "0"}
    rounds, steps = 2, 3
    run_cli(nnunet_fed_cmd() + ["simulate", "-d", *site_env["ids"], "-c", "2d", "-tr", "nnUNetTrainerFedADP",
                                "--rounds", str(rounds), "--local-steps", str(steps), "--val-steps", "1", "--device",
                                "cpu", "--no-val", "-o", "target_epsilon=8", "-o", "expected_batch_size=4",
                                "-o", "max_grad_norm=0.5", "-o", "public_plans=true", "--no-progress"], env)
    gfold = os.path.join(site_env["results"], "DatasetFed_201_202_203", "nnUNetTrainerFedADP__nnUNetPlans__2d", "fold_0")
    with open(os.path.join(gfold, "federation_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert [r["round"] for r in rows] == list(range(rounds))
    for name in site_env["names"]:
        eps = [r["sites"][name]["epsilon"] for r in rows]
        assert 0 < eps[0] < eps[1] <= 8.0
        # released: accounted values and what is computed from them only (the ledger's list)
        assert set(rows[0]["sites"][name]) <= set(RELEASED_METRICS) | {"num_examples"}
        clips = [r["sites"][name]["clip"] for r in rows]
        assert clips[0] != 0.5  # the adaptive threshold moved
        fold = os.path.join(site_env["results"], name, "nnUNetTrainerFedADP__nnUNetPlans__2d", "fold_0")
        with open(os.path.join(fold, "privacy_report.json")) as f:
            rep = json.load(f)
        assert rep["steps"] == rounds * steps and rep["adaptive_clip"] and rep["delta"] == 1e-5
        assert rep["epsilon"] == pytest.approx(eps[-1])
        # the total: the noisy case count and every step, reproduced by an independent accountant
        assert rep["epsilon"] == pytest.approx(acct.epsilon(rep["history"], rep["delta"], events=rep["events"]))
        assert rep["epsilon"] == pytest.approx(dp_accounting_epsilon(rep), rel=0.01)
        assert "num_training_cases" not in rep and rep["noisy_num_training_cases"] is not None
        # the accountant continued across rounds (state file per round): one history entry per step count
        assert sum(h[2] for h in rep["history"]) == rounds * steps
        assert rep["epsilon"] <= 8.0 and rep["planned_epsilon"] <= 8.0
        assert_outside_files_in_ledger(site_env, os.path.join(fold, "privacy_ledger.json"))


def _keys_of(path: str) -> set:
    """The names of what a file the simulation wrote holds (keys at every level that carries data)."""
    name = os.path.basename(path)
    if name.endswith(".png") or name == "plans.json":  # a drawing of the round metrics; the plans as a whole
        return set()
    if name.endswith(".jsonl"):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return {k for r in rows for k in r} | {k for r in rows for m in r["sites"].values() for k in m}
    if name.endswith(".json"):
        with open(path) as f:
            return set(json.load(f))
    obj = torch.load(path, map_location="cpu", weights_only=False)
    return set(obj) | set(obj.get("init_args", {}))


def assert_outside_files_in_ledger(site_env, ledger_path: str) -> None:
    """Every file the simulation wrote outside the sites' own folders, and every entry in it, is listed in the
    site's privacy ledger."""
    from nnunet_fed.privacy.ledger import PrivacyLedger

    listed = PrivacyLedger.load(ledger_path).released_names()
    sites = [os.path.join(site_env["results"], n) + os.sep for n in site_env["names"]]
    outside = [p for p in glob.glob(os.path.join(site_env["results"], "**", "*"), recursive=True)
               if os.path.isfile(p) and not any(p.startswith(s) for s in sites)]
    assert outside
    for path in outside:
        missing = ({os.path.basename(path)} | _keys_of(path)) - listed
        assert not missing, f"{path}: not in the privacy ledger: {sorted(missing)}"


def test_budget_refusal_names_the_epsilon(site_env, capsys, monkeypatch):
    """A target the schedule cannot meet, or one the single releases alone (here the case count) already spend,
    stops the run before its first step, saying which epsilon it would reach."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")

    def run(target, *extra):
        code, out, err = cli(capsys, "simulate", "-d", site_env["ids"][0], "-c", "2d", "-tr", "nnUNetTrainerFedDP",
                             "--rounds", "2", "--local-steps", "50", "--device", "cpu", "--no-val", "--no-progress",
                             "-o", f"target_epsilon={target}", "-o", "max_noise_multiplier=3",
                             "-o", "sampling_rate=0.5", "-o", "public_plans=true", *extra)
        assert code != 0
        return out + err

    out = run(0.3)  # the case count at its default noise costs 0.375 alone
    assert "cannot be met" in out and "case count) spends 0.37" in out
    out = run(0.5, "-o", "case_count_noise=1000")
    assert "cannot be met" in out and "would reach epsilon" in out
    assert not os.path.exists(os.path.join(site_env["results"], "DatasetFed_201", "nnUNetTrainerFedDP__nnUNetPlans__2d",
                                           "fold_0", "checkpoint_final.pth"))


def test_plain_nnunetv2_train_with_dp(site_env):
    """A federated trainer (here the DP one; every trainer shares the federated base) runs under plain
    nnUNetv2_train as a local, single-site run, with its options from nnUNet_fed_* variables and nnU-Net's final
    validation; its privacy report's epsilon is the accounted one."""
    env = {**site_env["env"], "nnUNet_fed_rounds": "1", "nnUNet_fed_local_steps": "2", "nnUNet_fed_val_steps": "1",
           "nnUNet_fed_noise_multiplier": "1.0", "nnUNet_fed_public_plans": "true", "nnUNet_n_proc_DA": "0"}
    env["nnUNet_extTrainer"] = run_cli(nnunet_fed_cmd() + ["trainer-path"], env).stdout.strip()
    run_cli(["nnUNetv2_train", site_env["ids"][0], "2d", "0", "-tr", "nnUNetTrainerDP", "-device", "cpu", "--npz"], env)
    fold = os.path.join(site_env["results"], site_env["names"][0], "nnUNetTrainerDP__nnUNetPlans__2d", "fold_0")
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))
    assert any(f.endswith(".npz") for f in os.listdir(os.path.join(fold, "validation")))  # --npz reached nnU-Net
    with open(os.path.join(fold, "privacy_report.json")) as f:
        rep = json.load(f)
    assert rep["steps"] == 2 and rep["noise_multiplier"] == 1.0 and not rep["adaptive_clip"]
    assert rep["epsilon"] == pytest.approx(acct.epsilon([[1.0, rep["sampling_rate"], 2]], 1e-5, events=rep["events"]))
    assert rep["epsilon"] == pytest.approx(dp_accounting_epsilon(rep), rel=0.01)


def test_sanitizer_noise_once_per_logical_step_and_empty_batch():
    """Physical batches accumulate into one clipped sum; the division is by the expected batch; an empty
    logical batch releases noise only."""
    from nnunet_fed.privacy.sanitizer import DPSanitizer

    net, x, ys, loss, psl = _case("plain", 2, 4, seed=2)
    clipper = PerSampleClipper(net)
    whole, _, _ = clipper.clipped_sum(x, psl, 0.02)

    def part(lo, hi):
        def losses(out, indices):
            return torch.stack([loss([o[j:j + 1] for o in out], [y[lo + i:lo + i + 1] for y in ys])
                                for j, i in enumerate(indices)])
        return x[lo:hi], losses
    sanitizer = DPSanitizer(clipper)
    out = sanitizer.step([part(0, 3), part(3, 4)], clip=0.02, noise_std=0.0, expected_batch=2.5)
    assert out["sampled"] == 4
    for p in clipper.parameters:
        torch.testing.assert_close(p.grad, whole[p] / 2.5)
    sanitizer.step([], clip=0.02, noise_std=0.3, expected_batch=2.5)
    g = torch.cat([p.grad.flatten() for p in clipper.parameters])
    assert float(g.std() * 2.5) == pytest.approx(0.3, rel=0.05)
    with pytest.raises(ValueError, match="L1 clipping"):
        DPSanitizer(clipper, "laplace")

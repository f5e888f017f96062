"""Mechanism options of sample-level DP: augmentation multiplicity (each case's augmented copies averaged before
clipping; De et al. 2022) and automatic clipping (per-case normalisation; Bu et al. 2023), on nnU-Net's networks
with both per-case gradient strategies, against single-case backward passes; their option checks; and a DP run of
nnunet_fed simulate with both."""
import json
import os

import pytest
import torch

from conftest import dp_accounting_epsilon, nnunet_fed_cmd, run_cli
from test_privacy_mechanism import _case
from nnunet_fed.privacy.per_sample import CLIP_MARGIN, PerSampleClipper

CASES = [("plain", 2), ("res", 3)]


def _reference(net, x, ys, loss, group, factor):
    """Sum over cases of factor(||g_i||) g_i, g_i the mean of the gradients of case i's copies (one single-sample
    backward pass per copy), and the per-case norms and mean losses."""
    ref = {p: torch.zeros_like(p) for p in net.parameters()}
    norms, losses = [], []
    for s in range(0, x.shape[0], group):
        mean = {p: torch.zeros_like(p) for p in net.parameters()}
        case_loss = 0.0
        for i in range(s, s + group):
            net.zero_grad(set_to_none=True)
            l = loss(list(net(x[i:i + 1])), [y[i:i + 1] for y in ys])
            l.backward()
            case_loss = case_loss + l.detach() / group
            for p in net.parameters():
                if p.grad is not None:
                    mean[p] += p.grad / group
        n = torch.linalg.vector_norm(torch.cat([g.flatten() for g in mean.values()]))
        for p in net.parameters():
            ref[p] += mean[p] * factor(float(n))
        norms.append(n)
        losses.append(case_loss)
    net.zero_grad(set_to_none=True)
    return ref, torch.stack(norms), torch.stack(losses)


#: float64; a batched backward pass sums in another order than single-sample passes (about 1e-9 relative)
EXACT = {"rtol": 1e-7, "atol": 1e-10}


@pytest.mark.parametrize("method", ["hooks", "loop"])
@pytest.mark.parametrize("arch,dim", CASES)
def test_multiplicity_averages_the_copies_before_clipping(arch, dim, method):
    """Two cases of three copies each: the clipped sum is that of the copies' mean gradient per case, clipped once
    (not each copy clipped and then averaged), and one case (all its copies) moves the sum by at most C."""
    group, clip = 3, 0.02
    net, x, ys, loss, psl = _case(arch, dim, 2 * group, seed=3)
    ref, ref_norms, ref_losses = _reference(net, x, ys, loss, group,
                                            lambda n: min(1.0, clip / (n * (1 + CLIP_MARGIN))))
    assert float(ref_norms.min()) > clip  # every case clipped
    clipper = PerSampleClipper(net, method=method)
    acc, norms, losses = clipper.clipped_sum(x, psl, clip, group=group)
    assert PerSampleClipper(net).method_for(x, group) == "loop"  # auto's pick with copies (benchmarks/dp_step.py)
    torch.testing.assert_close(norms, ref_norms, **EXACT)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-12, atol=1e-12)
    for p in net.parameters():
        torch.testing.assert_close(acc.get(p, torch.zeros_like(p)), ref[p], **EXACT)
    # clipping each copy and averaging is another (wrong for this option) result: the test tells them apart
    copies, _, _ = clipper.clipped_sum(x, psl, clip)
    other = sum(float(((copies[p] / group - ref[p]) ** 2).sum()) for p in ref if p in copies) ** 0.5
    assert other > 1e-3 * clip
    # one case's three copies left out: the sum moves by at most the clip
    first, _, _ = clipper.clipped_sum(x[group:], lambda out, idx: psl(out, range(idx.start + group,
                                                                                   idx.stop + group)),
                                      clip, group=group)
    diff = torch.cat([(acc[p] - first.get(p, torch.zeros_like(p))).flatten() for p in acc])
    assert 0.5 * clip < float(diff.norm()) <= clip * (1 + 1e-9)
    with pytest.raises(ValueError, match="not whole groups"):
        clipper.clipped_sum(x[:4], psl, clip, group=group)


@pytest.mark.parametrize("method", ["hooks", "loop"])
@pytest.mark.parametrize("arch,dim", CASES)
def test_automatic_clipping_normalises_every_case_within_the_clip(arch, dim, method):
    """clipping=automatic: each case contributes C g_i / (||g_i|| (1 + margin) + gamma), exactly; its norm is below
    C for any gradient size, and near C for gradients well above gamma (normalised, not only clipped)."""
    clip, gamma = 0.5, 0.01
    net, x, ys, loss, psl = _case(arch, dim, 4, seed=4)
    ref, ref_norms, _ = _reference(net, x, ys, loss, 1, lambda n: clip / (n * (1 + CLIP_MARGIN) + gamma))
    clipper = PerSampleClipper(net, method=method, clipping="automatic", stability=gamma)
    acc, norms, _ = clipper.clipped_sum(x, psl, clip)
    torch.testing.assert_close(norms, ref_norms, **EXACT)
    for p in net.parameters():
        torch.testing.assert_close(acc.get(p, torch.zeros_like(p)), ref[p], **EXACT)
    for i in range(4):  # each case alone: its contribution's norm
        one, n, _ = clipper.clipped_sum(x[i:i + 1], lambda out, idx, i=i: psl(out, range(i, i + 1)), clip)
        size = float(torch.cat([g.flatten() for g in one.values()]).norm())
        assert size <= clip
        assert size == pytest.approx(clip * float(n[0]) / (float(n[0]) * (1 + CLIP_MARGIN) + gamma), rel=1e-9)
        if float(n[0]) > 10 * gamma:
            assert size > 0.9 * clip  # normalised: a case with a gradient smaller than the clip is scaled up too
    with pytest.raises(ValueError, match="flat, automatic"):
        PerSampleClipper(net, clipping="median")


def test_options_are_checked_before_anything_runs():
    from nnunet_fed.privacy.accountant import BudgetError
    from nnunet_fed.privacy.dp_trainer import nnUNetTrainerDPBase

    with pytest.raises(BudgetError, match="no clip to adapt"):
        nnUNetTrainerDPBase.resolve_options({"clipping": "automatic", "adaptive_clip": "true"}, environ={})
    with pytest.raises(ValueError, match="not one of"):
        nnUNetTrainerDPBase.resolve_options({"clipping": "ghost"}, environ={})
    with pytest.raises(ValueError, match="augmentation_multiplicity must be >= 1"):
        nnUNetTrainerDPBase.resolve_options({"augmentation_multiplicity": "0"}, environ={})
    o = nnUNetTrainerDPBase.resolve_options({"augmentation_multiplicity": "4", "clipping": "automatic"}, environ={})
    assert o["augmentation_multiplicity"] == 4 and o["clipping"] == "automatic"


def test_tan_rule_chooses_a_batch_within_the_target_epsilon():
    """batch_rule=tan: the chosen (B, sigma) spends at most the target (reproduced by dp_accounting, with the
    case-count release), B is the smallest candidate within 10 % of the lowest sigma / B, and the rule does move
    away from nnU-Net's physical batch when that one is noise-dominated."""
    from nnunet_fed.privacy import accountant as acct
    from nnunet_fed.privacy.configuration import choose_expected_batch

    events = [["gaussian", 10.0, 1.0, 1]]  # the noisy case count, released once
    for target in (1.0, 8.0):
        r = choose_expected_batch(target, 1e-5, 1000.0, 12, 50, 20, max_expected_batch=256, events=events)
        sizes = [c["expected_batch_size"] for c in r["candidates"]]
        assert sizes == [12, 24, 48, 96, 192]
        history = acct.planned_schedule(r["noise_multiplier"], r["sampling_rate"], 50, 20)
        eps = dp_accounting_epsilon({"events": events, "history": history, "delta": 1e-5})
        assert eps <= target * 1.01 and eps >= 0.9 * target and r["epsilon"] <= target
        etas = [c["eta"] if c["eta"] is not None else float("inf") for c in r["candidates"]]
        best = min(etas)
        i = sizes.index(r["expected_batch_size"])
        assert etas[i] <= 1.1 * best and all(e > 1.1 * best for e in etas[:i])
        print(f"target epsilon {target:g}: " + ", ".join(f"B {c['expected_batch_size']:g} sigma "
                                                        f"{c['noise_multiplier'] or float('nan'):.3g} eta "
                                                        f"{c['eta'] or float('nan'):.3g}" for c in r["candidates"]))
        assert r["expected_batch_size"] > 12 and r["reason"].startswith("total amount of noise")


def test_configuration_reasons_name_public_settings_only():
    """The privacy report's configuration is released: its reasons (batch rule, noise, steps, learning rate) must be
    the same text for neighbouring noisy case counts, so every value computed from the count sits in a field of its
    own (which the neighbouring-datasets attack test accounts for by name), never inside the text."""
    from nnunet_fed.privacy.configuration import (choose_expected_batch, largest_batch_configuration,
                                                  schedule_configuration)

    events = [["gaussian", 10.0, 1.0, 1]]
    for noisy in ((1000.3, 999.3), (301.0, 300.0), (41.5, 40.5)):
        for conf in ([largest_batch_configuration(12, n, 256) for n in noisy],
                     [choose_expected_batch(8.0, 1e-5, n, 12, 8, 10, events=events) for n in noisy]):
            assert conf[0]["reason"] == conf[1]["reason"]
        a, b = (largest_batch_configuration(12, n, 256) for n in noisy)
        assert (a["expected_batch_size"], a["sampling_rate"]) != (b["expected_batch_size"], b["sampling_rate"])
    for user in (False, True):
        a, b = (schedule_configuration(sigma, 8.0, 10, 8, 5, 0.01, "rdp", user) for sigma in (3.21, 3.25))
        assert a["noise"]["noise_multiplier"] != b["noise"]["noise_multiplier"]
        assert all(a[k]["reason"] == b[k]["reason"] for k in ("noise", "steps", "learning_rate"))
        assert a["steps"]["total"] == 85


def test_default_rule_takes_the_largest_batch_within_the_target_epsilon():
    """The default (only target_epsilon set): B = min(max_expected_batch, N~/2), at least the physical batch; its
    calibrated sigma spends at most the target (reproduced by dp_accounting) and its sigma / B is the lowest of the
    tan rule's candidates, i.e. the default takes the least noise per averaged gradient the compute cap allows."""
    from nnunet_fed.privacy import accountant as acct
    from nnunet_fed.privacy.configuration import choose_expected_batch, largest_batch_configuration

    assert largest_batch_configuration(12, 30.0, 256)["expected_batch_size"] == 15
    assert largest_batch_configuration(12, 10.0, 256)["sampling_rate"] == 1.0  # small site: the physical batch
    assert largest_batch_configuration(12, -3.0, 256)["expected_batch_size"] == 12
    events = [["gaussian", 10.0, 1.0, 1]]
    for target, noisy, steps, rounds in ((1.0, 1000.0, 50, 20), (8.0, 300.0, 8, 10)):  # B = 256, and N~/2 = 150
        conf = largest_batch_configuration(12, noisy, 256)
        assert conf["expected_batch_size"] == min(256, noisy / 2) and conf["rule"] == "largest"
        sigma = acct.calibrate(target, 1e-5, conf["sampling_rate"], steps, rounds, events=events)
        history = acct.planned_schedule(sigma, conf["sampling_rate"], steps, rounds)
        eps = dp_accounting_epsilon({"events": events, "history": history, "delta": 1e-5})
        assert 0.9 * target <= eps <= target * 1.01
        tan = choose_expected_batch(target, 1e-5, noisy, 12, steps, rounds, max_expected_batch=256, events=events)
        etas = [c["eta"] for c in tan["candidates"] if c["eta"] is not None]
        assert sigma / conf["expected_batch_size"] <= min(etas) * 1.001, (sigma, etas)


def test_simulate_with_multiplicity_automatic_clipping_and_the_batch_rule(site_env):
    """A DP federation with four augmented copies per sampled case, automatic clipping and batch_rule=tan: it
    trains, the logical batches hold whole cases (the privacy report counts cases, not copies), the report says
    which batch the rule chose and why, and the epsilon is reproduced by dp_accounting."""
    env = {**site_env["env"], "nnUNet_n_proc_DA": "0"}
    rounds, steps = 1, 2
    run_cli(nnunet_fed_cmd() + ["simulate", "-d", *site_env["ids"][:2], "-c", "2d", "-tr", "nnUNetTrainerFedADP",
                                "--rounds", str(rounds), "--local-steps", str(steps), "--val-steps", "1", "--device",
                                "cpu", "--no-val", "-o", "target_epsilon=8", "-o", "batch_rule=tan",
                                "-o", "augmentation_multiplicity=4", "-o", "clipping=automatic",
                                "-o", "adaptive_clip=false", "-o", "public_plans=true", "--no-progress"], env)
    for name in site_env["names"][:2]:
        fold = os.path.join(site_env["results"], name, "nnUNetTrainerFedADP__nnUNetPlans__2d", "fold_0")
        with open(os.path.join(fold, "privacy_report.json")) as f:
            rep = json.load(f)
        assert rep["steps"] == rounds * steps and 0 < rep["epsilon"] <= 8.0
        assert rep["epsilon"] == pytest.approx(dp_accounting_epsilon(rep), rel=0.01)
        conf = rep["configuration"]
        assert conf["rule"] == "tan" and conf["expected_batch_size"] == rep["expected_batch_size"]
        assert conf["epsilon"] <= 8.0 and rep["clipping"] == "automatic" and rep["augmentation_multiplicity"] == 4
        assert conf["steps"]["total"] == rounds * steps and conf["noise"]["noise_multiplier"] == rep["noise_multiplier"]
        log = open(next(os.path.join(fold, f) for f in sorted(os.listdir(fold)) if f.startswith("training_log"))).read()
        assert "augmentation multiplicity 4" in log and "clipping automatic" in log, log[-2000:]

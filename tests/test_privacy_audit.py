"""Privacy audit: the one-run epsilon lower bound, canaries, and end-to-end audits of real nnU-Net training."""
import json
import math
import os

import numpy as np
import pytest

from nnunet_fed.privacy.audit import (accounted_privacy, epsilon_lower_bound, guesses_from_scores, p_value_dp,
                                      stamp_label_map, stamp_pattern, upsample_blocks, write_canary)


def test_perfect_guesses_match_closed_form():
    """delta = 0, every guess right: P[Bin(r, q) = r] = q^r = 1 - confidence gives eps = log(q / (1 - q))."""
    for r in (8, 32, 100):
        q = 0.05 ** (1.0 / r)
        assert epsilon_lower_bound(r, r, r, 0.0, 0.95) == pytest.approx(math.log(q / (1 - q)), rel=1e-6)
    assert epsilon_lower_bound(32, 32, 32, 0.0, 0.95) == pytest.approx(2.3214, abs=1e-3)


def test_bound_matches_binomial_tail():
    """Pure DP: the bound is where the upper binomial tail of v correct guesses crosses 1 - confidence."""
    from scipy import stats

    m, r, v = 200, 100, 80
    eps = epsilon_lower_bound(m, r, v, 0.0, 0.95)
    q = 1 / (1 + math.exp(-eps))
    assert stats.binom.sf(v - 1, r, q) == pytest.approx(0.05, rel=1e-4)


def test_bound_is_monotone_and_zero_for_chance():
    m = r = 100
    bounds = [epsilon_lower_bound(m, r, v, 1e-5) for v in range(40, 101, 5)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:])) and bounds[-1] > bounds[0]
    assert epsilon_lower_bound(m, r, 50, 1e-5) == 0.0  # half right: what random guessing gives
    assert epsilon_lower_bound(m, r, 58, 1e-5) == 0.0  # within chance at 95 %
    # more canaries, same accuracy: a higher bound; a larger delta or confidence: a lower / higher one
    assert epsilon_lower_bound(1000, 1000, 900, 1e-5) > epsilon_lower_bound(100, 100, 90, 1e-5)
    assert epsilon_lower_bound(100, 100, 95, 1e-2) < epsilon_lower_bound(100, 100, 95, 0.0)
    assert epsilon_lower_bound(100, 100, 95, 0.0, 0.99) < epsilon_lower_bound(100, 100, 95, 0.0, 0.9)


def test_random_guessing_rarely_exceeds_any_epsilon():
    """Scores independent of membership: the bound is 0 in (about) 95 % or more of trials."""
    rng = np.random.default_rng(0)
    m, trials = 64, 400
    positive = 0
    for _ in range(trials):
        members = rng.random(m) < 0.5
        r, v = guesses_from_scores(rng.normal(size=m), members)
        positive += epsilon_lower_bound(m, r, v, 1e-5) > 0
    assert positive / trials <= 0.08


def test_p_value_and_guess_checks():
    assert p_value_dp(10, 10, 0, 1.0, 0.0) == 1.0
    with pytest.raises(ValueError):
        p_value_dp(10, 12, 5, 1.0, 0.0)
    scores = [5, 4, 3, 2, 1, 0]
    assert guesses_from_scores(scores, [1, 1, 1, 0, 0, 0]) == (6, 6)
    assert guesses_from_scores(scores, [0, 0, 0, 1, 1, 1]) == (6, 0)
    assert guesses_from_scores(scores, [1, 0, 1, 0, 1, 0], num_guesses=2) == (2, 2)


def test_canary_stamp_and_label(tmp_path):
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    box, pattern = stamp_pattern((1, 32, 48), rng, blocks=4, fraction=0.5)
    assert box[0] == slice(0, 1) and pattern.shape == (1, 16, 24) and set(np.unique(pattern)) == {-1.0, 1.0}
    assert (pattern[0, :4, :6] == pattern[0, 0, 0]).all()  # 4 x 4 blocks of 4 x 6 voxels
    label_map = stamp_label_map((1, 16, 24), [1, 2], rng, blocks=4)
    assert label_map.shape == (1, 4, 4) and (label_map == 1).sum() == (label_map == 2).sum() == 8  # balanced
    img = np.random.default_rng(1).normal(100, 10, size=(32, 32)).astype(np.float32)
    seg = np.zeros((32, 32), np.uint8)
    seg[8:20, 8:20] = 1
    for arr, name in ((img, "img_0000.nii.gz"), (seg, "seg.nii.gz")):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / name))
    maps = set()
    for i in range(8):
        stamp = write_canary([str(tmp_path / "img_0000.nii.gz")], str(tmp_path / "seg.nii.gz"), str(tmp_path / f"c{i}"),
                             str(tmp_path / f"c{i}"), ".nii.gz", [0, 1, 2], rng)
        cimg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"c{i}_0000.nii.gz")))
        cseg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"c{i}.nii.gz")))
        box = tuple(slice(a, b) for a, b in stamp["box"])
        inside = np.zeros(img.shape, bool)
        inside[box] = True
        # the stamp: a box of +-3 std holding the (upsampled) label map; the rest of the case unchanged
        assert np.allclose(np.abs(cimg[inside] - img.mean()), 3 * img.std(), rtol=1e-4)
        assert (cimg[~inside] == img[~inside]).all() and (cseg[~inside] == seg[~inside]).all()
        assert (cseg[box] == upsample_blocks(np.array(stamp["label_map"]), cseg[box].shape)).all()
        assert stamp["choices"] == [1, 2] and set(np.unique(cseg[box])) == {1, 2}
        maps.add(str(stamp["label_map"]))
    assert len(maps) == 8  # a random label map per canary


def test_stamp_score_needs_the_label_map():
    """High only where the prediction follows the canary's own label map; a preference for one label over the
    whole stamp (what a model that never saw the canary may have) cancels out."""
    from nnunet_fed.privacy.audit import stamp_region, stamp_score

    rng = np.random.default_rng(0)
    source = np.zeros((1, 16, 16), np.int64)
    seg = source.copy()
    seg[0, 4:12, 4:12] = upsample_blocks(stamp_label_map((8, 8), [1, 2], rng, blocks=4), (8, 8))
    region = stamp_region(seg, source)
    assert region == (slice(0, 1), slice(4, 12), slice(4, 12))
    memorised = np.stack([np.zeros(seg.shape), 3.0 * (seg == 1), 3.0 * (seg == 2)])
    biased = np.stack([np.zeros(seg.shape), np.zeros(seg.shape), np.full(seg.shape, 5.0)])  # always label 2
    other = np.stack([np.zeros(seg.shape), 3.0 * (seg == 2), 3.0 * (seg == 1)])  # another canary's map
    assert stamp_score(memorised, seg, region, [1, 2]) == pytest.approx(3.0)
    assert stamp_score(biased, seg, region, [1, 2]) == pytest.approx(0.0)
    assert stamp_score(other, seg, region, [1, 2]) == pytest.approx(-3.0)
    assert stamp_region(source, source) is None


def _write_run(folder, site, client_dp=None, sample_epsilon=None, delta=1e-5):
    """A finished run as the audit reads it: the site's privacy_report.json (sample-level DP) and the server's
    federation_metrics.jsonl with a client_dp record per round (client-level DP), as the trainers write them."""
    from nnunet_fed.privacy.client_level import calibrate_noise_multiplier, client_level_epsilon

    site_fold, global_fold = folder / "site", folder / "global"
    site_fold.mkdir()
    global_fold.mkdir()
    if sample_epsilon is not None:
        (site_fold / "privacy_report.json").write_text(json.dumps({"epsilon": sample_epsilon, "delta": delta}))
    rows = []
    if client_dp is not None:
        target, q, rounds = client_dp
        z = calibrate_noise_multiplier(target, delta, q, rounds)
        for r in range(rounds):
            rows.append({"round": r, "sites": {site: {"num_examples": 12}},
                         "client_dp": {"epsilon": client_level_epsilon(z, q, r + 1, delta), "delta": delta,
                                       "rounds_accounted": r + 1, "noise_multiplier": z, "sample_rate": q,
                                       "clip": 1.0, "next_clip": 1.0}})
    (global_fold / "federation_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(site_fold), str(global_fold), rows


@pytest.mark.parametrize("target,q,rounds", [(8.0, 1.0, 20), (8.0, 1.0, 4), (2.0, 0.3, 10)])
def test_client_level_dp_bounds_a_case_at_half_the_noise_multiplier(tmp_path, target, q, rounds):
    """A case changes its site's clipped update from one vector of norm <= C to another (sensitivity 2C, not C)
    and flips its unclipped bit (1, not 1/2): the case-level epsilon is that of multiplier z / 2. Checked against
    Google's dp_accounting; measured: a run reported 8 for the site, 18.8 holds for a case."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    site = "Dataset201_A"
    site_fold, global_fold, rows = _write_run(tmp_path, site, client_dp=(target, q, rounds))
    dp = rows[-1]["client_dp"]
    got = accounted_privacy(site_fold, global_fold, site)
    half = dp_accounting.GaussianDpEvent(dp["noise_multiplier"] / 2)
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, half) if q < 1 else half,
                                              rounds)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))
    ref = RdpAccountant(orders).compose(event).get_epsilon(1e-5)
    assert got["epsilon"] == pytest.approx(ref, rel=0.01), (got, ref)
    from nnunet_fed.privacy.client_level import case_level_epsilon  # the same figure, for others to reuse

    assert got["epsilon"] == case_level_epsilon(dp["noise_multiplier"], q, rounds, 1e-5)
    assert got["epsilon"] > dp["epsilon"] and dp["epsilon"] <= target  # the site's figure is not a case's
    if (target, q) == (8.0, 1.0):
        assert got["epsilon"] == pytest.approx(18.8, abs=0.1)
    assert got["source"] == "client-level, case-level bound (sensitivity 2C)" and got["delta"] == 1e-5
    assert got["site_epsilon"] == dp["epsilon"]


def test_accounted_epsilon_is_the_tighter_of_sample_and_client_level(tmp_path):
    site = "Dataset201_A"
    for name, sample_eps in (("loose", 30.0), ("tight", 5.0)):
        (tmp_path / name).mkdir()
        got = accounted_privacy(*_write_run(tmp_path / name, site, client_dp=(8.0, 1.0, 20),
                                            sample_epsilon=sample_eps)[:2], site)
        if sample_eps > 18.9:
            assert got["source"].startswith("client-level") and 18.7 < got["epsilon"] < 18.9
        else:
            assert got["source"].startswith("sample-level") and got["epsilon"] == sample_eps
    (tmp_path / "none").mkdir()
    assert accounted_privacy(*_write_run(tmp_path / "none", site)[:2], site)["epsilon"] is None


def test_report_gives_p_value_and_false_alarm_probability(tmp_path):
    """The verdict is a test: its p-value under the accounted (epsilon, delta) and its false-alarm probability
    (1 - confidence) are reported, and the text says what a bound above or below the accounted epsilon means."""
    from nnunet_fed.privacy.audit import check_accounting, format_report

    site = "Dataset201_A"
    privacy = accounted_privacy(*_write_run(tmp_path, site, sample_epsilon=1.0)[:2], site)
    assert privacy["epsilon"] == 1.0 and privacy["delta"] == 1e-5
    m = r = 32
    common = {"trainer": "nnUNetTrainerFedDP", "site": site, "canaries": m, "members": 16, "guesses": r,
              "mean_member_score": 0.1, "mean_nonmember_score": 0.0, "report_file": "audit_report.json"}
    for v, confidence in ((31, 0.95), (20, 0.95), (31, 0.99)):
        verdict = check_accounting(m, r, v, privacy, confidence=confidence, delta=1e-3)
        assert verdict["delta"] == 1e-5  # the run's delta, not the fallback
        assert verdict["p_value"] == pytest.approx(p_value_dp(m, r, v, 1.0, 1e-5))
        assert verdict["false_alarm_probability"] == pytest.approx(1 - confidence)
        assert verdict["epsilon_lower_bound"] == epsilon_lower_bound(m, r, v, 1e-5, confidence)
        assert verdict["consistent"] == (verdict["epsilon_lower_bound"] <= 1.0)
        # the bound passes the accounted epsilon exactly when that many correct guesses are that unlikely
        assert verdict["consistent"] == (verdict["p_value"] >= 1 - confidence)
        assert verdict["largest_possible_bound"] == epsilon_lower_bound(m, r, r, 1e-5, confidence)
        text = format_report({**common, **verdict, "correct": v, "confidence": confidence})
        assert f"p-value {verdict['p_value']:.3g}" in text
        assert f"at most {1 - confidence:.0%}" in text and "does not prove" in text
        assert ("WARNING" in text) != verdict["consistent"]
    assert not check_accounting(m, r, 31, privacy)["consistent"]
    assert check_accounting(m, r, 20, privacy)["consistent"]
    # without DP there is nothing to test: no p-value, the bound alone
    none = check_accounting(m, r, 31, {"epsilon": None, "delta": None, "source": "no differential privacy"},
                            delta=1e-5)
    assert none["p_value"] is None and none["consistent"] and none["delta"] == 1e-5
    text = format_report({**common, **none, "correct": 31, "confidence": 0.95})
    assert "none (no differential privacy)" in text and "p-value" not in text


AUDIT_TRAINING = ["--rounds", "24", "--local-steps", "25"]


def _audit(site_env, tmp_path, name, *extra):
    from conftest import nnunet_fed_cmd, run_cli

    out = str(tmp_path / f"{name}.json")
    env = {**site_env["env"], "nnUNet_n_proc_DA": "0"}
    run_cli(nnunet_fed_cmd() + ["audit", "-d", site_env["ids"][0], "-c", "2d", "--canaries", "32",
                                "--device", "cpu", "--no-progress", "--output", out, *extra], env, timeout=1800)
    with open(out) as f:
        return json.load(f)


def test_audit_of_non_private_training_shows_leakage(site_env, tmp_path):
    """Measured: 30 of 32 guesses correct, lower bound 1.49 (24 rounds x 25 steps on the 12-case fixture site; 16
    rounds gave 24 of 32, 0.38)."""
    rep = _audit(site_env, tmp_path, "plain", "--audit-id", "980", *AUDIT_TRAINING)
    assert rep["accounted_epsilon"] is None and rep["canaries"] == 32
    # the canaries the model trained on are the ones it fits: a clearly positive lower bound
    assert rep["mean_member_score"] > rep["mean_nonmember_score"]
    assert rep["epsilon_lower_bound"] > 0.5, rep["epsilon_lower_bound"]
    # excluded canaries never reached the training data
    pre = os.path.join(site_env["env"]["nnUNet_preprocessed"], rep["audit_dataset"])
    with open(os.path.join(pre, "splits_final.json")) as f:
        train = set(json.load(f)[0]["train"])
    for c in rep["canary_table"]:
        assert (c["id"] in train) == c["member"]


def test_audit_of_client_level_dp_stays_below_accounted_epsilon(site_env, tmp_path):
    """Client-level DP at epsilon 0.5 for the site: a case is accounted about 1.05 (multiplier z / 2), below what
    32 canaries can show (2.32 at 95 %), so leakage beyond the accounting would fail here (a correct mechanism
    fails with probability at most 5 %)."""
    from nnunet_fed.privacy.client_level import case_level_epsilon

    rep = _audit(site_env, tmp_path, "clientdp", "--audit-id", "981", "-tr", "nnUNetTrainerFedAvgClientDP",
                 "-o", "client_target_epsilon=0.5", "-o", "client_clip=1", "--rounds", "4", "--local-steps", "10")
    with open(os.path.join(rep["model"], "fold_0", "federation_metrics.jsonl")) as f:
        dp = [json.loads(line) for line in f][-1]["client_dp"]
    assert rep["site_epsilon"] == dp["epsilon"] <= 0.5
    assert rep["accounted_source"] == "client-level, case-level bound (sensitivity 2C)"
    assert rep["accounted_epsilon"] == pytest.approx(
        case_level_epsilon(dp["noise_multiplier"], dp["sample_rate"], dp["rounds_accounted"], dp["delta"]))
    assert rep["site_epsilon"] < rep["accounted_epsilon"] < rep["largest_possible_bound"]  # the audit can refute it
    assert rep["false_alarm_probability"] == pytest.approx(0.05)
    assert rep["epsilon_lower_bound"] <= rep["accounted_epsilon"] and rep["consistent"]
    assert rep["p_value"] >= 0.05


DIVERGING_TRAINER = '''
import numpy as np
from nnunet_fed.federation.trainer import nnUNetTrainerFederated


class nnUNetTrainerFedAvgDiverging(nnUNetTrainerFederated):
    """Test trainer: local training diverges from the second round on (what heavy server noise can cause)."""
    def on_round_end(self):
        update = super().on_round_end()
        if self.current_epoch >= 2:  # nnU-Net's epoch counter: rounds done, this one included
            first = next(iter(update.arrays))
            update.arrays[first][...] = np.nan
        return update
'''


def test_audit_of_a_diverged_federation_audits_the_last_released_model(site_env, tmp_path):
    """A run whose every update becomes NaN (client-level noise can blow a one-site federation up) ends with the
    last committed global model, which is what was released: the audit scores that model and says how many rounds
    it saw, instead of failing."""
    folder = tmp_path / "extra_trainers"
    folder.mkdir()
    (folder / "nnUNetTrainerFedAvgDiverging.py").write_text(DIVERGING_TRAINER)
    env = {**site_env, "env": {**site_env["env"], "nnUNet_extTrainer": str(folder)}}
    rep = _audit(env, tmp_path, "diverged", "--audit-id", "982", "--canaries", "8", "-tr",
                 "nnUNetTrainerFedAvgDiverging", "--rounds", "3", "--local-steps", "2")
    assert rep["rounds"] == 3 and rep["rounds_completed"] == 1
    assert "no valid update" in rep["stopped"] and "NaN" in rep["stopped"]
    assert len(rep["canary_table"]) == 8 and all(np.isfinite(c["score"]) for c in rep["canary_table"])
    with open(os.path.join(rep["model"], "fold_0", "federation_metrics.jsonl")) as f:
        assert [json.loads(line)["round"] for line in f] == [0]
    from nnunet_fed.privacy.audit import format_report

    assert "training ended after 1 of 3 rounds" in format_report(rep)

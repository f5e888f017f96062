"""Client-level DP (DP-FedAvg with adaptive clipping): clipping bound, noise, adaptive clip, accountant, end to end."""
import json
import math
import os

import numpy as np
import pytest

from nnunet_fed.federation.aggregation import FedAvg
from nnunet_fed.federation.update import Update
from nnunet_fed.privacy.client_level import ClientLevelDP, calibrate_noise_multiplier, client_level_epsilon

SHAPES = {"a.weight": (4, 3), "b.bias": (5,)}


def global_arrays(value=0.0):
    return {k: np.full(s, value, dtype=np.float32) for k, s in SHAPES.items()}


def update_with_norm(site, norm, rng, base=None, num_examples=10):
    base = base if base is not None else global_arrays()
    d = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    scale = norm / math.sqrt(sum(float((v ** 2).sum()) for v in d.values()))
    return Update(site, {k: (base[k] + scale * d[k]).astype(np.float32) for k in SHAPES}, num_examples)


def flat(arrays):
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in SHAPES])


def make(z=1.0, clip=1.0, adaptive=False, seed=0, **kw):
    s = ClientLevelDP(FedAvg(), noise_multiplier=z, clip=clip, adaptive=adaptive, rng=np.random.default_rng(seed),
                      **kw)
    return s


def test_each_site_contributes_at_most_the_clip_norm():
    """With (almost) no noise, the new global moves by (sum of clipped deltas) / n: one site's share <= C / n."""
    rng = np.random.default_rng(1)
    clip, n = 0.5, 3
    for norm in (0.1, 0.5, 3.0, 100.0):
        s = make(z=1e-9, clip=clip, count_stddev=1.0)
        s.start(num_sites=n, rounds=1)
        g = global_arrays(0.25)
        upd = update_with_norm("site0", norm, rng, base=g, num_examples=1000)
        out = s.aggregate(g, [upd])
        moved = np.linalg.norm(flat(out) - flat(g))
        assert moved <= clip / n * (1 + 1e-5), (norm, moved)
        np.testing.assert_allclose(moved, min(norm, clip) / n, rtol=1e-4)
        # direction kept
        cos = np.dot(flat(out) - flat(g), flat(upd.arrays) - flat(g)) / (moved * norm)
        assert cos > 0.9999


def test_sites_weighted_equally_with_fixed_denominator():
    rng = np.random.default_rng(2)
    s = make(z=1e-9, clip=10.0)
    s.start(num_sites=4, rounds=1)  # 4 sites expected, 2 answer: the denominator stays 4
    g = global_arrays()
    u1, u2 = update_with_norm("a", 1.0, rng, num_examples=1), update_with_norm("b", 2.0, rng, num_examples=1000)
    out = s.aggregate(g, [u1, u2])
    np.testing.assert_allclose(flat(out), (flat(u1.arrays) + flat(u2.arrays)) / 4, atol=1e-6)
    assert [u.site for u in s.accepted] == ["a", "b"]


def test_noise_std_is_z_times_clip_over_n():
    z, clip, n = 1.3, 0.7, 3
    s = make(z=z, clip=clip, seed=3)
    s.start(num_sites=n, rounds=1)
    big = {k: np.zeros((200, 250), np.float32) for k in ("w",)}
    out = s.aggregate(big, [Update(f"s{i}", {"w": np.zeros((200, 250), np.float32)}, 5) for i in range(n)])
    std = float(out["w"].std())
    assert abs(std - z * clip / n) / (z * clip / n) < 0.01, std  # 50k samples: 1 % is > 3 standard errors
    assert abs(float(out["w"].mean())) < 4 * std / math.sqrt(out["w"].size)


def test_adaptive_clip_moves_to_target_quantile():
    """Updates with norms spread over [1, 10]: the clipping norm converges to their target quantile."""
    rng = np.random.default_rng(4)
    n, gamma = 50, 0.3
    norms = np.linspace(1.0, 10.0, n)
    s = make(z=1e-3, clip=0.1, adaptive=True, target_quantile=gamma, clip_lr=0.2, count_stddev=0.5, seed=5)
    s.start(num_sites=n, rounds=300)
    g = global_arrays()
    clips = []
    for _ in range(300):
        s.aggregate(g, [update_with_norm(f"s{i}", norms[i], rng, base=g) for i in range(n)])
        clips.append(s.clip)
    target = float(np.quantile(norms, gamma))
    final = float(np.mean(clips[-50:]))
    assert abs(final - target) / target < 0.1, (final, target)
    assert clips[0] > 0.1  # started below every norm: moved up
    rec = s.round_record()["client_dp"]
    assert abs(rec["noisy_unclipped_fraction"] - gamma) < 0.2


@pytest.mark.parametrize("z,q,rounds,delta", [(1.0, 1.0, 20, 1e-5), (2.5, 0.3, 100, 1e-5), (0.8, 0.1, 500, 1e-6)])
def test_epsilon_matches_dp_accounting(z, q, rounds, delta):
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    ours = client_level_epsilon(z, q, rounds, delta)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)) if q < 1
        else dp_accounting.GaussianDpEvent(z), rounds)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))
    ref = RdpAccountant(orders).compose(event).get_epsilon(delta)
    assert abs(ours - ref) / ref < 0.01, (ours, ref)


def test_calibration_meets_target_and_is_recorded_per_round():
    rounds = 10
    s = ClientLevelDP(FedAvg(), target_epsilon=8.0, target_delta=1e-5, clip=1.0, rng=np.random.default_rng(0))
    s.start(num_sites=3, rounds=rounds)
    assert s.noise_multiplier == calibrate_noise_multiplier(8.0, 1e-5, 1.0, rounds)
    assert 7.9 <= s.planned_epsilon <= 8.0
    assert calibrate_noise_multiplier(8.0, 1e-5, 1.0, rounds) > calibrate_noise_multiplier(8.0, 1e-5, 1.0, 2)
    rng = np.random.default_rng(1)
    eps = []
    for r in range(3):
        g = global_arrays()
        s.aggregate(g, [update_with_norm(f"s{i}", 1.0, rng) for i in range(3)])
        rec = s.round_record()["client_dp"]
        eps.append(rec["epsilon"])
        assert rec["rounds_accounted"] == r + 1
        assert rec["epsilon"] == pytest.approx(client_level_epsilon(rec["noise_multiplier"], 1.0, r + 1, 1e-5))
    assert eps[0] < eps[1] < eps[2] < 8.0


def test_bad_configurations_refused():
    with pytest.raises(ValueError, match="exactly one"):
        ClientLevelDP(FedAvg(), clip=1.0)
    with pytest.raises(ValueError, match="client_clip"):
        ClientLevelDP(FedAvg(), noise_multiplier=1.0, clip=0.0)
    with pytest.raises(ValueError, match="client_target_quantile"):
        ClientLevelDP(FedAvg(), noise_multiplier=1.0, target_quantile=1.5)
    s = ClientLevelDP(FedAvg(), noise_multiplier=4.0, count_stddev=1.0)
    with pytest.raises(ValueError, match="client_count_stddev"):
        s.start(num_sites=3, rounds=5)


def test_nan_update_rejected_not_clipped_in():
    rng = np.random.default_rng(6)
    s = make(z=1e-9, clip=1.0)
    s.start(num_sites=2, rounds=1)
    g = global_arrays()
    bad = update_with_norm("bad", 1.0, rng)
    bad.arrays["a.weight"][0, 0] = np.nan
    out = s.aggregate(g, [bad, update_with_norm("good", 0.5, rng)])
    assert [site for site, _ in s.rejected] == ["bad"] and np.isfinite(flat(out)).all()


def test_simulate_with_client_level_dp(site_env, capsys):
    """nnunet_fed simulate with the client-DP trainer: per-round epsilon in the metrics, as accounted."""
    from conftest import cli, nnunet_fed_cmd, run_cli

    rounds = 2
    run_cli(nnunet_fed_cmd() + ["simulate", "-d", *site_env["ids"], "-c", "2d", "-tr", "nnUNetTrainerFedAvgClientDP",
                                "--rounds", str(rounds), "--local-steps", "2", "--val-steps", "1", "--device", "cpu",
                                "--no-val", "-o", "client_target_epsilon=5", "-o", "client_clip=0.5"], site_env["env"])
    fold = os.path.join(site_env["results"], "DatasetFed_201_202_203",
                        "nnUNetTrainerFedAvgClientDP__nnUNetPlans__2d", "fold_0")
    with open(os.path.join(fold, "federation_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == rounds
    for r, row in enumerate(rows):
        dp = row["client_dp"]
        assert dp["expected_sites"] == 3 and dp["sample_rate"] == 1.0
        assert dp["epsilon"] == pytest.approx(client_level_epsilon(dp["noise_multiplier"], 1.0, r + 1, 1e-5))
    assert rows[0]["client_dp"]["clip"] == 0.5
    assert rows[1]["client_dp"]["clip"] == rows[0]["client_dp"]["next_clip"] != 0.5
    assert rows[-1]["client_dp"]["epsilon"] <= 5.0
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))

    # a bad option fails before training, naming it
    code, _, err = cli(capsys, "simulate", "-d", *site_env["ids"], "-c", "2d", "-tr", "nnUNetTrainerFedAvgClientDP",
                       "--rounds", "1", "--local-steps", "1", "--device", "cpu", "--federation-name", "DatasetFed_bad",
                       "-o", "client_clip=-1", "-o", "client_target_epsilon=5")
    assert code != 0 and "client_clip" in err
    assert not os.path.exists(os.path.join(site_env["results"], "DatasetFed_bad"))


# ---------------------------------------------------------------------- retries and the calibrated budget
class _Reply:
    """A site's reply as the Flower server reads it (content and error state)."""

    def __init__(self, update):
        from nnunet_fed.deployment import messages as msgs

        self.content = msgs.update_to_content(update)

    def has_error(self):
        return False


def _retry_server(tmp_path, strategy, sites, rounds, min_sites, missing):
    """The Flower ServerApp's own round loop (``FederationServer.serve`` / ``run_round``) over in-process sites:
    ``missing(round, attempt)`` names the sites whose reply does not arrive in that attempt (timed out)."""
    from nnunet_fed.deployment.runconfig import RunSettings
    from nnunet_fed.deployment.server_app import FederationServer

    rng = np.random.default_rng(11)

    class Template:
        def get_shared_arrays(self):
            return global_arrays(0.1)

    class Server(FederationServer):
        def __init__(self):  # no SuperLink, no plans: sites answer in-process
            self.run = RunSettings(rounds=rounds, min_sites=min_sites, round_retries=3, round_timeout=1.0,
                                   federation_name="DatasetFed_retry")
            self.poll, self.fold_dir, self.strategy = 0.0, str(tmp_path), strategy
            self.node_sites = {i: s for i, s in enumerate(sites)}
            self.refused, self.template, self.global_arrays = {}, Template(), None
            self.attempts, self.discarded = {}, []
            self.federation = "DatasetFed_retry-0"

        def wait_for_sites(self):
            return list(self.node_sites)

        def _exchange(self, content_by_node, message_type, group, timeout):
            r = int(group)
            attempt = self.attempts[r] = self.attempts.get(r, -1) + 1
            gone = set(missing(r, attempt))
            for node in content_by_node:
                site = self.node_sites[node]
                if site in gone:
                    yield node, None, f"no reply within {timeout:.0f} s"
                else:
                    yield node, _Reply(update_with_norm(site, 2.0, rng, base=self.global_arrays)), None

        def run_round(self, r):
            s = self.strategy
            before = (s.clip, s.rounds_done, json.dumps(s.rng.bit_generator.state))
            committed = super().run_round(r)
            if not committed:  # what the server discards must not have released or spent anything
                self.discarded.append((before, (s.clip, s.rounds_done, json.dumps(s.rng.bit_generator.state))))
            return committed

        def finish(self):
            return ""

    server = Server()
    server.serve()
    return server


def test_repeated_rounds_spend_no_privacy(tmp_path):
    """The retry attack: sites that time out in the first attempt of every round (fewer valid updates than
    min-sites), so the server repeats each round. Only committed rounds may be released and accounted: the
    spent epsilon stays within the target, and a restarted server (which reads the metrics) agrees with it."""
    from nnunet_fed.federation.records import MetricsLog

    rounds, target, sites = 4, 8.0, ["a", "b", "c"]
    s = ClientLevelDP(FedAvg(), target_epsilon=target, clip=1.0, rng=np.random.default_rng(0))
    server = _retry_server(tmp_path, s, sites, rounds, min_sites=3,
                           missing=lambda r, attempt: ["c"] if attempt == 0 else [])
    assert all(n == 1 for n in server.attempts.values())  # every round needed a second attempt
    assert len(server.discarded) == rounds
    for before, after in server.discarded:
        assert after == before, "a discarded attempt changed the clip, rounds_done or the noise generator"
    assert s.rounds_done == rounds
    assert s.epsilon <= target, f"spent epsilon {s.epsilon:.3f} passes the target {target}"
    rows = MetricsLog(str(tmp_path)).read()
    assert [row["client_dp"]["rounds_accounted"] for row in rows] == list(range(1, rounds + 1))
    assert rows[-1]["client_dp"]["epsilon"] == pytest.approx(s.epsilon)
    with open(tmp_path / "federation_server.log") as f:
        log = f.read()
    assert "2 valid site update(s), 3 needed" in log
    # a restarted server continues from the metrics: the same rounds, clip and epsilon as the server that ran them
    again = ClientLevelDP(FedAvg(), target_epsilon=target, clip=1.0)
    again.start(num_sites=3, rounds=rounds, history=rows, min_updates=3)
    assert (again.rounds_done, again.clip, again.epsilon) == (s.rounds_done, s.clip, s.epsilon)


def test_too_few_updates_release_nothing():
    from nnunet_fed.federation.aggregation import NoValidUpdates
    from nnunet_fed.privacy.client_level import TooFewUpdates

    rng = np.random.default_rng(7)
    s = make(z=1.0, clip=1.0, adaptive=True, count_stddev=1.0, seed=1)
    s.start(num_sites=4, rounds=3, min_updates=3)
    g = global_arrays()
    before = (s.clip, s.rounds_done, json.dumps(s.rng.bit_generator.state))
    with pytest.raises(TooFewUpdates, match=r"2 valid site update\(s\), 3 needed") as e:
        s.aggregate(g, [update_with_norm(x, 2.0, rng) for x in "ab"])
    assert isinstance(e.value, NoValidUpdates)  # what the server catches to repeat the round
    assert (s.clip, s.rounds_done, json.dumps(s.rng.bit_generator.state)) == before and s.round_record() == {}
    s.aggregate(g, [update_with_norm(x, 2.0, rng) for x in "abc"])
    assert s.rounds_done == 1 and s.clip != before[0]
    with pytest.raises(ValueError, match="min_updates"):
        s.start(num_sites=4, rounds=3, min_updates=0)
    with pytest.raises(ValueError, match="5 valid site updates"):
        s.start(num_sites=4, rounds=3, min_updates=5)


def test_round_beyond_calibrated_rounds_refused():
    """Calibrated for 2 rounds: a third would pass the target epsilon. It is refused before any update is read
    or any noise drawn, and not as a NoValidUpdates (the server would only repeat it)."""
    from nnunet_fed.federation.aggregation import NoValidUpdates

    rng = np.random.default_rng(8)
    s = ClientLevelDP(FedAvg(), target_epsilon=2.0, clip=1.0, rng=np.random.default_rng(0))
    s.start(num_sites=2, rounds=2)
    g = global_arrays()
    for _ in range(2):
        s.aggregate(g, [update_with_norm(x, 1.0, rng) for x in "ab"])
    assert s.epsilon <= 2.0
    state = json.dumps(s.rng.bit_generator.state)
    read = []

    def updates():
        for x in "ab":
            read.append(x)
            yield update_with_norm(x, 1.0, rng)

    with pytest.raises(Exception, match="calibrated for 2 round") as e:
        s.aggregate(g, updates())
    assert not isinstance(e.value, NoValidUpdates)
    assert read == [] and s.rounds_done == 2 and json.dumps(s.rng.bit_generator.state) == state
    assert s.epsilon <= 2.0
    # a fixed noise multiplier has no target to pass: more rounds are accounted as they come
    f = make(z=1.0)
    f.start(num_sites=2, rounds=1)
    for _ in range(2):
        f.aggregate(g, [update_with_norm(x, 1.0, rng) for x in "ab"])
    assert f.rounds_done == 2 and f.epsilon > f.planned_epsilon

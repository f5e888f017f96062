"""FedAvg math and update validation (no training needed)."""
import numpy as np
import pytest

from nnunet_fed.federation import FedAvg, SharingPolicy, Update, UpdateRejected, check_update
from nnunet_fed.federation.aggregation import NoValidUpdates, make_strategy


def ref():
    return {"a.weight": np.zeros((2, 3), np.float32), "b.bias": np.zeros(4, np.float32)}


def upd(site, value, n, **over):
    arrays = {"a.weight": np.full((2, 3), value, np.float32), "b.bias": np.full(4, value, np.float32)}
    arrays.update(over)
    return Update(site=site, arrays=arrays, num_examples=n, metrics={"train_loss": 1.0})


def test_example_weighted_average():
    out = FedAvg().aggregate(ref(), [upd("s1", 1.0, 10), upd("s2", 5.0, 30)])
    # (10 * 1 + 30 * 5) / 40 = 4
    np.testing.assert_allclose(out["a.weight"], 4.0)
    np.testing.assert_allclose(out["b.bias"], 4.0)
    assert out["a.weight"].dtype == np.float32


def test_equal_weights_is_plain_mean_and_order_free():
    rng = np.random.default_rng(0)
    ups = [Update(f"s{i}", {k: rng.normal(size=v.shape).astype(np.float32) for k, v in ref().items()}, 7)
           for i in range(4)]
    a = FedAvg().aggregate(ref(), ups)
    b = FedAvg().aggregate(ref(), list(reversed(ups)))
    for k in a:
        np.testing.assert_allclose(a[k], np.mean([u.arrays[k] for u in ups], 0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_updates_are_consumed_one_at_a_time():
    seen = []

    def gen():
        for i, v in enumerate([2.0, 4.0]):
            seen.append(i)
            yield upd(f"s{i}", v, 1)

    out = FedAvg().aggregate(ref(), gen())
    assert seen == [0, 1]
    np.testing.assert_allclose(out["a.weight"], 3.0)


@pytest.mark.parametrize("bad, message", [
    (dict(value=np.nan), "NaN/Inf"),
    (dict(value=np.inf), "NaN/Inf"),
    (dict(shape=True), "shape"),
    (dict(missing=True), "missing arrays"),
    (dict(extra=True), "unexpected arrays"),
    (dict(n=0), "num_examples"),
])
def test_bad_updates_rejected_and_named(bad, message):
    good = upd("good_site", 2.0, 10)
    if "value" in bad:
        broken = upd("bad_site", 1.0, 10)
        broken.arrays["a.weight"][0, 0] = bad["value"]
    elif "shape" in bad:
        broken = upd("bad_site", 1.0, 10, **{"b.bias": np.zeros(5, np.float32)})
    elif "missing" in bad:
        broken = upd("bad_site", 1.0, 10)
        del broken.arrays["b.bias"]
    elif "extra" in bad:
        broken = upd("bad_site", 1.0, 10, **{"adapter.weight": np.zeros(3, np.float32)})
    else:
        broken = upd("bad_site", 1.0, bad["n"])
    with pytest.raises(UpdateRejected, match=message) as e:
        check_update(broken, ref())
    assert "bad_site" in str(e.value)
    strategy = FedAvg()
    out = strategy.aggregate(ref(), [good, broken])
    np.testing.assert_allclose(out["a.weight"], 2.0)  # the bad update was not averaged in
    assert [s for s, _ in strategy.rejected] == ["bad_site"]
    assert [u.site for u in strategy.accepted] == ["good_site"]


def test_all_rejected_raises():
    broken = upd("s1", 1.0, 10)
    broken.arrays["a.weight"][:] = np.nan
    with pytest.raises(NoValidUpdates, match="s1"):
        FedAvg().aggregate(ref(), [broken])


def test_integer_buffers_rounded():
    r = {"n": np.zeros(1, np.int64)}
    out = FedAvg().aggregate(r, [Update("a", {"n": np.array([2])}, 1), Update("b", {"n": np.array([5])}, 1)])
    assert out["n"].dtype == np.int64 and out["n"][0] in (3, 4)


def test_sharing_policy_split():
    policy = SharingPolicy([r"adapter\.", r"decoder\.seg_layers\."])
    state = {"encoder.w": 1, "adapter.conv.w": 2, "decoder.seg_layers.0.w": 3, "decoder.stages.0.w": 4}
    shared, local = policy.split(state)
    assert set(shared) == {"encoder.w", "decoder.stages.0.w"}
    assert set(local) == {"adapter.conv.w", "decoder.seg_layers.0.w"}


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown aggregation strategy"):
        make_strategy("fedmagic")


# ------------------------------------------------------------------ Flower's rules (--strategy)
FLOWER_CASES = [("fedavgm", {"server_momentum": 0.9, "server_learning_rate": 1.0}),
                ("fedadam", {"eta": 0.01, "tau": 1e-3}), ("fedyogi", {"eta": 0.01, "tau": 1e-3}),
                ("fedadagrad", {"eta": 0.01, "tau": 1e-3}), ("fedmedian", {}), ("fedtrimmedavg", {"beta": 0.25}),
                ("krum", {"num_malicious_nodes": 1})]


def _flower_reference(name, options, rounds):
    """Flower's own strategy, fed every site's reply message, over ``rounds`` rounds of fixed updates."""
    import flwr.serverapp.strategy as fs
    from flwr.app import Array, ArrayRecord

    from nnunet_fed.federation.aggregation import FLOWER_RULES, _reply

    strategy = getattr(fs, FLOWER_RULES[name][0])(**options)
    current = {k: v.astype(np.float64) for k, v in ref().items()}
    for r, ups in enumerate(rounds, start=1):
        # what Flower's configure_train records before a round
        if name == "fedavgm" and strategy.current_arrays is None:
            strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in current.items()})
        if name in ("fedadam", "fedyogi", "fedadagrad"):
            strategy.current_arrays = dict(current)
        arrays, _ = strategy.aggregate_train(r, [_reply(i, u.arrays, u.num_examples) for i, u in enumerate(ups)])
        current = {k: arrays[k].numpy() for k in arrays.keys()}
    return current


@pytest.mark.parametrize("name,options", FLOWER_CASES)
def test_flower_rule_aggregates_like_flowers_own(name, options):
    rng = np.random.default_rng(1)
    rounds = [[Update(f"s{i}", {k: (rng.normal(size=v.shape) + 3 * (i == 3)).astype(np.float32)
                                for k, v in ref().items()}, int(n)) for i, n in enumerate((5, 9, 14, 3))]
              for _ in range(3)]
    expected = _flower_reference(name, options, rounds)
    strategy = make_strategy(name, {k: str(v) for k, v in options.items()})  # as parsed from the command line
    current = ref()
    for ups in rounds:
        current = strategy.aggregate(current, iter(ups))
        assert [u.site for u in strategy.accepted] == ["s0", "s1", "s2", "s3"]
    for k in expected:
        assert current[k].dtype == np.float32
        np.testing.assert_allclose(current[k], expected[k], rtol=1e-5, atol=1e-6)
    if name in ("fedavgm", "fedadam"):  # the rule is not the plain mean after the first round
        plain = FedAvg().aggregate(ref(), rounds[0])
        assert not np.allclose(current["a.weight"], plain["a.weight"])


def test_flower_rule_validates_updates_and_resumes_its_state():
    rng = np.random.default_rng(2)
    ups = lambda: [upd("s1", float(rng.normal()), 3), upd("s2", float(rng.normal()), 5)]  # noqa: E731
    bad = upd("s3", 1.0, 4, **{"b.bias": np.full(4, np.nan, np.float32)})
    for name, options in FLOWER_CASES:
        strategy = make_strategy(name, options)
        strategy.aggregate(ref(), ups() + [bad])
        assert strategy.rejected and strategy.rejected[0][0] == "s3" and "NaN" in strategy.rejected[0][1]
        assert [u.site for u in strategy.accepted] == ["s1", "s2"]
    # a server optimiser restarted from its saved state continues exactly as one that ran on
    first, second = ups(), ups()
    a = make_strategy("fedadam", {"eta": 0.01})
    g = a.aggregate(ref(), first)
    b = make_strategy("fedadam", {"eta": 0.01})
    b.load_state_dict(a.state_dict())
    continued, resumed = a.aggregate(g, list(second)), b.aggregate(g, list(second))
    fresh = make_strategy("fedadam", {"eta": 0.01}).aggregate(g, list(second))
    for k in continued:
        np.testing.assert_array_equal(continued[k], resumed[k])
    assert not np.allclose(continued["a.weight"], fresh["a.weight"])  # the moments made a difference


def test_flower_rule_options_and_client_dp_composition():
    with pytest.raises(ValueError, match="fedavgm.*no option 'eta'"):
        make_strategy("fedavgm", {"eta": 0.1})
    with pytest.raises(ValueError, match="not a number"):
        make_strategy("fedadam", {"eta": "fast"})
    with pytest.raises(ValueError, match="fedavg. has no options"):
        make_strategy("fedavg", {"eta": 0.1})
    from nnunet_fed.privacy.client_level import ClientLevelDP

    dp = lambda: ClientLevelDP(FedAvg(), noise_multiplier=1.0)  # noqa: E731
    with pytest.raises(ValueError, match="client-level DP"):
        make_strategy("fedmedian", None, dp())
    composed = make_strategy("fedavgm", {"server_momentum": 0.9}, dp())  # post-processing of the noisy mean
    assert composed.inner.__class__ is ClientLevelDP


def test_diagnose_records_update_norms_and_cosines():
    g = ref()
    ups = [upd("s1", 1.0, 1), upd("s2", 2.0, 1), upd("s3", -1.0, 2)]
    strategy = FedAvg(diagnose=True)
    out = strategy.aggregate(g, ups)
    geo = strategy.round_record()["update_geometry"]
    n = np.sqrt(10)  # 10 entries per update (6 + 4)
    np.testing.assert_allclose([geo["update_norm"][s] for s in ("s1", "s2", "s3")], [n, 2 * n, n])
    np.testing.assert_allclose(geo["cosine"]["s1|s2"], 1.0)
    np.testing.assert_allclose(geo["cosine"]["s1|s3"], -1.0)
    np.testing.assert_allclose(geo["first_conv_cosine"]["s2|s3"], -1.0)
    np.testing.assert_allclose(geo["mean_update_norm"], np.linalg.norm(out["a.weight"]) * np.sqrt(10 / 6), rtol=1e-6)
    assert FedAvg().aggregate(g, [upd("s1", 1.0, 1)]) and FedAvg().round_record() == {}

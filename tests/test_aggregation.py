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

"""Server-side aggregation: validation of site updates and example-weighted averaging.

One implementation serves ``nnunet_fed simulate`` and the Flower ServerApp. Updates are consumed one
at a time (the input may be a generator that trains the sites lazily), so memory holds the global
arrays and one running sum, not one update per site.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from nnunet_fed.federation.update import Update

log = logging.getLogger(__name__)


class UpdateRejected(ValueError):
    """An update that must not be averaged in. The message names the site and the problem."""


class NoValidUpdates(RuntimeError):
    """Every update of a round was rejected."""


def check_update(update: Update, reference: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`UpdateRejected` unless ``update`` matches ``reference`` (names, shapes) and is finite."""
    site = update.site
    if not isinstance(update.num_examples, (int, np.integer)) or update.num_examples <= 0:
        raise UpdateRejected(f"site {site!r}: num_examples must be a positive integer, got {update.num_examples!r}")
    sent, expected = set(update.arrays), set(reference)
    if sent - expected:
        extra = sorted(sent - expected)
        raise UpdateRejected(f"site {site!r}: unexpected arrays {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                             f"(not shared parameters of the global model; local parameters must stay at the site)")
    if expected - sent:
        missing = sorted(expected - sent)
        raise UpdateRejected(f"site {site!r}: missing arrays {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, ref in reference.items():
        arr = update.arrays[name]
        if not isinstance(arr, np.ndarray):
            raise UpdateRejected(f"site {site!r}: array {name!r} is a {type(arr).__name__}, not a numpy array")
        if arr.shape != ref.shape:
            raise UpdateRejected(f"site {site!r}: array {name!r} has shape {arr.shape}, expected {ref.shape}")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise UpdateRejected(f"site {site!r}: array {name!r} contains {bad} NaN/Inf values")


def valid_updates(updates: Iterable[Update], reference: Mapping[str, np.ndarray],
                  rejected: list) -> Iterable[Update]:
    """The updates that pass :func:`check_update`, one at a time; each other one is logged and appended to
    ``rejected`` as (site, reason)."""
    for update in updates:
        try:
            check_update(update, reference)
        except UpdateRejected as e:
            log.warning("rejected update: %s", e)
            rejected.append((update.site, str(e)))
            continue
        yield update


@dataclass
class SecureSum:
    """What secure aggregation (SecAgg+, :mod:`nnunet_fed.deployment.secure_aggregation`) reveals of a round: the
    weighted mean of the sites' updates, never one site's.

    ``mean_delta``: floating-point array name -> mean of (site's array - global array) over the contributing sites,
    weighted by their ``num_examples`` (client-level DP: equal weights, each delta already clipped at its site),
    float64. Arrays of other dtypes are not aggregated: they keep their global value.
    ``unclipped_fraction``: client-level DP only, the mean of the sites' unclipped bits. ``accepted``: per site the
    metadata the server sees in the clear (site, num_examples, scalar metrics; no arrays). ``rejected``: (site,
    reason) of sites that refused their own update (validation at the site) or dropped out."""

    mean_delta: dict[str, np.ndarray]
    accepted: list[Update]
    rejected: list[tuple[str, str]] = field(default_factory=list)
    unclipped_fraction: float | None = None


def no_valid_updates(rejected: list) -> NoValidUpdates:
    reasons = "; ".join(r for _, r in rejected) or "no site answered"
    return NoValidUpdates(f"no valid update this round: {reasons}")


class FedAvg:
    """Example-weighted federated averaging (McMahan et al. 2017).

    ``aggregate(global_arrays, updates)`` returns the new global arrays: the average of the accepted
    updates weighted by ``num_examples``. Rejected updates are logged with their reason and listed in
    ``self.rejected`` (site, reason) for the round. FedProx uses this same server rule; its proximal
    term lives in the site's optimizer.


    With ``diagnose`` it also records, per round, each accepted update's L2 norm (update = site's arrays minus
    the round's global arrays, floating-point arrays only), the cosine between every pair of site updates, between
    each update and the mean update, and the same cosines for the first convolution alone
    (:meth:`round_record`, ``update_geometry``). This holds every site's update in memory until the round ends.
    """

    name = "fedavg"

    def __init__(self, diagnose: bool = False):
        self.rejected: list[tuple[str, str]] = []
        self.accepted: list[Update] = []
        self.diagnose = bool(diagnose)
        self._geometry: dict | None = None

    def aggregate(self, global_arrays: Mapping[str, np.ndarray], updates: Iterable[Update]) -> dict[str, np.ndarray]:
        self.rejected, self.accepted = [], []
        total = 0.0
        acc: dict[str, np.ndarray] = {}
        deltas: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for update in valid_updates(updates, global_arrays, self.rejected):
            w = float(update.num_examples)
            if self.diagnose:
                deltas[update.site] = _flat_delta(update.arrays, global_arrays)
            for name, arr in update.arrays.items():
                if name in acc:
                    acc[name] += w * arr
                else:
                    acc[name] = w * arr.astype(np.float64)
            total += w
            # keep the metadata, drop the arrays: they are folded into the running sum
            self.accepted.append(Update(update.site, {}, update.num_examples, dict(update.metrics)))
            del update  # do not hold this site's arrays while the next site trains
        if not self.accepted:
            raise no_valid_updates(self.rejected)
        out = {}
        for name, ref in global_arrays.items():
            mean = acc[name] / total
            if np.issubdtype(ref.dtype, np.floating):
                out[name] = mean.astype(ref.dtype)
            else:  # integer buffers (e.g. counters): rounded weighted mean
                out[name] = np.rint(mean).astype(ref.dtype)
        self._geometry = _update_geometry(deltas, _flat_delta(out, global_arrays)) if self.diagnose else None
        return out

    def aggregate_secure(self, global_arrays: Mapping[str, np.ndarray], total: SecureSum) -> dict[str, np.ndarray]:
        """The new global arrays from a securely aggregated round: global + the weighted mean update (the same
        example-weighted FedAvg as :meth:`aggregate`, computed under the masks). Raises :class:`NoValidUpdates`
        when no site contributed."""
        if self.diagnose:
            raise ValueError("--diagnose needs each site's update, which secure aggregation does not reveal")
        self.rejected, self.accepted = list(total.rejected), list(total.accepted)
        if not self.accepted:
            raise no_valid_updates(self.rejected)
        self._geometry = None
        return add_mean_delta(global_arrays, total.mean_delta)

    def round_record(self) -> dict:
        """What the round's metrics line adds: the update geometry with ``diagnose``, else nothing."""
        return {"update_geometry": self._geometry} if self._geometry else {}


def add_mean_delta(global_arrays: Mapping[str, np.ndarray], mean_delta: Mapping[str, np.ndarray]) -> dict:
    """``global_arrays`` with ``mean_delta`` added to its floating-point arrays (in float64, cast back); arrays
    without a delta keep their value. Raises ``ValueError`` naming a delta whose shape differs."""
    out = {}
    for name, ref in global_arrays.items():
        if name in mean_delta and np.issubdtype(ref.dtype, np.floating):
            delta = np.asarray(mean_delta[name], np.float64)
            if delta.shape != ref.shape:
                raise ValueError(f"mean update of {name!r} has shape {delta.shape}, expected {ref.shape}")
            out[name] = (ref.astype(np.float64) + delta).astype(ref.dtype)
        else:
            out[name] = np.array(ref, copy=True)
    return out


def float_names(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The names of the floating-point arrays (the ones rounds average; integer buffers are kept as they are)."""
    return [k for k, v in arrays.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def _flat_delta(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]):
    """(all floating-point arrays minus the reference, the first convolution's), flattened in float64."""
    names = float_names(reference)
    first_conv = next((k for k in names if reference[k].ndim >= 3), names[0])
    diff = lambda k: (np.asarray(arrays[k], np.float64) - reference[k]).ravel()  # noqa: E731
    return np.concatenate([diff(k) for k in names]), diff(first_conv)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    n = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / n) if n > 0 else float("nan")


def _update_geometry(deltas: Mapping[str, tuple], mean: tuple) -> dict:
    sites = list(deltas)
    pairs = [(a, b) for i, a in enumerate(sites) for b in sites[i + 1:]]
    return {"update_norm": {s: float(np.linalg.norm(d[0])) for s, d in deltas.items()},
            "mean_update_norm": float(np.linalg.norm(mean[0])),
            "cosine_to_mean": {s: _cosine(d[0], mean[0]) for s, d in deltas.items()},
            "cosine": {f"{a}|{b}": _cosine(deltas[a][0], deltas[b][0]) for a, b in pairs},
            "first_conv_cosine": {f"{a}|{b}": _cosine(deltas[a][1], deltas[b][1]) for a, b in pairs}}


# ----------------------------------------------------------------------------------------- Flower's rules
#: ``--strategy`` name -> Flower strategy class (``flwr.serverapp.strategy``) and its kind: a *server optimiser*
#: applies Flower's update rule to the example-weighted mean of the round (FedAvgM: server momentum; FedAdam,
#: FedYogi, FedAdagrad: adaptive server optimisers, Reddi et al. 2021); a *robust* rule replaces the mean
#: (coordinate-wise median, Yin et al. 2018; trimmed mean; Krum, Blanchard et al. 2017).
FLOWER_RULES = {"fedavgm": ("FedAvgM", "optimiser"), "fedadam": ("FedAdam", "optimiser"),
                "fedyogi": ("FedYogi", "optimiser"), "fedadagrad": ("FedAdagrad", "optimiser"),
                "fedmedian": ("FedMedian", "robust"), "fedtrimmedavg": ("FedTrimmedAvg", "robust"),
                "krum": ("Krum", "robust")}
#: Flower constructor arguments a user may set (``--strategy-option name=value``); the rest (sampling fractions,
#: record keys, metric functions) belong to Flower's own round loop, which this project does not use
_FLOWER_SETTINGS = {"server_learning_rate", "server_momentum", "eta", "eta_l", "beta_1", "beta_2", "tau", "beta",
                    "num_malicious_nodes"}
_WEIGHT_KEY = "num-examples"


def _flower_strategy(name: str, options: Mapping | None):
    import inspect

    import flwr.serverapp.strategy as flwr_strategies

    cls = getattr(flwr_strategies, FLOWER_RULES[name][0])
    params = inspect.signature(cls.__init__).parameters
    allowed = sorted(k for k in params if k in _FLOWER_SETTINGS)
    kwargs = {}
    for key, value in (options or {}).items():
        if key not in allowed:
            raise ValueError(f"strategy {name!r} has no option {key!r}; its options are {allowed or 'none'}")
        default = params[key].default
        try:
            kwargs[key] = int(value) if isinstance(default, int) and not isinstance(default, bool) else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"strategy {name!r}: option {key}={value!r} is not a number") from None
    return cls(**kwargs)


def _reply(site_index: int, arrays: Mapping[str, np.ndarray], weight: float):
    """A Flower reply message holding ``arrays`` and the weight, as Flower's strategies read replies (the
    metadata are placeholders: no message is sent)."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.common import Metadata

    metadata = Metadata(run_id=0, message_id=str(site_index), src_node_id=site_index + 1, dst_node_id=0,
                        reply_to_message_id="", group_id="", created_at=0.0, ttl=1e9, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
                          "metrics": MetricRecord({_WEIGHT_KEY: float(weight)})})
    return Message(content, metadata=metadata)


def _flower_aggregate(strategy, server_round: int, replies: list) -> dict[str, np.ndarray]:
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.WARNING)  # Flower logs every aggregation at INFO
    try:
        arrays, _ = strategy.aggregate_train(server_round, replies)
    finally:
        flwr_log.setLevel(level)
    if arrays is None:
        raise NoValidUpdates(f"Flower's {type(strategy).__name__} returned no arrays")
    return {k: arrays[k].numpy() for k in arrays.keys()}


def _cast_like(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, ref in reference.items():
        value = np.asarray(arrays[name])
        out[name] = value.astype(ref.dtype) if np.issubdtype(ref.dtype, np.floating) else \
            np.rint(value).astype(ref.dtype)
    return out


class _Delegating:
    """Exposes the inner averaging strategy's round outcome (``accepted``, ``rejected``, ``round_record``,
    ``start``) to the drivers."""

    def __init__(self, inner):
        self.inner = inner

    @property
    def accepted(self):
        return self.inner.accepted

    @property
    def rejected(self):
        return self.inner.rejected

    def __getattr__(self, name):  # start(), round_record() of a client-level DP inner strategy
        if name in ("start", "round_record"):
            return getattr(self.inner, name)
        raise AttributeError(name)


class ServerOptimizer(_Delegating):
    """A Flower server optimiser (FedAvgM, FedAdam, FedYogi, FedAdagrad) on top of an averaging strategy.

    The inner strategy (:class:`FedAvg`, or client-level DP around it) validates every update and folds it
    into the example-weighted mean as it arrives; Flower's ``aggregate_train`` then gets that mean as its single
    reply (weight 1: Flower's weighted average of one reply is the reply) and applies its rule against the
    current global arrays, exactly what it does after averaging the individual replies itself. So updates are
    never all held at once, and client-level DP's noise is added before the optimiser (the optimiser is
    post-processing). The optimiser's state (momentum, first and second moments) is kept by
    :meth:`state_dict` / :meth:`load_state_dict` with the server's round state, so a resumed server continues it.
    """

    def __init__(self, name: str, inner, options: Mapping | None = None):
        super().__init__(inner)
        self.name = name
        self.flower = _flower_strategy(name, options)
        self.server_round = 0

    def aggregate(self, global_arrays: Mapping[str, np.ndarray], updates: Iterable[Update]) -> dict[str, np.ndarray]:
        return self._step(global_arrays, self.inner.aggregate(global_arrays, updates))

    def aggregate_secure(self, global_arrays: Mapping[str, np.ndarray], total: SecureSum) -> dict[str, np.ndarray]:
        """The optimiser's step on a securely aggregated round (the inner strategy's result, as in
        :meth:`aggregate`)."""
        return self._step(global_arrays, self.inner.aggregate_secure(global_arrays, total))

    def _step(self, global_arrays: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        current = {k: np.asarray(v, dtype=np.float64) for k, v in global_arrays.items()}
        self._set_current(current)
        self.server_round += 1
        new = _flower_aggregate(self.flower, self.server_round,
                                [_reply(0, {k: np.asarray(v, dtype=np.float64) for k, v in mean.items()}, 1.0)])
        return _cast_like(new, global_arrays)

    def _set_current(self, current: dict) -> None:
        """What Flower's ``configure_train`` records before a round: the arrays the round started from."""
        from flwr.app import Array, ArrayRecord

        if hasattr(self.flower, "momentum_vector"):  # FedAvgM keeps an ArrayRecord (and updates it itself)
            self.flower.current_arrays = ArrayRecord({k: Array(v) for k, v in current.items()})
        else:  # FedOpt family: a dict of numpy arrays
            self.flower.current_arrays = current

    _STATE = ("momentum_vector", "m_t", "v_t")

    def state_dict(self) -> dict:
        state = {"server_round": self.server_round}
        for key in self._STATE:
            value = getattr(self.flower, key, None)
            if value is not None:
                state[key] = list(value) if isinstance(value, list) else dict(value)
        return state

    def load_state_dict(self, state: Mapping) -> None:
        self.server_round = int(state.get("server_round", 0))
        for key in self._STATE:
            if key in state and hasattr(self.flower, key):
                setattr(self.flower, key, state[key])


class RobustRule(_Delegating):
    """A Flower robust aggregation rule (FedMedian, FedTrimmedAvg, Krum) in place of the weighted mean.

    Every update is validated first (:func:`check_update`, named reason); the accepted ones are handed to
    Flower's ``aggregate_train`` as reply messages. Unlike the mean, these rules need every update of the round
    at once, so the server holds all of them in memory. Not combinable with client-level DP, whose noise is
    calibrated to the sum of clipped updates."""

    def __init__(self, name: str, inner: "FedAvg", options: Mapping | None = None):
        if not isinstance(inner, FedAvg):
            raise ValueError(f"strategy {name!r} replaces the mean and cannot be combined with client-level DP "
                             f"(its noise is calibrated to the sum of clipped updates); use fedavg or one of "
                             f"{sorted(k for k, (_, kind) in FLOWER_RULES.items() if kind == 'optimiser')}")
        super().__init__(inner)
        self.name = name
        self.flower = _flower_strategy(name, options)
        self.server_round = 0

    def aggregate(self, global_arrays: Mapping[str, np.ndarray], updates: Iterable[Update]) -> dict[str, np.ndarray]:
        inner = self.inner
        inner.rejected, inner.accepted = [], []
        replies = []
        for update in valid_updates(updates, global_arrays, inner.rejected):
            replies.append(_reply(len(replies), update.arrays, update.num_examples))
            inner.accepted.append(Update(update.site, {}, update.num_examples, dict(update.metrics)))
        if not replies:
            raise no_valid_updates(inner.rejected)
        self.server_round += 1
        return _cast_like(_flower_aggregate(self.flower, self.server_round, replies), global_arrays)

    def state_dict(self) -> dict:
        return {"server_round": self.server_round}

    def load_state_dict(self, state: Mapping) -> None:
        self.server_round = int(state.get("server_round", 0))


STRATEGIES = ("fedavg", "fedprox", *FLOWER_RULES)


def make_strategy(name: str = "fedavg", options: Mapping | None = None, averaging=None):
    """The server's aggregation rule ``name`` (one of ``STRATEGIES``) over ``averaging`` (default: a fresh
    :class:`FedAvg`; client-level DP passes its wrapper). ``options`` are the Flower rule's settings.
    Raises ``ValueError`` naming the problem for an unknown rule or option."""
    key = str(name).lower()
    averaging = FedAvg() if averaging is None else averaging
    if key in ("fedavg", "fedprox"):  # FedProx: the server averages; its proximal term is in the site's optimizer
        if options:
            raise ValueError(f"strategy {name!r} has no options (got {sorted(options)})")
        return averaging
    if key not in FLOWER_RULES:
        raise ValueError(f"unknown aggregation strategy {name!r}; choose one of {list(STRATEGIES)}")
    rule = ServerOptimizer if FLOWER_RULES[key][1] == "optimiser" else RobustRule
    return rule(key, averaging, options)

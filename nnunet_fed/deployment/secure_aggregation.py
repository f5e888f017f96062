"""Secure aggregation of a round with Flower's SecAgg+ (Bell et al. 2020, "Secure single-server aggregation with
(poly)logarithmic complexity"): the server learns the sum of the sites' updates, never one site's update.

Flower 1.41 implements SecAgg+ as ``SecAggPlusWorkflow`` (server) and ``secaggplus_mod`` (ClientApp). The
workflow drives the legacy ``Strategy``/``FitIns``/``FitRes`` round through a ``LegacyContext``; this module runs
one such round from the ServerApp's own round loop (:func:`secure_round`: a ``LegacyContext`` whose strategy
hands out this round's ``FitIns`` and catches the unmasked sum) rather than re-implementing any of the protocol.

What the site does before its update is masked (:func:`secure_update`, where the site trains), because the server
can no longer look at one update:

- the checks the server makes on a plain update (:func:`nnunet_fed.federation.aggregation.check_update`: names,
  shapes, finite values); a site whose update fails them sends an error instead and counts as dropped out;
- its update becomes a delta (site array - global array) of the floating-point arrays; FedAvg weights it by the
  site's ``num_examples`` (the mask covers the weighted delta and the weight);
- under client-level DP the site clips its delta to the server's current clip and appends its unclipped bit
  (:func:`nnunet_fed.privacy.client_level.clip_update`), with weight 1: the sum is then what the server noises.

Quantisation: SecAgg+ works on integers modulo 2**32. Every value is clipped to [-R, R] and stochastically rounded
to ``Q`` levels; the sum of ``n`` sites is then exact to within ``n`` steps of ``2 R / Q`` (divided by the sum of
weights for the mean). Here ``Q`` is the largest power of two with ``n * Q`` below the modulus (2**30 for 3 sites),
``R`` is ``secagg-clip-range`` (default 8, Flower's) or, under client-level DP, max(clip, 1), so nothing is
clipped. A site refuses to send an update with a value outside [-R, R] (it would be clipped silently) and a
weight above ``secagg-max-weight``.

What the server still learns, in the clear: which sites took part in the round and which dropped out; each site's
``num_examples`` and scalar metrics (train loss, pseudo Dice, timings), as in a plain round; the weighted mean
update (client-level DP: the un-noised sum of clipped updates and the unclipped count, before it adds noise).
SecAgg+ protects one round: a server that repeats a round with a subset of the same sites (a site re-sends the
same update for a repeated round) could subtract two sums. Up to ``threshold - 1`` sites colluding with the server
learn nothing more; the threshold is a majority of the round's sites.
"""
from __future__ import annotations

import json
import math
from typing import Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from nnunet_fed.deployment import messages as msgs

#: run-config / round-config keys
SECURE = "secure-aggregation"
CLIP_RANGE = "secagg-clip-range"
MAX_WEIGHT = "secagg-max-weight"
NAMES = "names"
CLIENT_DP_CLIP = "client-dp-clip"
METRICS_JSON = "metrics-json"
MODULUS = 2 ** 32
#: the unclipped bit of client-level DP, appended after the deltas
BIT = "__unclipped_bit__"


#: what a site's SecAgg+ replies carry (``secaggplus_mod``'s entries and the FitRes layout of :func:`fitres_content`),
#: as the privacy ledger of a DP site lists them: (quantity, fields, how it relates to the site's data)
SITE_RELEASES = (
    ("masked update: the quantised weighted delta plus pairwise and private masks (only the sum of the round's "
     "sites is unmasked), with the FitRes status, weight and round metrics",
     ["masked_params", "code", "message", "num_examples", METRICS_JSON],
     "post-processing of the releases above (the round update, the noisy case count, the released round metrics)"),
    ("key agreement and secret sharing: two fresh public keys per round, the site's secrets (mask seed, secret key) "
     "in shares encrypted for each other site, and at unmasking the shares of other sites' secrets it holds",
     ["pk1", "pk2", "dsts", "ctxts", "nids", "shares"],
     "independent of the site's data (fresh random keys and secrets, and their shares)"),
)


class SecureAggregationError(ValueError):
    """A site's update that cannot be securely aggregated as it is (out of range, too heavy); names the site."""


def quantization_levels(num_sites: int) -> int:
    """``Q``: the largest power of two with ``num_sites * Q`` below the modulus 2**32 (no wrap-around of the sum),
    at most 2**30 (Flower's stochastic rounding works in int32)."""
    return int(min(2 ** 30, 2 ** math.floor(math.log2((MODULUS - 1) / max(1, num_sites)))))


def quantization_error_bound(num_sites: int, clip_range: float, total_weight_ratio: float) -> float:
    """Largest error of one element of the securely aggregated mean: each site's stochastic rounding moves its
    weighted value by less than one step ``2 R / Q``; the mean divides the sum by the sum of weight ratios
    (weights / ``secagg-max-weight``)."""
    step = 2.0 * clip_range / quantization_levels(num_sites)
    return num_sites * step / total_weight_ratio


# ------------------------------------------------------------------------------------------------ site side
def secure_update(update, global_arrays: Mapping[str, np.ndarray], config: Mapping):
    """What a site puts under the masks for a secure round (run where the site trains, before anything leaves it):
    its update validated as the server validates a plain one, then the delta (site array - global array) of the
    floating-point arrays in ``global_arrays``' order, weighted by ``num_examples`` (FedAvg) or clipped to the
    server's current clip with the unclipped bit appended (client-level DP, ``client-dp-clip`` in ``config``;
    weight 1). Returns an ``Update`` of these arrays whose ``num_examples`` is the weight and whose metrics add
    ``num_examples`` (the site's case count, in the clear as in a plain round).

    Raises :class:`nnunet_fed.federation.aggregation.UpdateRejected` (names, shapes, NaN/Inf) or
    :class:`SecureAggregationError` (a value outside the range, a weight above the maximum), naming the site."""
    from nnunet_fed.federation.aggregation import check_update, float_names
    from nnunet_fed.federation.update import Update
    from nnunet_fed.privacy.client_level import clip_update

    check_update(update, global_arrays)
    names = float_names(global_arrays)
    deltas = [update.arrays[k].astype(np.float64) - global_arrays[k].astype(np.float64) for k in names]
    clip_range, max_weight = float(config[CLIP_RANGE]), float(config[MAX_WEIGHT])
    if CLIENT_DP_CLIP in config:  # equal weights; the clipped delta and the bit
        deltas.append(np.array([clip_update(deltas, float(config[CLIENT_DP_CLIP]))]))
        names = names + [BIT]
        weight = 1
    else:
        weight = int(update.num_examples)
    if weight > max_weight:
        raise SecureAggregationError(
            f"site {update.site!r}: {weight} training cases, more than the secure aggregation's maximum weight "
            f"{max_weight:g}; start the server with --secagg-max-weight {weight} or more")
    for name, d in zip(names, deltas):  # the mask covers weight / max_weight * delta, clipped to +-R
        peak = float(np.abs(d).max()) if d.size else 0.0
        if peak * weight / max_weight > clip_range:
            raise SecureAggregationError(
                f"site {update.site!r}: array {name!r} changed by {peak:.4g} this round, outside the secure "
                f"aggregation range +-{clip_range:g} (it would be clipped); start the server with "
                f"--secagg-clip-range {2 * peak:.3g}")
    return Update(update.site, dict(zip(names, deltas)), weight,
                  {**update.metrics, "num_examples": int(update.num_examples)})


def fitres_content(content: RecordDict) -> RecordDict:
    """A site's :func:`secure_update` reply in Flower's ``FitRes`` layout, which ``secaggplus_mod`` masks (it
    sends only the masked ``fitres.parameters``). Metrics travel as JSON text in ``fitres.metrics``."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    update = msgs.update_from_content(content, "secure round reply")
    fitres = FitRes(status=Status(code=Code.OK, message=""),
                    parameters=ndarrays_to_parameters([np.asarray(v, np.float64) for v in update.arrays.values()]),
                    num_examples=int(update.num_examples),
                    metrics={METRICS_JSON: json.dumps(update.metrics, default=float)})
    return fitres_to_recorddict(fitres, keep_input=False)


def is_fit_message(content: RecordDict) -> bool:
    """Stage 2 of SecAgg+ (the legacy ``FitIns``: train and send the masked update)."""
    return "fitins.parameters" in content.array_records


def is_secure_message(content: RecordDict) -> bool:
    """A message of the SecAgg+ protocol (any stage)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    return RECORD_KEY_CONFIGS in content.config_records


def global_content_of(content: RecordDict) -> RecordDict:
    """The stage-2 message's ``FitIns`` (legacy parameters in the order of ``names``) as the site's usual global
    content (named arrays + the round's config), so the site worker answers it as any round."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import recorddict_to_fitins

    fitins = recorddict_to_fitins(content, keep_input=True)  # legacy bytes -> np.load(allow_pickle=False)
    config = dict(fitins.config)
    names = json.loads(str(config.pop(NAMES)))
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(names):
        raise msgs.MessageError(f"secure round: {len(arrays)} arrays for {len(names)} names")
    return msgs.global_content(dict(zip(names, arrays)), {**config, SECURE: True})


def secure_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of the SecAgg+ protocol; other train messages (a plain round)
    pass through untouched."""
    from flwr.client.mod import secaggplus_mod

    if is_secure_message(msg.content):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


# ------------------------------------------------------------------------------------------------ server side
def client_dp_of(strategy):
    """The client-level DP wrapper inside a server strategy (directly or under a server optimiser), else None."""
    from nnunet_fed.privacy.client_level import ClientLevelDP

    for s in (strategy, getattr(strategy, "inner", None)):
        if isinstance(s, ClientLevelDP):
            return s
    return None


def check_strategy(strategy) -> None:
    """Raise ``ValueError`` naming why ``strategy`` cannot run on secure sums: a robust rule (median, trimmed mean,
    Krum) needs every update; ``--diagnose`` records each update's geometry."""
    from nnunet_fed.federation.aggregation import FLOWER_RULES, RobustRule

    if isinstance(strategy, RobustRule):
        raise ValueError(f"strategy {strategy.name!r} needs every site's update, which secure aggregation does not "
                         f"reveal; use fedavg or one of "
                         f"{sorted(k for k, (_, kind) in FLOWER_RULES.items() if kind == 'optimiser')}")
    inner = getattr(strategy, "inner", strategy)
    if getattr(inner, "diagnose", False) or getattr(getattr(inner, "strategy", None), "diagnose", False):
        raise ValueError("--diagnose needs each site's update, which secure aggregation does not reveal")


def secagg_plus_workflow(**settings):
    """Flower's ``SecAggPlusWorkflow`` with one correction, for sites that leave between its first two stages.

    In Flower 1.41 a site that answers the setup stage (its public keys go to the others) and then leaves before
    it sends its key shares is still counted among the round's sites: at the unmask stage the server asks the
    others for that site's secret-key shares, which they never received, and every remaining site fails the round
    (``KeyError`` in ``secaggplus_mod._unmask``). In the protocol (Bonawitz et al. 2017, Bell et al. 2020) the masks
    to remove are those of the sites that shared their keys and then sent no masked vector; a site that left
    before sharing its keys is in no other site's masks. So after the share-keys stage the round's sites and
    everyone's neighbours are narrowed to those that shared their keys; the rest of the protocol is Flower's.
    ``settings`` are ``SecAggPlusWorkflow``'s."""
    from flwr.server.workflow import SecAggPlusWorkflow

    class _Workflow(SecAggPlusWorkflow):
        def share_keys_stage(self, grid, context, state) -> bool:
            ok = super().share_keys_stage(grid, context, state)
            shared = set(state.active_node_ids)
            state.sampled_node_ids = set(shared)
            state.nid_to_neighbours = {n: set(nb) & shared for n, nb in state.nid_to_neighbours.items()
                                       if n in shared}
            return ok and self._check_threshold(state)

    return _Workflow(**settings)


def _legacy_strategy(fitins_by_node: dict, grid, run_id: int, caught: dict):
    """A Flower legacy ``Strategy`` for one round of ``SecAggPlusWorkflow``: ``configure_fit`` hands out this
    round's ``FitIns`` to the given nodes; ``aggregate_fit`` keeps the unmasked result (nothing else is used)."""
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import Strategy

    class RoundStrategy(Strategy):
        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return [(GridClientProxy(n, grid, run_id), ins) for n, ins in fitins_by_node.items()]

        def aggregate_fit(self, server_round, results, failures):
            caught["results"], caught["failures"] = results, failures
            return None, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return RoundStrategy()


class ReceivedRecords:
    """The ``Grid`` SecAgg+ talks through: ``send_and_receive`` is the server's own exchange (``exchange(messages,
    timeout)`` yielding (node, reply or None, why), which stops waiting for a SuperNode that left instead of waiting
    out the timeout). It counts what the sites' replies carried: entries of ArrayRecords (a site's parameters in
    the clear; none under SecAgg+) and masked vectors, and keeps why a node did not answer. Everything else is the
    wrapped grid's."""

    def __init__(self, grid, exchange):
        self.grid, self.exchange, self.arrays, self.masked_vectors, self.errors = grid, exchange, 0, 0, {}

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

        replies = []
        for node, reply, why in self.exchange(list(messages), float("inf") if timeout is None else timeout):
            if reply is None:
                self.errors[node] = why
                continue
            replies.append(reply)
            if reply.has_error():
                self.errors[node] = reply.error.reason
                continue
            self.arrays += sum(len(r) for r in reply.content.array_records.values())
            cfg = reply.content.config_records.get(RECORD_KEY_CONFIGS)
            self.masked_vectors += int(cfg is not None and Key.MASKED_PARAMETERS in cfg)
        return replies


def secure_round(grid, exchange, context: Context, nodes: list[int], global_arrays: Mapping[str, np.ndarray],
                 round_config: Mapping, site_of, timeout: float, clip_range: float, max_weight: float,
                 client_dp_clip: float | None = None):
    """One round of SecAgg+ over ``nodes`` (at least 2), its messages sent by ``exchange`` (see
    :class:`ReceivedRecords`) on ``grid``. Returns ``(SecureSum, info)``; ``info`` records the
    protocol's settings (sites, threshold, quantisation levels, range, the bound on the mean's quantisation error)
    for the round's metrics line. ``site_of(node)`` names a node's site. A site that dropped out or refused its
    update is in ``SecureSum.rejected``; when too few remain for the threshold the workflow halts and ``accepted``
    is empty."""
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import ServerConfig
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    from nnunet_fed.federation.aggregation import SecureSum, float_names
    from nnunet_fed.federation.update import Update

    names = list(global_arrays)
    floats = float_names(global_arrays)
    if client_dp_clip is not None:  # equal weights (1), every value within max(clip, 1): nothing is clipped
        clip_range, max_weight = max(float(client_dp_clip), 1.0), 1.0
    config = {**round_config, NAMES: json.dumps(names), CLIP_RANGE: float(clip_range), MAX_WEIGHT: float(max_weight)}
    if client_dp_clip is not None:
        config[CLIENT_DP_CLIP] = float(client_dp_clip)
    parameters = ndarrays_to_parameters([np.ascontiguousarray(global_arrays[k]) for k in names])
    fitins = {n: FitIns(parameters, dict(config)) for n in nodes}
    caught: dict = {}
    run_id = int(context.run_id)
    legacy = LegacyContext(Context(run_id=run_id, node_id=context.node_id, node_config=dict(context.node_config),
                                   state=RecordDict(), run_config=dict(context.run_config)),
                           config=ServerConfig(num_rounds=1),
                           strategy=_legacy_strategy(fitins, grid, run_id, caught))
    r = int(round_config["round"]) + 1
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: r})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    levels = quantization_levels(len(nodes))
    threshold = len(nodes) // 2 + 1
    workflow = secagg_plus_workflow(num_shares=1.0, reconstruction_threshold=threshold / len(nodes),
                                    max_weight=float(max_weight), clipping_range=float(clip_range),
                                    quantization_range=levels, modulus_range=MODULUS, timeout=timeout)
    received = ReceivedRecords(grid, exchange)
    workflow(received, legacy)
    accepted, mean, answered = [], None, set()
    for proxy, fitres in caught.get("results", []):
        metrics = json.loads(str(fitres.metrics.get(METRICS_JSON, "{}")))
        num_examples = int(metrics.pop("num_examples", fitres.num_examples))
        accepted.append(Update(site_of(proxy.node_id), {}, num_examples, metrics))
        answered.add(proxy.node_id)
        mean = parameters_to_ndarrays(fitres.parameters)
    rejected = [(site_of(n), f"not in the secure sum: {received.errors.get(n, 'no reply in time')}")
                for n in nodes if n not in answered]
    total_ratio = sum(u.num_examples if client_dp_clip is None else 1 for u in accepted) / float(max_weight)
    info = {"sites": len(accepted), "sampled": len(nodes), "threshold": threshold, "quantization_levels": levels,
            "clip_range": float(clip_range), "max_weight": float(max_weight),
            "arrays_received": received.arrays, "masked_vectors_received": received.masked_vectors,
            "quantization_error_bound": quantization_error_bound(len(nodes), clip_range, total_ratio)
            if accepted else None}
    if mean is None:
        return SecureSum({}, [], rejected or [("all sites", "the secure aggregation halted")]), info
    mean_delta = dict(zip(floats, mean[:len(floats)]))
    bit = float(mean[len(floats)][0]) if client_dp_clip is not None else None
    return SecureSum(mean_delta, accepted, rejected, unclipped_fraction=bit), info


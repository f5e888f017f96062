"""Flower messages <-> nnunet_fed objects, with arrays only: no pickle in either direction.

A site's reply to a round carries three records:

``arrays``   ArrayRecord: the shared parameters (state-dict name -> numpy array, serialised by numpy with
             ``allow_pickle=False``); local parameters are never put in it
``metrics``  MetricRecord: ``num-examples`` and the round's scalar metrics (train loss, pseudo Dice, seconds, ...)
``site``     ConfigRecord: the site's dataset name

Received arrays are decoded with numpy's ``allow_pickle=False`` and must be plain numeric arrays; anything
else is refused with an error that names the record and the array.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

if TYPE_CHECKING:  # not imported at run time: the ClientApp process stays free of torch
    from nnunet_fed.federation.update import Update

ARRAYS = "arrays"
METRICS = "metrics"
SITE = "site"
CONFIG = "config"
NUM_EXAMPLES = "num-examples"

# message types (Flower: "<category>.<action>")
SETUP = "query.setup"
TRAIN = "train"
FINISH = "query.finish"


class MessageError(ValueError):
    """A message that does not have the expected content."""


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    record = {}
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        if arr.dtype.hasobject:
            raise MessageError(f"array {name!r} has dtype object; only numeric arrays are sent")
        record[name] = Array(np.ascontiguousarray(arr))
    return ArrayRecord(record)


def record_to_arrays(record: ArrayRecord, what: str = "arrays") -> dict[str, np.ndarray]:
    out = {}
    for name, arr in record.items():
        if arr.stype != "numpy.ndarray":
            raise MessageError(f"{what}: array {name!r} has serialisation {arr.stype!r}, expected numpy.ndarray")
        if np.dtype(arr.dtype).hasobject:
            raise MessageError(f"{what}: array {name!r} has dtype object")
        out[name] = arr.numpy()  # np.load(..., allow_pickle=False)
    return out


def _metric_value(value):
    """MetricRecord holds int, float and lists of them; other values are dropped."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float, np.number)) for v in value):
        if all(isinstance(v, (int, np.integer)) for v in value):
            return [int(v) for v in value]
        return [float(v) for v in value]
    return None


def update_to_content(update: Update) -> RecordDict:
    metrics = {NUM_EXAMPLES: int(update.num_examples)}
    for k, v in update.metrics.items():
        v = _metric_value(v)
        if v is not None:
            metrics[k] = v
    return RecordDict({ARRAYS: arrays_to_record(update.arrays), METRICS: MetricRecord(metrics),
                       SITE: ConfigRecord({"name": update.site})})


def update_from_message(msg: Message) -> Update:
    try:
        return update_from_content(msg.content)
    except MessageError as e:
        raise MessageError(f"node {msg.metadata.src_node_id}: {e}") from None


def update_from_content(content: RecordDict, what: str = "reply") -> Update:
    """The :class:`~nnunet_fed.federation.update.Update` of a site's reply content; ``what`` names it in errors."""
    from nnunet_fed.federation.update import Update

    for key, kind in ((ARRAYS, ArrayRecord), (METRICS, MetricRecord), (SITE, ConfigRecord)):
        if key not in content or not isinstance(content[key], kind):
            raise MessageError(f"{what} has no {kind.__name__} {key!r}")
    metrics = dict(content[METRICS])
    num_examples = metrics.pop(NUM_EXAMPLES, None)
    return Update(site=str(content[SITE]["name"]), arrays=record_to_arrays(content[ARRAYS], "update"),
                  num_examples=num_examples, metrics=metrics)


def global_content(global_arrays: Mapping[str, np.ndarray] | None, config: Mapping) -> RecordDict:
    """Server -> site: the global (shared) parameters and the round's settings."""
    records = {CONFIG: ConfigRecord(dict(config))}
    if global_arrays is not None:
        records[ARRAYS] = arrays_to_record(global_arrays)
    return RecordDict(records)


def read_global_content(content: RecordDict, message_type: str) -> tuple[dict[str, np.ndarray] | None, dict]:
    """The global arrays (None where the message has none) and the round's settings of a server message."""
    if CONFIG not in content:
        raise MessageError(f"message {message_type!r} has no ConfigRecord {CONFIG!r}")
    arrays = record_to_arrays(content[ARRAYS], "global arrays") if ARRAYS in content else None
    return arrays, dict(content[CONFIG])


def json_config(**values) -> ConfigRecord:
    """Structured values (plans, dataset.json) travel as JSON text inside a ConfigRecord."""
    return ConfigRecord({k: json.dumps(v) if not isinstance(v, str) else v for k, v in values.items()})

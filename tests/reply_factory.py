"""Build reply Messages as a SuperLink would deliver them, for strategy unit tests."""

from __future__ import annotations

import itertools
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Error, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata

_ids = itertools.count(1)


def _metadata(node_id: int, message_type: str) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{next(_ids)}", src_node_id=node_id, dst_node_id=0,
                    reply_to_message_id="request", group_id="1", created_at=time.time(),
                    ttl=3600.0, message_type=message_type)


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def train_reply(node_id: int, arrays: dict[str, np.ndarray] | ArrayRecord | None,
                metrics: dict | None = None, num_examples: object = 10,
                message_type: str = "train") -> object:
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = arrays if isinstance(arrays, ArrayRecord) else array_record(arrays)
    record = dict(metrics or {})
    if num_examples is not None:
        record["num-examples"] = num_examples
    content["metrics"] = MetricRecord(record)
    return make_message(_metadata(node_id, message_type), content=content)


def error_reply(node_id: int, reason: str = "boom", message_type: str = "train") -> object:
    return make_message(_metadata(node_id, message_type), error=Error(code=1, reason=reason))

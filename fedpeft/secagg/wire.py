"""SecAgg+ in Flower messages: message types per stage, record names, payloads to records and back.

Each stage is its own message exchange, so the ledger charges it under its own message type:
`train.secagg_setup`, `train.secagg_share_keys`, then `train` (the collect stage is the round's
train message, which also carries the global adapter), then `train.secagg_unmask`. Flower routes
`train.<action>` to the ClientApp function registered with `@app.train("<action>")`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

from fedpeft.secagg.client import Payload

SECAGG = "secagg"  # the ConfigRecord of a stage's request or reply
MASKED = "secagg-masked"  # the ArrayRecord of a masked upload (uint arrays only)
CLIENT_STATE = "secagg-client"  # where a node keeps its SecAggClient state in `context.state`
MAX_WEIGHT = "secagg-max-weight"  # the public largest weight, in the collect request (fedpeft.secagg.weights)
ACTIONS = {Stage.SETUP: "secagg_setup", Stage.SHARE_KEYS: "secagg_share_keys", Stage.UNMASK: "secagg_unmask"}
STAGES = (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)


def message_type(stage: str) -> str:
    """The Flower message type of a stage's messages (the collect stage is the round's train message)."""
    if stage == Stage.COLLECT_MASKED_VECTORS:
        return MessageType.TRAIN
    return f"{MessageType.TRAIN}.{ACTIONS[stage]}"


def to_content(payload: Mapping[str, Any]) -> RecordDict:
    """A payload as message content: masked vectors in an ArrayRecord, every other value in one ConfigRecord."""
    config = {k: v for k, v in payload.items() if k != Key.MASKED_PARAMETERS}
    records: dict[str, Any] = {SECAGG: ConfigRecord(config)} if config or Key.MASKED_PARAMETERS not in payload else {}
    if Key.MASKED_PARAMETERS in payload:
        records[MASKED] = ArrayRecord([np.asarray(a) for a in payload[Key.MASKED_PARAMETERS]])
    return RecordDict(records)


def from_content(content: RecordDict) -> Payload:
    """The payload a message carries (KeyError when it carries no SecAgg records)."""
    out: Payload = dict(content[SECAGG]) if SECAGG in content.config_records else {}
    if MASKED in content.array_records:
        out[Key.MASKED_PARAMETERS] = content[MASKED].to_numpy_ndarrays()
    if not out:
        raise KeyError(f"no '{SECAGG}' or '{MASKED}' record in the message")
    return out

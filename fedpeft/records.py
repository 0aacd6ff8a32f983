"""Names and accessors for what every fedpeft reply carries (shared by strategies, clients and privacy)."""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict

NUM_EXAMPLES = "num-examples"  # the weight of a reply in example-weighted aggregates
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-s"  # wall seconds of a client's local training (client compute)
ARRAYS = "arrays"  # the adapter tensors a message carries
CONFIG = "config"
SERVER_ROUND = "server-round"


def reply_metrics(content: RecordDict) -> MetricRecord:
    """The single MetricRecord of a reply (fedpeft replies carry exactly one)."""
    return next(iter(content.metric_records.values()))


def num_examples(content: RecordDict) -> float:
    """A reply's example count (its aggregation weight)."""
    return float(reply_metrics(content)[NUM_EXAMPLES])

"""Ledger bytes are exactly what Flower pushes for a message, split by record without loss."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import push_objects
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.ledger import ENVELOPE, CommLedger, message_bytes, record_bytes


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _pushed_bytes(msg: Message) -> int:
    """Bytes Flower's own push path sends for `msg` (each object's content, once)."""
    sent: list[int] = []
    push_objects(get_all_nested_objects(msg), lambda oid, content: sent.append(len(content)))
    return sum(sent)


def _adapter(seed: int, n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"base_model.model.layer.{i}.lora_A.weight": torch.randn(8, 64, generator=g) for i in range(n)}


def test_message_bytes_equal_flower_push():
    rd = RecordDict({"arrays": ArrayRecord(_adapter(0)), "config": ConfigRecord({"server-round": 3})})
    msg = Message(rd, dst_node_id=42, message_type=MessageType.TRAIN)
    assert message_bytes(msg) == _pushed_bytes(msg)
    raw = 6 * 8 * 64 * 4
    assert raw < message_bytes(msg) < raw + 6 * 600 + 1000  # framing per array is a few hundred bytes


def test_record_split_adds_up_and_scales_with_payload():
    small = Message(RecordDict({"arrays": ArrayRecord(_adapter(1, 2)), "metrics": MetricRecord({"num-examples": 5})}),
                    dst_node_id=1, message_type=MessageType.TRAIN)
    big = Message(RecordDict({"arrays": ArrayRecord(_adapter(1, 4)), "metrics": MetricRecord({"num-examples": 5})}),
                  dst_node_id=1, message_type=MessageType.TRAIN)
    for m in (small, big):
        parts = record_bytes(m)
        assert set(parts) == {"arrays", "metrics", ENVELOPE}
        assert sum(parts.values()) == message_bytes(m)
    per_array = record_bytes(big)["arrays"] - record_bytes(small)["arrays"]
    # Each extra array costs its raw bytes plus a few hundred bytes of framing (name, dtype,
    # shape, object ids of the Array and its chunk).
    assert 2 * 8 * 64 * 4 < per_array < 2 * 8 * 64 * 4 + 2 * 600


def test_identical_arrays_are_sent_once():
    zeros = {f"b{i}": torch.zeros(8, 64) for i in range(4)}
    msg = Message(RecordDict({"arrays": ArrayRecord(zeros)}), dst_node_id=1, message_type=MessageType.TRAIN)
    assert message_bytes(msg) == _pushed_bytes(msg)
    assert message_bytes(msg) < 2 * 8 * 64 * 4  # Flower content-addresses chunks: one copy on the wire


def test_ledger_rows_and_totals(tmp_path):
    ledger = CommLedger(tmp_path / "comm.csv", client_of=lambda node: node * 10)
    ledger.round = 2
    msg = Message(RecordDict({"config": ConfigRecord({"a": 1})}), dst_node_id=3, message_type=MessageType.TRAIN)
    n = ledger.charge(msg, "down")
    ledger.flush()
    assert n == message_bytes(msg)
    assert ledger.totals(2) == {"down": n, "up": 0} and ledger.totals(1) == {"down": 0, "up": 0}
    lines = (tmp_path / "comm.csv").read_text().splitlines()
    assert lines[0].startswith("round,client_id")
    assert all(line.startswith("2,30,3,down,train,") for line in lines[1:])
    assert sum(int(line.rsplit(",", 1)[1]) for line in lines[1:]) == n

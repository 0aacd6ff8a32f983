"""The privacy ledger counts every reply that carries ε: accepted, rejected, or valid in a round that failed."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.adapters import adapter_state
from fedpeft.models import build_model
from fedpeft.nodes import NodeDirectory
from fedpeft.privacy.ledger import COLUMNS, PrivacyLedger, read_ledger
from fedpeft.app.recipe import validate
from strategies import get_strategy_class

TINY = {"source": "tiny", "tiny": {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                                   "intermediate_size": 8}}
NODES = {101: 0, 102: 1, 103: 2}
OLD_COLUMNS = ["round", "client_id", "epsilon", "delta", "noise_multiplier", "steps", "sample_rate", "level"]


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _strategy(min_replies: float = 1):
    cfg = validate({"model": TINY, "adapter": {"type": "lora", "r": 2, "target_modules": ["query"]},
                    "dp": {"enabled": True, "noise_multiplier": 1.0},
                    "sim": {"num_clients": 3, "clients_per_round": 3, "min_replies": min_replies}})
    s = get_strategy_class("fedavg")(cfg, NodeDirectory(dict(NODES)), build_model(cfg, 2))
    s.sent = dict.fromkeys(NODES, s.initial_arrays())
    return s


def _reply(s, node: int, eps: float, value: float = 0.01) -> Message:
    arrays = {k: torch.full_like(v, value) for k, v in adapter_state(build_model(s.cfg, 2)).items()}
    metrics = {"num-examples": 10, "epsilon": eps, "delta": 1e-3, "noise-multiplier": 1.0, "sample-rate": 0.1,
               "dp-steps": 5, "dp-noise-seeded": 1}
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)}),
                   reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


def _rows(path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_a_rejected_dp_reply_is_in_the_ledger_and_in_epsilon_max(tmp_path):
    s = _strategy()
    ledger = PrivacyLedger(tmp_path / "privacy.csv")
    replies = [_reply(s, 101, 1.0), _reply(s, 102, 2.0), _reply(s, 103, 9.0, value=float("nan"))]
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None and [r.client_id for r in s.pop_rejections()] == [2]
    eps = ledger.record(1, s.pop_client_metrics())
    assert sorted(eps) == [1.0, 2.0, 9.0]  # the round's epsilon_max covers the rejected reply
    rows = _rows(tmp_path / "privacy.csv")
    assert list(rows[0]) == COLUMNS
    assert {(r["client_id"], r["status"]) for r in rows} == {("0", "accepted"), ("1", "accepted"), ("2", "rejected")}
    assert ledger.summary()["epsilon_max"] == 9.0 and ledger.summary()["epsilon_median"] == 2.0
    assert ledger.summary()["sample_noise_source"] == "seeded"
    assert PrivacyLedger(tmp_path / "privacy.csv").summary() == ledger.summary()  # a resumed run: the same summary


def test_every_reply_of_a_failed_round_is_in_the_ledger(tmp_path):
    s = _strategy(min_replies=3)  # all three needed: one rejection fails the round
    ledger = PrivacyLedger(tmp_path / "privacy.csv")
    replies = [_reply(s, 101, 3.0), _reply(s, 102, 4.0, value=float("inf")), _reply(s, 103, 5.0)]
    assert s.aggregate_train(2, replies) == (None, None) and s.failure
    ledger.record(2, s.pop_client_metrics())
    status = {int(r["client_id"]): r["status"] for r in read_ledger(tmp_path / "privacy.csv")}
    assert status == {0: "round-failed", 1: "rejected", 2: "round-failed"}
    assert ledger.summary()["epsilon_max"] == 5.0


def test_a_client_cannot_mark_its_own_reply_and_junk_epsilon_is_not_logged(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy.csv")
    forged = {"epsilon": 1.0, "ledger-status": 0.0}  # a number, not a status the strategy sets
    assert ledger.record(1, [(0, forged), (1, {"epsilon": [1.0, 2.0]}), (2, {"epsilon": float("nan")})]) == [1.0]
    assert [r["status"] for r in read_ledger(tmp_path / "privacy.csv")] == ["accepted"]


def test_a_ledger_written_before_the_status_column_still_reads_and_appends(tmp_path):
    path = tmp_path / "privacy.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(OLD_COLUMNS)
        w.writerow([1, 0, 2.5, 0.001, 1.0, 10, 0.1, "sample"])
    ledger = PrivacyLedger(path)  # a resumed run picks up the client's ε
    assert ledger.summary()["epsilon_max"] == 2.5
    ledger.record(2, [(1, {"epsilon": 3.5, "ledger-status": "rejected", "dp-steps": 10})])
    rows = read_ledger(path)
    assert [(r["client_id"], r["epsilon"], r["status"]) for r in rows] == [(0, 2.5, "accepted"), (1, 3.5, "accepted")]
    assert list(_rows(path)[0]) == OLD_COLUMNS  # the file keeps one shape: no ragged rows
    assert np.isclose(ledger.summary()["epsilon_max"], 3.5)

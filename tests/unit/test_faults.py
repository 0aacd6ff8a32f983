"""Fault plans and Byzantine attacks: seeded draws, the attacks' arithmetic, and the config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.rows import FlippedLabels
from fedpeft.config import ConfigError, FaultsConfig
from fedpeft.faults import FaultPlan
from fedpeft.faults.attacks import alie_z, attack
from fedpeft.app.recipe import validate


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def test_the_plan_is_the_same_in_every_run_and_meets_the_configured_rates():
    cfg = FaultsConfig(crash=0.2, straggle=0.1, drop=0.05, malformed=0.05)
    a, b = FaultPlan(cfg, 3, 1000), FaultPlan(cfg, 3, 1000)
    draws = [a.fault(r, c) for r in range(1, 11) for c in range(1000)]
    assert draws == [b.fault(r, c) for r in range(1, 11) for c in range(1000)]
    kinds = [d.kind if d else None for d in draws]
    for kind, p in (("crash", 0.2), ("straggle", 0.1), ("drop", 0.05), ("malformed", 0.05)):
        assert abs(kinds.count(kind) / len(kinds) - p) < 0.01
    assert FaultPlan(cfg, 4, 1000).fault(1, 0) != a.fault(1, 0) or FaultPlan(cfg, 4, 1000).fault(1, 1) != a.fault(1, 1)


def test_the_byzantine_set_is_fixed_sized_and_seeded():
    cfg = FaultsConfig(byzantine_fraction=0.2)
    plan = FaultPlan(cfg, 0, 100)
    assert len(plan.byzantine) == 20 and plan.byzantine == FaultPlan(cfg, 0, 100).byzantine
    assert plan.byzantine != FaultPlan(cfg, 1, 100).byzantine


def _reply(node: int, value: np.ndarray) -> Message:
    sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(RecordDict({"arrays": ArrayRecord({"w": torch.tensor(value, dtype=torch.float32)}),
                               "metrics": MetricRecord({"num-examples": 1})}), reply_to=sent)


REF = ArrayRecord({"w": torch.tensor([1.0, 2.0, 3.0])})


def _attacked(cfg: FaultsConfig, values: list[list[float]], byzantine: set[int]) -> list[np.ndarray]:
    replies = [_reply(100 + i, np.array(v)) for i, v in enumerate(values)]
    attack(cfg, 0, 1, replies, lambda n: n - 100, frozenset(byzantine), lambda n: REF)
    return [m.content["arrays"]["w"].numpy() for m in replies]


def test_sign_flip_and_scale_rewrite_only_byzantine_updates():
    values = [[2.0, 2.0, 2.0], [1.5, 2.5, 3.5]]
    flipped = _attacked(FaultsConfig(byzantine_fraction=0.5, attack="sign_flip", attack_scale=10), values, {1})
    assert np.array_equal(flipped[0], np.array(values[0], np.float32))
    assert np.allclose(flipped[1], [1 - 5.0, 2 - 5.0, 3 - 5.0])
    scaled = _attacked(FaultsConfig(byzantine_fraction=0.5, attack="scale", attack_scale=3), values, {1})
    assert np.allclose(scaled[1], [1 + 1.5, 2 + 1.5, 3 + 1.5])


def test_noise_replaces_the_update_reproducibly():
    cfg = FaultsConfig(byzantine_fraction=0.5, attack="noise", noise_std=2.0)
    one = _attacked(cfg, [[2.0, 2.0, 2.0]], {0})[0]
    assert np.array_equal(one, _attacked(cfg, [[5.0, 5.0, 5.0]], {0})[0])  # independent of the honest update
    assert not np.allclose(one, [2.0, 2.0, 2.0])


def test_alie_sends_mean_minus_z_std_of_the_honest_updates():
    assert alie_z(10, 2) == pytest.approx(0.2533, abs=1e-4)  # s = 6 - 2 = 4, z = Φ⁻¹(0.6)
    values = [[1.0 + d, 2.0 + 2 * d, 3.0] for d in (0.1, 0.2, 0.3, 0.4)]
    cfg = FaultsConfig(byzantine_fraction=0.5, attack="alie", alie_z=1.5)
    out = _attacked(cfg, values, {2, 3})
    updates = np.array(values) - np.array([1.0, 2.0, 3.0])
    target = np.array([1.0, 2.0, 3.0]) + updates.mean(0) - 1.5 * updates.std(0)
    assert np.allclose(out[2], target) and np.allclose(out[3], target)
    assert np.allclose(out[0], values[0])


def test_label_flipping_maps_each_class_to_its_mirror():
    from datasets import Dataset

    from fedpeft.data.prepared import label_column

    rows = Dataset.from_dict({"input_ids": [[1], [2], [3]], "label": [0, 2, 5]})
    flipped = FlippedLabels(rows, 6)
    assert flipped["label"] == [5, 3, 0] and flipped["input_ids"] == rows["input_ids"] and len(flipped) == 3
    assert label_column(flipped) == "label"  # the batchers read it as they read the partition


@pytest.mark.parametrize("faults, method, message", [
    ({"crash": 0.6, "drop": 0.5}, "fedavg", "exceeds 1"),
    ({"malformed": 0.1, "malformed_kind": "zip"}, "fedavg", "unknown"),
    ({"byzantine_fraction": 0.2, "attack": "sign_flip"}, "fedkseed", "label_flip"),
    ({"malformed": 0.1, "malformed_kind": "nan"}, "fedkseed", "does not upload"),
    ({"malformed": 0.1, "malformed_kind": "scalars_truncated"}, "fedavg", "does not upload"),
    ({"malformed": 0.1, "malformed_kind": "nan", "codecs": ["delta", "topk:0.1"]}, "fedavg", "coded payloads"),
    ({"byzantine_fraction": 0.2, "attack": "sign_flip", "codecs": ["delta", "topk:0.1"]}, "fedavg", "dense"),
])
def test_impossible_fault_configs_are_refused_with_the_reason(faults, method, message):
    up = faults.pop("codecs", [])
    with pytest.raises((ConfigError, ValueError), match=message):
        validate({"method": {"name": method}, "faults": faults, "codecs": {"up": up}})


def test_min_replies_must_fit_the_round():
    with pytest.raises((ConfigError, ValueError), match="min_replies"):
        validate({"sim": {"num_clients": 10, "clients_per_round": 5, "min_replies": 6}})
    assert validate({"sim": {"num_clients": 10, "clients_per_round": 5, "min_replies": 0.5}}).sim.min_replies == 0.5

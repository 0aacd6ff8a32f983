"""FedExP's server step equals the paper's formula computed by hand, and never steps less than FedAvg."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.adapters import adapter_state
from fedpeft.app.recipe import validate
from fedpeft.models import build_model
from fedpeft.nodes import NodeDirectory
from strategies import get_strategy_class

TINY = {"source": "tiny", "tiny": {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                                   "intermediate_size": 8}}
CFG = validate({"model": TINY, "adapter": {"type": "lora", "r": 2, "target_modules": ["query"]},
                "method": {"name": "fedexp", "eps": 0.001}, "sim": {"num_clients": 2, "clients_per_round": 2}})
NODES = {101: 0, 102: 1}


class _Grid:
    def get_node_ids(self):
        return list(NODES)


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _round(updates: list[float], examples: list[int]) -> tuple[dict, dict, object]:
    """One FedExP round from a zero-free global: client i sends global + updates[i] everywhere."""
    s = get_strategy_class("fedexp")(CFG, NodeDirectory(dict(NODES)), build_model(CFG, 2))
    arrays = ArrayRecord({k: torch.full_like(v, 0.25) for k, v in adapter_state(build_model(CFG, 2)).items()})
    list(s.configure_train(1, arrays, ConfigRecord(), _Grid()))
    replies = []
    for node, u, n in zip(NODES, updates, examples):
        content = RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(np.full_like(v.numpy(), 0.25 + u))
                                                     for k, v in arrays.items()}),
                              "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5})})
        replies.append(Message(content, reply_to=Message(RecordDict(), dst_node_id=node,
                                                         message_type=MessageType.TRAIN)))
    new, _ = s.aggregate_train(1, replies)
    return {k: v.numpy() for k, v in arrays.items()}, {k: v.numpy() for k, v in new.items()}, s


def test_server_step_matches_the_formula_by_hand():
    """Opposed updates: short mean, long steps. η_g = max(1, mean‖Δ_i‖² / (2(‖Δ̄‖² + ε)))."""
    x, new, s = _round([1.0, -0.5], [10, 30])
    d = sum(v.size for v in x.values())  # every coordinate moves by the same amount
    client_sq = [1.0 * d, 0.25 * d]
    mean_update = (10 * 1.0 + 30 * -0.5) / 40  # example-weighted, as FedAvg
    eta = max(1.0, np.mean(client_sq) / (2 * (mean_update ** 2 * d + 0.001)))
    assert eta > 1 and s.report(1, None)["server_lr"] == pytest.approx(eta, rel=1e-9)
    for k in x:
        np.testing.assert_allclose(new[k], x[k] + eta * mean_update, rtol=1e-6)


def test_agreeing_clients_step_like_fedavg():
    """Identical updates: mean‖Δ_i‖² = ‖Δ̄‖², so η_g = max(1, ½) = 1 and the new global is FedAvg's."""
    x, new, s = _round([0.3, 0.3], [5, 5])
    assert s.report(1, None)["server_lr"] == 1.0
    for k in x:
        np.testing.assert_allclose(new[k], x[k] + 0.3, rtol=1e-6)

"""Low-rank methods: FFA-LoRA, FedPara (LoHa) at equal bytes, exact LoRA aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.adapters import adapter_state
from fedpeft.config import ConfigError
from fedpeft.app.recipe import validate
from fedpeft.models import build_model
from fedpeft.nodes import NodeDirectory
from strategies import get_strategy_class
from strategies.fedavg import lora_pairs, refactorize

TINY = {"source": "tiny", "tiny": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 1,
                                   "intermediate_size": 16}}


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _reply(state: dict, node: int, n: int) -> Message:
    rd = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n})})
    return Message(rd, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


def _params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)


def test_ffa_lora_freezes_and_never_sends_a():
    cfg = validate({"model": TINY, "method": {"name": "ffa-lora"},
                    "adapter": {"type": "lora", "r": 4, "target_modules": ["query", "value"]}})
    model = build_model(cfg, 3)
    strategy = get_strategy_class("ffa-lora")(cfg, NodeDirectory({1: 0}), model)
    assert strategy.template and all("lora_A" not in k for k in strategy.template)
    assert any("lora_B" in k for k in strategy.template)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    # Every process builds the same frozen A from the seed.
    other = build_model(cfg, 3)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), other.named_parameters()):
        if "lora_A" in n1:
            assert torch.equal(p1, p2)
    with pytest.raises(ConfigError, match="ffa-lora"):
        validate({"method": {"name": "ffa-lora"}, "adapter": {"type": "loha", "target_modules": ["query"]}})


@pytest.mark.parametrize("lora_rank", [2, 4, 8, 16])
def test_fedpara_equal_bytes_rank_matches_lora_within_one_rank_step(lora_rank):
    modules = ["query", "value"]
    lora = build_model(validate({"model": TINY, "adapter": {"type": "lora", "r": lora_rank, "target_modules": modules}}), 3)
    cfg = validate({"model": TINY, "method": {"name": "fedpara", "match_lora_rank": lora_rank},
                    "adapter": {"type": "loha", "r": 1, "target_modules": modules}})
    r = cfg.adapter.peft_kwargs()["r"]
    loha = build_model(cfg, 3)
    step = _params(loha) // r  # parameters added by one LoHa rank step
    assert abs(_params(loha) - _params(lora)) <= step
    with pytest.raises(ConfigError, match="fedpara"):
        validate({"method": {"name": "fedpara"}})


def test_refactorization_error_is_the_optimal_rank_r_error():
    rng = np.random.default_rng(0)
    delta = (rng.standard_normal((20, 3)) @ rng.standard_normal((3, 16)) + 0.1 * rng.standard_normal((20, 16)))
    for r in (1, 2, 3):
        b, a = refactorize(delta, r)
        s = np.linalg.svd(delta, compute_uv=False)
        assert np.isclose(np.linalg.norm(delta - b @ a), np.sqrt((s[r:] ** 2).sum()), rtol=1e-10)


def test_exact_lora_aggregation_averages_products_and_keeps_dtypes():
    cfg = validate({"model": TINY, "method": {"name": "fedavg", "lora_aggregation": "exact"},
                    "adapter": {"type": "lora", "r": 2, "target_modules": ["query"]}})
    model = build_model(cfg, 3)
    strategy = get_strategy_class("fedavg")(cfg, NodeDirectory({1: 0, 2: 1}), model)
    g = torch.Generator().manual_seed(0)
    states = [{k: torch.randn(v.shape, generator=g) for k, v in adapter_state(model).items()} for _ in range(2)]
    arrays, _ = strategy.aggregate_train(1, [_reply(states[0], 1, 10), _reply(states[1], 2, 30)])
    out = arrays.to_torch_state_dict()
    for k, v in out.items():
        assert v.dtype == states[0][k].dtype and v.shape == states[0][k].shape
    (ka, kb), = lora_pairs(out)
    mean = 0.25 * (states[0][kb] @ states[0][ka]) + 0.75 * (states[1][kb] @ states[1][ka])
    # rank-2 product of rank-2 updates averaged: rank <= 4, so compare with its best rank-2 approximation
    u, s, vh = torch.linalg.svd(mean.double())
    best = (u[:, :2] * s[:2]) @ vh[:2]
    assert torch.allclose((out[kb] @ out[ka]).double(), best, atol=1e-4)
    separate = (0.25 * states[0][kb] + 0.75 * states[1][kb]) @ (0.25 * states[0][ka] + 0.75 * states[1][ka])
    assert float((separate - mean).norm()) > float((out[kb] @ out[ka] - mean).norm())

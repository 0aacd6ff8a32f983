"""Heterogeneous LoRA ranks: tier assignment, HetLoRA / FlexLoRA aggregation, per-tier bytes end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.adapters import adapter_state
from fedpeft.config import ConfigError
from fedpeft.app.recipe import load, validate
from fedpeft.methods.lowrank import assign_ranks, pad_lora, truncate_lora
from fedpeft.models import build_model
from fedpeft.nodes import NodeDirectory
from fedpeft.app.simulate import simulate
from strategies import get_strategy_class
from strategies.fedavg import lora_pairs
from fedpeft.methods.lowrank import RANK_KEY

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"
TINY = {"source": "tiny", "tiny": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 1,
                                   "intermediate_size": 16}}
TIERS = {"2": 0.5, "4": 0.25, "8": 0.25}


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


class _Grid:
    """The one Grid call a strategy's sampling makes: which nodes are online."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _strategy(name: str, num_clients: int = 4):
    cfg = validate({"model": TINY, "method": {"name": name, "rank_tiers": TIERS},
                    "adapter": {"type": "lora", "r": 1, "lora_alpha": 8, "target_modules": ["query"]},
                    "sim": {"num_clients": num_clients, "clients_per_round": num_clients}})
    model = build_model(cfg, 3)
    directory = NodeDirectory({100 + c: c for c in range(num_clients)})
    return cfg, model, get_strategy_class(name)(cfg, directory, model)


def _train_round(strategy, model, seed: int = 0) -> tuple[list[Message], list[tuple[int, int, dict]]]:
    """Send round 1, answer every message with random factors of its rank; (replies, (rank, n, state))."""
    grid = _Grid(sorted(strategy.directory.node_to_client))
    msgs = list(strategy.configure_train(1, strategy.initial_arrays(), None, grid))
    g = torch.Generator().manual_seed(seed)
    replies, sent = [], []
    for i, m in enumerate(msgs):
        rank = int(m.content["config"][RANK_KEY])
        state = {k: torch.randn(m.content["arrays"][k].shape, generator=g) for k in m.content["arrays"]}
        n = 10 * (i + 1)
        rd = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n})})
        reply = Message(rd, reply_to=m)
        replies.append(reply)
        sent.append((rank, n, {k: v.numpy() for k, v in state.items()}))
    return replies, sent


def test_rank_tiers_follow_the_shares_and_the_seed():
    ranks = assign_ranks(100, {4: 0.3, 8: 0.5, 16: 0.2}, seed=0)
    assert [ranks.count(r) for r in (4, 8, 16)] == [30, 50, 20]
    assert ranks == assign_ranks(100, {4: 0.3, 8: 0.5, 16: 0.2}, seed=0)
    assert ranks != assign_ranks(100, {4: 0.3, 8: 0.5, 16: 0.2}, seed=1)
    assert sorted(assign_ranks(7, {4: 0.3, 8: 0.5, 16: 0.2}, 0)).count(8) in (3, 4)


def test_invalid_tiers_and_adapters_are_rejected():
    with pytest.raises(ConfigError, match="add up to 1"):
        validate({"method": {"name": "hetlora", "rank_tiers": {"4": 0.5, "8": 0.4}}})
    with pytest.raises(ConfigError, match="needs adapter.type = 'lora'"):
        validate({"method": {"name": "flexlora"}, "adapter": {"type": "loha", "target_modules": ["query"]}})
    with pytest.raises(ConfigError, match="dp.enabled"):
        validate({"method": {"name": "flexlora"}, "dp": {"enabled": True, "noise_multiplier": 1.0}})
    cfg = validate({"method": {"name": "hetlora", "rank_tiers": {"4": 0.5, "12": 0.5}}})
    assert cfg.adapter.peft_kwargs()["r"] == 12


def test_flexlora_sends_each_tier_the_optimal_rank_r_factorization_of_the_mean_update():
    _, model, strategy = _strategy("flexlora")
    replies, sent = _train_round(strategy, model)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert not strategy.pop_rejections()
    weights = np.array([n for _, n, _ in sent], dtype=float) / sum(n for _, n, _ in sent)
    global_state = {k: arrays[k].numpy() for k in arrays}
    for ka, kb in lora_pairs(global_state):
        mean = sum(w * (s[kb].astype(np.float64) @ s[ka]) for w, (_, _, s) in zip(weights, sent))
        sv = np.linalg.svd(mean, compute_uv=False)
        for rank in (2, 4, 8):
            tier = truncate_lora(global_state, rank)  # exactly what a rank-r client is sent
            err = np.linalg.norm(mean - tier[kb].astype(np.float64) @ tier[ka])
            assert err == pytest.approx(np.sqrt((sv[rank:] ** 2).sum()), rel=1e-4, abs=1e-6)


def test_hetlora_averages_zero_padded_factors_and_truncates_per_tier():
    _, model, strategy = _strategy("hetlora")
    replies, sent = _train_round(strategy, model)
    assert sorted(r for r, _, _ in sent) == [2, 2, 4, 8]
    arrays, _ = strategy.aggregate_train(1, replies)
    shapes = {k: tuple(v.shape) for k, v in adapter_state(model).items()}
    total = sum(n for _, n, _ in sent)
    expected = {k: sum(n / total * pad_lora(s, shapes)[k] for _, n, s in sent) for k in shapes}
    for k in shapes:
        np.testing.assert_allclose(arrays[k].numpy(), expected[k], rtol=1e-5, atol=1e-6)
    # the next round's rank-2 tier gets the first two rows/columns of that average
    msgs = strategy.configure_train(2, arrays, None, _Grid(sorted(strategy.directory.node_to_client)))
    m = next(m for m in msgs if int(m.content["config"][RANK_KEY]) == 2)
    for k in shapes:
        np.testing.assert_array_equal(m.content["arrays"][k].numpy(), truncate_lora(expected, 2)[k].astype(np.float32))


def test_a_reply_of_the_wrong_rank_is_rejected():
    _, model, strategy = _strategy("hetlora")
    replies, sent = _train_round(strategy, model)
    i = next(i for i, (r, _, _) in enumerate(sent) if r == 2)
    shapes = {k: tuple(v.shape) for k, v in adapter_state(model).items()}
    wrong = {k: torch.from_numpy(v) for k, v in pad_lora(sent[i][2], shapes).items()}
    replies[i].content = RecordDict({"arrays": ArrayRecord(wrong), "metrics": replies[i].content["metrics"]})
    strategy.aggregate_train(1, replies)
    (rej,) = strategy.pop_rejections()
    assert "rank-2 reply" in rej.reason


@pytest.mark.parametrize("method", ["flexlora", pytest.param("hetlora", marks=pytest.mark.slow)])
def test_heterogeneous_rank_run_completes_and_upload_bytes_scale_with_rank(tmp_path, method):
    cfg = load(SMOKE, [f'method.name="{method}"', "method.rank_tiers={2 = 0.4, 4 = 0.3, 8 = 0.3}",
                       "sim.rounds=2", f'output.dir="{tmp_path}"'])
    summary = simulate(cfg)
    assert summary["rejected"] == 0 and summary["participations"] == 2 * cfg.sim.clients_per_round
    rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        assert sum(row["bytes_up_by_rank"].values()) == row["bytes_up"]
        assert sum(row["clients_by_rank"].values()) == row["clients"]
    per_msg = {int(k): v for k, v in summary["upload_bytes_per_message_by_rank"].items()}
    ranks = sorted(per_msg)
    assert len(ranks) >= 2 and all(per_msg[a] < per_msg[b] for a, b in zip(ranks, ranks[1:]))
    # LoRA bytes are linear in r: 2 x query/value layers x r x (hidden 32 + hidden 32) x 4 B per rank step
    slope = (per_msg[ranks[-1]] - per_msg[ranks[0]]) / (ranks[-1] - ranks[0])
    assert slope == pytest.approx(2 * 2 * (32 + 32) * 4, rel=0.05)
    ranks_by_client = {int(c): r for c, r in summary["client_ranks"].items()}
    assert ranks_by_client == dict(enumerate(assign_ranks(cfg.sim.num_clients, {2: 0.4, 4: 0.3, 8: 0.3}, 0)))

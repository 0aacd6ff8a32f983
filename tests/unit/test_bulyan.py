"""Bulyan (El Mhamdi et al., 2018): θ = n − 2f replies chosen by repeated Krum, then a coordinate-wise trimmed mean."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.adapters import adapter_state
from fedpeft.app.recipe import load
from fedpeft.config import ConfigError
from fedpeft.models import build_model
from fedpeft.nodes import NodeDirectory
from strategies import get_strategy_class, method_spec

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"
MODEL = build_model(load(SMOKE), num_labels=2)
KEYS = sorted(adapter_state(MODEL))
SHAPES = {k: tuple(v.shape) for k, v in adapter_state(MODEL).items()}
NODES = {201 + i: 10 + i for i in range(7)}  # node id -> client id


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _reply(state: dict[str, np.ndarray], node: int, n: int) -> Message:
    rd = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()}),
                     "metrics": MetricRecord({"num-examples": n})})
    return Message(rd, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


def _strategy(*overrides: str):
    cfg = load(SMOKE, ['method.name="bulyan"', "sim.clients_per_round=7", *overrides])
    return get_strategy_class("bulyan")(cfg, NodeDirectory(dict(NODES)), MODEL)


def _aggregate(states: list[dict[str, np.ndarray]], counts=None, *overrides: str):
    strategy = _strategy(*overrides)
    counts = counts or [10 * (i + 1) for i in range(len(states))]
    arrays, _ = strategy.aggregate_train(1, [_reply(s, node, n) for s, node, n in zip(states, NODES, counts)])
    assert not strategy.pop_rejections()
    return strategy, {k: arrays[k].numpy() for k in arrays}


def test_bulyan_matches_the_hand_computation_and_excludes_the_outlier():
    """Every coordinate of client i is x_i plus a per-tensor offset, so each step can be done by hand on x.

    x = [2, 7, 11, 13, 16, 18, 100], n = 7, f = 1: θ = 5 picks, β = 3 values per coordinate. Krum scores a
    reply by its squared distances to its m − f − 2 nearest among the m left (at least one; the offsets
    cancel in every distance, which is D·(x_i − x_j)² over the D coordinates, so D is left out here):
      m = 7, 4 nearest: 0:423 1:158 2:94 3:74 4:119 5:199 6:29270 -> client 3 (x = 13)
      m = 6, 3 nearest: 0:302 1:122 2:90 4:110 5:174 6:21701     -> client 2 (x = 11)
      m = 5, 2 nearest: 0:221 1:106 4:85 5:125 6:13780           -> client 4 (x = 16)
      m = 4, nearest:   0:25 1:25 5:121 6:6724                   -> client 0 (x = 2; a tie goes to the
                                                                   earlier reply, as np.argmin does)
      m = 3, nearest:   1:121 5:121 6:6724                       -> client 1 (x = 7; tie, earlier reply)
    Selected x: {13, 11, 16, 2, 7}, median 11; distances to it 2, 0, 5, 9, 4: the β = 3 closest are 13,
    11, 7, whose mean is 31/3. The outlier (100) and client 5 (18) are left out. Wrong rules give other
    numbers: the selected five's mean 9.8 or median 11; Krum scores of the first pass only (one-shot
    Multi-Krum selection, as Flower's newer `serverapp.strategy.Bulyan` does) keep 13, 11, 16, 7, 18: 40/3.
    """
    x = [2.0, 7.0, 11.0, 13.0, 16.0, 18.0, 100.0]
    offsets = {k: 0.5 * j for j, k in enumerate(KEYS)}
    states = [{k: np.full(SHAPES[k], xi + offsets[k], dtype=np.float32) for k in KEYS} for xi in x]
    strategy, out = _aggregate(states)
    for k in KEYS:
        assert out[k].dtype == np.float32 and out[k].shape == SHAPES[k]
        np.testing.assert_allclose(out[k], 31.0 / 3.0 + offsets[k], rtol=1e-6)
    assert strategy.round_metrics(1, None) == {"bulyan_selected": [10, 11, 12, 13, 14]}  # clients 0-4


def _reference(states: list[dict[str, np.ndarray]], f: int) -> tuple[list[int], dict[str, np.ndarray]]:
    """Bulyan straight from the paper, in numpy: repeated Krum, then the β values nearest the median per coordinate."""
    flat = np.stack([np.concatenate([s[k].astype(np.float64).ravel() for k in KEYS]) for s in states])
    left, chosen = list(range(len(states))), []
    theta = len(states) - 2 * f
    beta = theta - 2 * f
    for _ in range(theta):
        nearest = max(1, len(left) - f - 2)
        scores = [np.sort([((flat[i] - flat[j]) ** 2).sum() for j in left if j != i])[:nearest].sum() for i in left]
        chosen.append(left.pop(int(np.argmin(scores))))
    out = {}
    for k in KEYS:
        stack = np.stack([states[i][k].astype(np.float64) for i in chosen])
        order = np.argsort(np.abs(stack - np.median(stack, axis=0)), axis=0, kind="stable")[:beta]
        out[k] = np.take_along_axis(stack, order, axis=0).mean(axis=0)
    return sorted(chosen), out


def test_bulyan_matches_a_numpy_reference_on_random_adapters_and_ignores_claimed_counts():
    rng = np.random.default_rng(3)
    glob = {k: v.numpy() for k, v in adapter_state(MODEL).items()}
    honest = [{k: (v + rng.normal(0, 0.05 * (1 + i), v.shape)).astype(np.float32) for k, v in glob.items()}
              for i in range(6)]
    outlier = {k: (v - 40 * (honest[0][k] - v)).astype(np.float32) for k, v in glob.items()}
    states = [*honest, outlier]
    chosen, expected = _reference(states, f=1)
    assert 6 not in chosen
    # the last reply claims 10⁹ examples: Bulyan, like Krum, reads no counts
    strategy, out = _aggregate(states, [10, 20, 30, 40, 50, 60, 10**9])
    assert strategy.round_metrics(1, None)["bulyan_selected"] == [NODES[201 + i] for i in chosen]
    for k in KEYS:
        np.testing.assert_allclose(out[k], expected[k], rtol=1e-5, atol=1e-7)
        # per coordinate a trimmed mean of the selected: not their plain mean
    stacked = np.stack([states[i][KEYS[0]].astype(np.float64) for i in chosen])
    assert not np.allclose(out[KEYS[0]], stacked.mean(axis=0), rtol=1e-5, atol=1e-7)


def test_too_few_replies_after_rejections_lower_f_until_bulyan_fits():
    """7 clients configured for f = 1, 5 valid replies: f falls to 0, so θ = β = 5 and Bulyan is their mean."""
    rng = np.random.default_rng(4)
    states = [{k: rng.normal(0, 1, SHAPES[k]).astype(np.float32) for k in KEYS} for _ in range(7)]
    strategy = _strategy()
    replies = [_reply(s, node, 10) for s, node in zip(states, NODES)]
    replies[5] = _reply({k: np.full(SHAPES[k], np.nan, np.float32) for k in KEYS}, 206, 10)
    replies[6] = _reply(states[6], 207, 0)  # no examples: rejected
    arrays, _ = strategy.aggregate_train(1, replies)
    assert len(strategy.pop_rejections()) == 2
    for k in KEYS:
        np.testing.assert_allclose(arrays[k].numpy(), np.mean([s[k] for s in states[:5]], axis=0),
                                   rtol=1e-5, atol=1e-6)
    assert strategy.round_metrics(1, None)["bulyan_selected"] == [10, 11, 12, 13, 14]


@pytest.mark.parametrize("overrides,match", [
    (["sim.clients_per_round=6"], r"method.f = 1 needs sim.clients_per_round >= 4 \* f \+ 3 = 7 \(got 6\)"),
    (["method.f=2", "sim.clients_per_round=10"], r"method.f = 2 needs .* = 11 \(got 10\)"),
    (["method.f=2", "sim.num_clients=12", "sim.clients_per_round=11"], None),
    (["method.f=0", "sim.clients_per_round=3"], None),
    (["method.m=2", "sim.clients_per_round=7"], r"unknown key 'method.m'"),
    (["method.f=-1"], r"method.f"),
])
def test_a_round_too_small_for_bulyan_is_refused_when_the_recipe_loads(overrides, match):
    if match is None:
        assert load(SMOKE, ['method.name="bulyan"', *overrides]).method.name == "bulyan"
        return
    with pytest.raises(ConfigError, match=match):
        load(SMOKE, ['method.name="bulyan"', *overrides])


def test_bulyan_declares_what_the_other_robust_rules_declare():
    caps, krum = method_spec("bulyan").capabilities, method_spec("krum").capabilities
    assert isinstance(caps.weighted_mean, str) and "Bulyan" in caps.weighted_mean
    assert (caps.sample_dp, caps.user_dp, caps.codecs, caps.uploads) == (krum.sample_dp, krum.user_dp, krum.codecs,
                                                                         krum.uploads)
    assert load(ROOT / "simulations" / "bulyan.toml").method.name == "bulyan"

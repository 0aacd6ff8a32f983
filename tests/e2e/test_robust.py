"""Robust aggregators: coordinate-wise median, trimmed mean, Krum and Multi-Krum over adapter tensors."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.adapters import adapter_state
from fedpeft.config import ConfigError
from fedpeft.models import build_model
from fedpeft.nodes import NodeDirectory
from fedpeft.app.recipe import load
from fedpeft.app.simulate import simulate
from strategies import get_strategy_class, method_spec

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"
METHODS = ["fedmedian", "trimmed-mean", "krum", "multi-krum", "bulyan"]
SIZED = {"bulyan": ["sim.clients_per_round=7"]}  # what a method needs beyond smoke.toml's 5 clients a round (4f + 3)
MODEL = build_model(load(SMOKE), num_labels=2)
KEYS = sorted(adapter_state(MODEL))
NODES = {101 + i: i for i in range(5)}
EXAMPLES = [10, 20, 30, 40, 50]
OUTLIER = 4  # client 4 sends 100 x an honest adapter


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _states() -> list[dict[str, np.ndarray]]:
    """Four honest adapters scattered around a shared global, and one outlier."""
    rng = np.random.default_rng(0)
    glob = {k: v.numpy() for k, v in adapter_state(MODEL).items()}
    honest = [{k: (v + rng.normal(0, 0.1 * (1 + i), v.shape)).astype(np.float32) for k, v in glob.items()}
              for i in range(4)]
    return honest + [{k: (100 * v).astype(np.float32) for k, v in honest[0].items()}]


STATES = _states()


def _reply(state: dict, node: int, n: int) -> Message:
    rd = RecordDict({"arrays": ArrayRecord({k: Array(np.array(v)) for k, v in state.items()}),
                     "metrics": MetricRecord({"num-examples": n, "train-loss": node / 100})})
    return Message(rd, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


def _replies(states=STATES) -> list[Message]:
    return [_reply(s, node, n) for s, node, n in zip(states, NODES, EXAMPLES)]


def _strategy(method: str, *overrides: str):
    cfg = load(SMOKE, [f'method.name="{method}"', *overrides])
    return get_strategy_class(method)(cfg, NodeDirectory(dict(NODES)), MODEL)


def _aggregate(method: str, *overrides: str, states=STATES):
    strategy = _strategy(method, *overrides)
    arrays, metrics = strategy.aggregate_train(1, _replies(states))
    assert not strategy.pop_rejections()
    return strategy, {k: arrays[k].numpy() for k in arrays}, metrics


def _stack(key: str, clients=range(5)) -> np.ndarray:
    return np.stack([STATES[i][key].astype(np.float64) for i in clients])


def _krum_scores(f: int) -> list[float]:
    """Each client's Krum score, straight from the paper: squared distances to its n - f - 2 nearest others."""
    flat = [np.concatenate([s[k].astype(np.float64).ravel() for k in KEYS]) for s in STATES]
    n = len(flat)
    scores = []
    for i in range(n):
        d = sorted(float(((flat[i] - flat[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    return scores


def _assert_within_honest(out: dict[str, np.ndarray]) -> None:
    for k in KEYS:
        honest = _stack(k, range(4))
        assert np.all(out[k] >= honest.min(0) - 1e-6) and np.all(out[k] <= honest.max(0) + 1e-6), k


def test_fedmedian_is_numpys_coordinate_wise_median():
    _, out, metrics = _aggregate("fedmedian")
    for k in KEYS:
        assert out[k].dtype == STATES[0][k].dtype and out[k].shape == STATES[0][k].shape
        np.testing.assert_array_equal(out[k], np.median(_stack(k), axis=0).astype(np.float32))
    _assert_within_honest(out)
    # The round's train loss describes every accepted reply, selected or not.
    assert metrics["train-loss"] == pytest.approx(np.average([n / 100 for n in NODES], weights=EXAMPLES))


def test_trimmed_mean_drops_one_value_at_each_end_per_coordinate():
    _, out, _ = _aggregate("trimmed-mean", "method.beta=0.2")
    for k in KEYS:
        ordered = np.sort(_stack(k), axis=0)
        np.testing.assert_allclose(out[k], ordered[1:4].mean(axis=0), rtol=1e-6, atol=1e-7)
    _assert_within_honest(out)
    _, plain, _ = _aggregate("trimmed-mean", "method.beta=0")  # beta = 0: the unweighted mean, outlier included
    np.testing.assert_allclose(plain[KEYS[0]], _stack(KEYS[0]).mean(axis=0), rtol=1e-6)


def test_krum_returns_the_tensors_of_the_client_the_score_formula_picks():
    scores = _krum_scores(f=1)
    best = int(np.argmin(scores))
    assert best != OUTLIER and sorted(scores)[0] < sorted(scores)[1]  # a unique winner
    strategy, out, _ = _aggregate("krum", "method.f=1")
    for k in KEYS:
        np.testing.assert_array_equal(out[k], STATES[best][k])
    assert strategy.round_metrics(1, None) == {"krum_selected": [best]}
    _assert_within_honest(out)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_multi_krum_averages_exactly_the_m_best_scored_uniformly(m):
    chosen = list(np.argsort(_krum_scores(f=1))[:m])
    assert OUTLIER not in chosen
    strategy, out, _ = _aggregate("multi-krum", "method.f=1", f"method.m={m}")
    assert sorted(strategy.round_metrics(1, None)["krum_selected"]) == sorted(chosen)
    for k in KEYS:
        expected = np.mean([STATES[i][k].astype(np.float64) for i in chosen], axis=0)  # Blanchard et al.: unweighted
        assert out[k].dtype == np.float32
        np.testing.assert_allclose(out[k], expected, rtol=1e-5, atol=1e-6)
    _assert_within_honest(out)


def test_a_selected_attacker_claiming_a_billion_examples_does_not_take_the_multi_krum_mean():
    """A small, biased update sits among the honest ones, so Krum keeps it; its claimed weight must not count."""
    honest = STATES[:4]
    centre = {k: np.mean([s[k].astype(np.float64) for s in honest], axis=0) for k in KEYS}
    attacker = {k: (v + 0.05).astype(np.float32) for k, v in centre.items()}  # the honest mean, shifted
    states = [*honest, attacker]
    strategy = _strategy("multi-krum", "method.f=1", "method.m=3")
    replies = [_reply(s, node, n) for s, node, n in zip(states, NODES, [10, 20, 30, 40, 10**9])]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert not strategy.pop_rejections()
    chosen = sorted(strategy.round_metrics(1, None)["krum_selected"])
    assert 4 in chosen and len(chosen) == 3  # the attacker is selected
    for k in KEYS:
        expected = np.mean([states[i][k].astype(np.float64) for i in chosen], axis=0)
        np.testing.assert_allclose(arrays[k].numpy(), expected, rtol=1e-5, atol=1e-6)
    flat = lambda d: np.concatenate([np.asarray(d[k], dtype=np.float64).ravel() for k in KEYS])  # noqa: E731
    out = flat({k: arrays[k].numpy() for k in KEYS})
    others = np.mean([flat(states[i]) for i in chosen if i != 4], axis=0)
    # Weighted by claims, the mean would be the attacker's update to within 1e-7; uniformly it is a third of the way.
    assert np.linalg.norm(out - flat(attacker)) > 0.6 * np.linalg.norm(others - flat(attacker))


def test_multi_krum_default_m_is_all_but_f():
    strategy, _, _ = _aggregate("multi-krum", "method.f=1")
    assert sorted(strategy.round_metrics(1, None)["krum_selected"]) == [0, 1, 2, 3]


def test_distances_survive_a_large_shared_component():
    """Clients that differ by 1e-4 around weights of size ~1e3: float32 |x|² + |y|² − 2x·y would lose them."""
    rng = np.random.default_rng(1)
    glob = {k: np.full(v.shape, 1000.0) for k, v in STATES[0].items()}
    spread = [1e-4, 1e-4, 1e-4, 1e-4, 3e-3]  # client 4 is the farthest from the rest, though not by much
    states = [{k: (g + rng.normal(0, s, g.shape)).astype(np.float32) for k, g in glob.items()} for s in spread]
    strategy, _, _ = _aggregate("multi-krum", "method.f=1", "method.m=4", states=states)
    assert sorted(strategy.round_metrics(1, None)["krum_selected"]) == [0, 1, 2, 3]


@pytest.mark.parametrize("method,opts", [("krum", ["method.f=1"]), ("multi-krum", ["method.f=1", "method.m=4"]),
                                         ("trimmed-mean", ["method.beta=0.2"]), ("fedmedian", [])])
def test_rejections_leave_too_few_replies_and_the_round_still_aggregates(method, opts):
    strategy = _strategy(method, *opts)
    replies = _replies()
    bad = {k: np.full_like(v, np.nan) for k, v in STATES[1].items()}
    replies[1] = _reply(bad, 102, 20)
    replies[2] = _reply(STATES[2], 103, 0)  # no examples: rejected
    arrays, _ = strategy.aggregate_train(1, replies)  # 3 valid replies: below 2f + 3 and 2 / beta
    assert len(strategy.pop_rejections()) == 2
    out = {k: arrays[k].numpy() for k in arrays}
    assert all(np.isfinite(v).all() for v in out.values())
    if method == "krum":  # f falls back to 0: plain Krum over the three left
        assert strategy.round_metrics(1, None)["krum_selected"][0] in {0, 3}  # never the outlier


# ----- recipe validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_user_level_dp_and_merge_rules_are_refused_because_the_aggregate_is_not_a_mean(method):
    reason = method_spec(method).capabilities.weighted_mean
    assert isinstance(reason, str) and reason
    with pytest.raises(ConfigError, match=r"needs an aggregate that is the mean.*aggregates by " + re.escape(reason)):
        load(SMOKE, [f'method.name="{method}"', *SIZED.get(method, []), "dp.user.enabled=true",
                     "dp.user.noise_multiplier=1.0"])
    with pytest.raises(ConfigError, match=r"codecs.merge = 'ties' replaces the mean.*use codecs.merge = 'mean'"):
        load(SMOKE, [f'method.name="{method}"', *SIZED.get(method, []), 'codecs.merge="ties"', 'codecs.up=["delta"]'])


@pytest.mark.parametrize("method", METHODS)
def test_sample_level_dp_and_codecs_are_accepted(method):
    sized = SIZED.get(method, [])
    assert load(SMOKE, [f'method.name="{method}"', *sized, "dp.enabled=true", "dp.noise_multiplier=1.0"]).dp.enabled
    load(SMOKE, [f'method.name="{method}"', *sized, 'codecs.up=["delta", "int8"]', 'codecs.down=["fp16"]'])


@pytest.mark.parametrize("overrides,match", [
    (['method.name="krum"', "method.f=2"], r"method.f = 2 needs sim.clients_per_round > 2 \* f \+ 2 = 6 \(got 5\)"),
    (['method.name="multi-krum"', "method.f=2"], r"method.f = 2"),
    (['method.name="krum"', "method.f=2", "sim.clients_per_round=7"], None),
    (['method.name="multi-krum"', "method.f=1", "method.m=5"], r"method.m = 5 exceeds .* = 4"),
    (['method.name="multi-krum"', "method.f=1", "method.m=0"], r"method.m"),
    (['method.name="krum"', "method.m=2"], r"unknown key 'method.m'"),
    (['method.name="krum"', "method.f=-1"], r"method.f"),
    (['method.name="trimmed-mean"', "method.beta=0.5"], r"method.beta"),
    (['method.name="trimmed-mean"', "method.beta=0.1"], r"method.beta = 0.1 trims int\(0.1 \* 5\) = 0"),
    (['method.name="trimmed-mean"', "method.beta=0.1", "sim.clients_per_round=10"], None),
    (['method.name="fedmedian"', "method.beta=0.1"], r"unknown key 'method.beta'"),
])
def test_options_that_cannot_work_are_refused_naming_the_keys(overrides, match):
    if match is None:
        load(SMOKE, overrides)
        return
    with pytest.raises(ConfigError, match=match):
        load(SMOKE, overrides)


@pytest.mark.parametrize("name", METHODS)
def test_shipped_recipes_load(name):
    assert load(ROOT / "simulations" / f"{name}.toml").method.name == name


# ----- end to end -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_multi_krum_run_with_coded_uploads_completes_and_charges_bytes(tmp_path):
    # One Ray worker: starting a second one costs more than the five 2-step clients it would share.
    cfg = load(SMOKE, ['method.name="multi-krum"', "method.f=1", "sim.num_clients=6", "sim.clients_per_round=5",
                       "sim.rounds=2", "sim.num_cpus=1", "train.local_steps=2", "data.builtin.num_train=300",
                       "data.builtin.num_test=60", 'codecs.up=["delta", "int8"]', f'output.dir="{tmp_path}"'])
    summary = simulate(cfg)
    assert summary["rejected"] == 0 and summary["participations"] == 2 * 5
    assert math.isfinite(summary["final_loss"]) and math.isfinite(summary["final_accuracy"])
    rows = list(csv.DictReader((Path(summary["run_dir"]) / "comm.csv").open()))
    up = sum(int(r["bytes"]) for r in rows if r["direction"] == "up")
    down = sum(int(r["bytes"]) for r in rows if r["direction"] == "down")
    assert up > 0 and down > 0 and (down, up) == (summary["bytes_down"], summary["bytes_up"])
    assert {r["record"] for r in rows if r["direction"] == "up" and r["round"] != "0"} >= {"codec"}

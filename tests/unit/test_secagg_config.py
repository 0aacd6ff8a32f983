"""Secure aggregation's config, wire and round glue: refusals with their reasons, records, the strategy's secure step.

No Flower run here (tests/e2e/test_secagg.py runs the protocol in real rounds): the payloads go
through Flower's records and protobuf, and the strategies are built on a tiny model.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.app.metadata import validate_message_type
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.app.recipe import load, validate
from fedpeft.config import ConfigError, SecAggConfig
from fedpeft.models import build_model
from fedpeft.nodes import NodeDirectory
from fedpeft.secagg import DONE, Key, SecAggClient, SecAggServer, Stage, weight_ratio, weighted_mean_error_bound
from fedpeft.secagg.updates import (
    mean_update,
    resolve_shares,
    resolve_threshold,
    round_options,
    upload_vector,
    vector_shapes,
)
from fedpeft.secagg.wire import (
    MASKED,
    STAGES,
    from_content,
    message_type,
    to_content,
)
from strategies import available_methods, get_strategy_class, method_spec

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"
ON = "secagg.enabled=true"


def _refusal(method: str, *extra: str) -> str:
    recipe = ROOT / "simulations" / f"{method}.toml"
    with pytest.raises(ConfigError) as err:
        load(recipe if recipe.is_file() else SMOKE, [f'method.name="{method}"', ON, *extra])
    return str(err.value)


# ----- which methods, mechanisms and options secure aggregation refuses, and why ----------------

@pytest.mark.parametrize("method", [m for m in available_methods() if method_spec(m).capabilities.secagg is not True])
def test_each_method_that_needs_individual_updates_is_refused_with_its_reason(method):
    why = method_spec(method).capabilities.secagg
    assert isinstance(why, str) and why
    msg = _refusal(method)
    assert f"method.name = '{method}'" in msg and why in msg


def test_the_refused_and_the_supported_methods_are_the_declared_ones():
    supported = {m for m in available_methods() if method_spec(m).capabilities.secagg is True}
    assert supported == {"fedavg", "ffa-lora", "fedprox", "fedpara", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
                         "fedsvd"}
    for method in supported:  # each loads with its own recipe
        recipe = ROOT / "simulations" / f"{method}.toml"
        assert load(recipe if recipe.is_file() else SMOKE, [ON]).secagg.enabled


@pytest.mark.parametrize("extra,needle", [
    (['codecs.up=["delta","int8"]'], "[codecs] (a masked upload is uniformly random"),
    (['codecs.down=["fp16"]'], "[codecs]"),
    (['codecs.merge="ties"', 'codecs.up=["delta"]'], "[codecs]"),
    (["dp.user.enabled=true", "dp.user.noise_multiplier=1.0"], "dp.user.side = 'server' (it clips each client's"),
    (["dp.user.enabled=true", "dp.user.noise_multiplier=1.0", 'dp.user.side="client"'], "use dp.user.side = 'distributed'"),
    (["dp.enabled=true", "dp.noise_multiplier=1.0"], "dp.enabled = true (DP-SGD replies"),
    (["faults.byzantine_fraction=0.2", 'faults.attack="scale"'], "faults.attack = 'scale' (it rewrites"),
    (["faults.malformed=0.1"], "faults.malformed (its kinds rewrite"),
    (["sim.comm_budget_mib=5"], "sim.comm_budget_mib (the budget predicts"),
    (["method.clip_norm=0.5"], "method.clip_norm clips each client's update on the server"),
    (['method.lora_aggregation="exact"'], "method.lora_aggregation = 'exact' averages each client's own B·A"),
])
def test_mechanisms_that_need_individual_updates_are_refused(extra, needle):
    assert needle in _refusal("fedavg", *extra)


def test_label_flip_and_crash_drop_straggle_faults_stay_allowed():
    cfg = load(SMOKE, [ON, "faults.byzantine_fraction=0.2", 'faults.attack="label_flip"', "faults.crash=0.1",
                       "faults.drop=0.1", "faults.straggle=0.1"])
    assert cfg.secagg.enabled


@pytest.mark.parametrize("extra,needle", [
    (["secagg.threshold=2"], "secagg.threshold = 2: must exceed secagg.num_shares / 2"),
    (["secagg.threshold=6"], "secagg.threshold = 6 > secagg.num_shares = 5"),
    (["secagg.num_shares=4"], "secagg.num_shares = 4: must be odd"),
    (["secagg.num_shares=7"], "secagg.num_shares = 7: must lie in [3,"),
    (["secagg.quantization_bits=30"], "5 * 2**30 >= 2**mod_bits = 2**32: the sum would overflow; lower secagg.quantization_bits"),
    (["sim.clients_per_round=2"], "at least 3 clients"),
])
def test_options_that_cannot_run_name_the_key(extra, needle):
    with pytest.raises(ConfigError) as err:
        load(SMOKE, [ON, *extra])
    assert needle in str(err.value) and "sim.clients_per_round = " in str(err.value)


@pytest.mark.parametrize("key,value", [("threshold", 2.5), ("num_shares", 3.5), ("clip_range", 0), ("threshold", 0),
                                       ("quantization_bits", 31)])
def test_schema_refuses_bad_values_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"secagg.{key}"):
        load(SMOKE, [ON, f"secagg.{key}={value}"])


def test_fractions_resolve_against_the_round_size():
    cfg = SecAggConfig(enabled=True, threshold=0.6, num_shares=0.5)
    assert resolve_threshold(cfg, 10) == 6 and resolve_threshold(cfg, 5) == 3
    assert resolve_shares(cfg, 10) == 5 and resolve_shares(cfg, 12) == 7  # 6 → the next odd count
    assert resolve_shares(SecAggConfig(num_shares="all"), 9) is None
    assert resolve_shares(SecAggConfig(num_shares=0.9), 10) == 9 and resolve_shares(SecAggConfig(num_shares=5), 10) == 5
    opts = round_options(SecAggConfig(threshold=0.6), 10)
    assert (opts.num_clients, opts.threshold, opts.neighbourhood_size) == (10, 6, 10)
    assert load(SMOKE, [ON]).secagg == SecAggConfig(enabled=True)  # off by default, defaults otherwise


# ----- the wire: message types Flower routes, payloads through records and protobuf -------------

def test_each_stage_has_a_message_type_flower_routes_to_a_train_action():
    types = [message_type(s) for s in STAGES]
    assert types == ["train.secagg_setup", "train.secagg_share_keys", "train", "train.secagg_unmask"]
    assert all(validate_message_type(t) for t in types)
    from clients.app import app

    assert {f"{t}" if "." in t else f"{t}.default" for t in types} <= set(app._registered_funcs)


def _proto(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(content))


def test_payloads_survive_records_and_protobuf():
    payload = {Key.STAGE: Stage.SHARE_KEYS, Key.NODE_ID_LIST: [(1 << 62) + 3, (1 << 62) + 9],
               Key.PUBLIC_KEY_1: [b"a", b"b"], Key.DEAD_NODE_ID_LIST: []}
    assert from_content(_proto(to_content(payload))) == payload
    masked = {Key.MASKED_PARAMETERS: [np.arange(6, dtype=np.uint32).reshape(2, 3), np.array([7], dtype=np.uint32)]}
    content = _proto(to_content(masked))
    assert set(content) == {MASKED}  # an upload is the masked arrays alone
    back = from_content(content)[Key.MASKED_PARAMETERS]
    assert [a.dtype for a in back] == [np.uint32] * 2 and np.array_equal(back[0], masked[Key.MASKED_PARAMETERS][0])
    with pytest.raises(KeyError):
        from_content(RecordDict())


# ----- client vector → secure sum → mean update: the glue around the protocol core --------------

def test_upload_vectors_sum_to_the_weighted_mean_of_clipped_updates():
    rng = np.random.default_rng(0)
    template = {"b": ((2, 3), "float32"), "a": ((4,), "float32")}
    sent = {k: rng.normal(size=s).astype(np.float32) for k, (s, _) in template.items()}
    nodes, weights, max_w = [11, 12, 13, 14], [30.0, 5.0, 17.0, 40.0], 40.0
    trained = {n: {k: (v + rng.normal(scale=0.5, size=v.shape)).astype(np.float32) for k, v in sent.items()}
               for n in nodes}
    cfg = SecAggConfig(enabled=True, threshold=3, clip_range=0.8)
    opts = round_options(cfg, len(nodes))
    server = SecAggServer(opts, nodes, vector_shapes(template), graph_seed=1)
    clients = {n: SecAggClient(n) for n in nodes}
    while server.stage != DONE:
        for nid, req in server.requests().items():
            vec = upload_vector(trained[nid], sent, weights[nodes.index(nid)], max_w, opts)
            server.receive(nid, from_content(_proto(to_content(clients[nid].handle(from_content(
                _proto(to_content(req))), vec, rounding_seed=nid)))))
        server.close_stage()
    result = server.result()
    mean, total_w = mean_update(result.total, list(template), opts, max_w)
    ratios = [weight_ratio(w, max_w, opts) for w in weights]
    assert math.isclose(total_w, sum(ratios) * max_w)
    bound = weighted_mean_error_bound(opts, len(nodes), total_w, max_w)
    for k in template:
        exact = sum(r * np.clip(trained[n][k].astype(np.float64) - sent[k], -0.8, 0.8)
                    for r, n in zip(ratios, nodes)) / sum(ratios)
        assert mean[k].shape == template[k][0] and np.max(np.abs(mean[k] - exact)) <= bound
        plain = sum(r * (trained[n][k].astype(np.float64) - sent[k]) for r, n in zip(ratios, nodes)) / sum(ratios)
        assert np.max(np.abs(plain - exact)) > 100 * bound  # values were clipped, and that showed


def test_a_weight_above_the_public_maximum_is_refused_not_clipped():
    opts = round_options(SecAggConfig(threshold=3), 4)
    with pytest.raises(ValueError, match="max_weight"):
        upload_vector({"a": np.ones(2)}, {"a": np.zeros(2)}, 41.0, 40.0, opts)


# ----- the strategy's secure step: global + mean update, then its own server step ---------------

@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _strategy(method: str, adapter: dict, **extra):
    cfg = validate({"model": {"source": "tiny", "tiny": {"hidden_size": 8, "num_hidden_layers": 1,
                                                          "num_attention_heads": 1, "intermediate_size": 8}},
                    "adapter": adapter, "method": {"name": method}, "secagg": {"enabled": True},
                    "sim": {"num_clients": 4, "clients_per_round": 3, **extra}})
    strategy = get_strategy_class(method)(cfg, NodeDirectory({101: 0, 102: 1, 103: 2, 104: 3}),
                                          build_model(cfg, num_labels=2))
    g = strategy.initial_arrays()
    strategy.global_arrays, strategy.sent = g, dict.fromkeys([101, 102, 103], g)
    rng = np.random.default_rng(3)
    mean = {k: rng.normal(scale=0.01, size=s) for k, (s, _) in strategy.upload_template.items()}
    return strategy, g, mean


LORA = {"type": "lora", "r": 2, "target_modules": ["query"]}


def test_fedavg_takes_global_plus_the_mean_update_and_never_combines(monkeypatch):
    strategy, g, mean = _strategy("fedavg", LORA)
    monkeypatch.setattr(type(strategy), "combine", lambda *a: pytest.fail("combine saw client updates"))
    new = strategy.aggregate_secure(1, mean, 3, None)
    assert strategy.failure is None and list(new.keys()) == list(g.keys())
    for k in g.keys():
        want = (g[k].numpy().astype(np.float64) + mean[k]).astype(np.float32)
        assert new[k].numpy().dtype == np.float32 and np.array_equal(new[k].numpy(), want)


def test_a_server_optimizer_steps_from_the_secure_mean():
    strategy, g, mean = _strategy("fedadam", LORA)
    new = strategy.aggregate_secure(1, mean, 3, None)
    k = next(iter(g.keys()))
    # FedAdam's first step: m = (1-β1)Δ, v = (1-β2)Δ², x + η_t·m/(√v + τ) with the bias-corrected η_t
    o, d = strategy.options, mean[k]
    eta = o.eta * np.sqrt(1 - o.beta_2) / (1 - o.beta_1)
    want = g[k].numpy() + eta * (1 - o.beta_1) * d / (np.sqrt((1 - o.beta_2) * d * d) + o.tau)
    assert np.allclose(new[k].numpy(), want, atol=1e-6) and strategy.steps == 1


def test_fedsvd_keeps_a_then_refactorizes_the_secure_mean_of_b():
    strategy, g, mean = _strategy("fedsvd", LORA)
    assert all("lora_A" not in k for k in mean) and any("lora_A" in k for k in g.keys())
    new = strategy.aggregate_secure(1, mean, 3, None)
    plain = ArrayRecord({k: Array((g[k].numpy() + mean[k]).astype(np.float32)) if k in mean else g[k]
                         for k in g.keys()})
    want = strategy.server_step(1, plain)
    for k in g.keys():
        assert np.allclose(new[k].numpy(), want[k].numpy(), atol=1e-6)


@pytest.mark.parametrize("count,failure,reason", [
    (3, "secure aggregation aborted at stage 'unmask': 2 of 3 clients answered", "aborted at stage 'unmask'"),
    (1, None, "1 updates in the secure sum of 3 sampled clients; sim.min_replies needs 2"),
])
def test_a_failed_protocol_or_too_few_updates_keep_the_global(count, failure, reason):
    strategy, _, mean = _strategy("fedavg", LORA, min_replies=2)
    assert strategy.aggregate_secure(1, mean if failure is None else None, count, failure) is None
    assert reason in strategy.failure



@pytest.mark.parametrize("limits,max_weight,want", [
    ({0: 40, 1: 90}, None, 90.0),  # simulation: the largest partition
    ({0: 40, 1: 90}, 120, 120.0),  # a bound set above it
    ({}, 120, 120.0),  # on SuperNodes: the bound as set
    ({0: 40, 1: 90}, 60, "secagg.max_weight = 60 is below the largest partition (90 examples)"),
    ({}, None, "on SuperNodes needs secagg.max_weight"),
])
def test_the_public_weight_bound_comes_from_the_recipe_or_the_partitions(limits, max_weight, want):
    from fedpeft.app.server import _secure_rounds

    strategy, _, _ = _strategy("fedavg", LORA)
    strategy.example_limits = limits
    cfg = strategy.cfg.model_copy(update={"secagg": strategy.cfg.secagg.model_copy(update={"max_weight": max_weight})})
    if isinstance(want, str):
        with pytest.raises(ConfigError, match=want.replace("(", r"\(").replace(")", r"\)")):
            _secure_rounds(cfg, strategy, None, strategy.directory, None)
    else:
        assert _secure_rounds(cfg, strategy, None, strategy.directory, None).max_weight == want

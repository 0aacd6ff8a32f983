"""Every registered method, codec chain and DP level federates a causal LM's adapter (real ClientApp, real peft, in-process)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.app import app as client_app
from fedpeft.adapters import adapter_state
from fedpeft.recipe_file import read_recipe
from fedpeft.data import prepare
from fedpeft.models import build_model
from fedpeft.nodes import NodeDirectory
from fedpeft.privacy.user_level import with_user_dp
from fedpeft.app.recipe import validate
from fedpeft.app.runconfig import CONFIG_KEY, RUN_DIR_KEY, TASK_KEY
from strategies import available_methods, get_strategy_class

ROOT = Path(__file__).resolve().parents[2]
NODES = {201: 0, 202: 1, 203: 2, 204: 3, 205: 4, 206: 5, 207: 6}
SMALL = ["data.builtin.num_train=160", "data.builtin.num_test=16", "sim.num_clients=7", "sim.clients_per_round=5",
         "train.local_steps=2", "train.batch_size=8", "eval.generate_examples=4", "model.max_length=48",
         "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64"]


class _Grid:
    def get_node_ids(self) -> list[int]:
        return list(NODES)


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 11, 1, 1


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    cfg = validate(read_recipe(ROOT / "simulations/llm-smoke.toml", SMALL))
    out = tmp_path_factory.mktemp("causal-task")
    prepare(cfg, out)
    return out


def _raw(method: str) -> dict:
    """llm-smoke shrunk, with the method's own [method] section and adapter type from its recipe."""
    raw = read_recipe(ROOT / "simulations/llm-smoke.toml", SMALL)
    recipe = ROOT / "simulations" / f"{method}.toml"
    if recipe.is_file():
        own = tomllib.loads(recipe.read_text())
        raw["method"] = own.get("method", {"name": method})
        adapter = {k: v for k, v in own.get("adapter", {}).items() if k != "target_modules"}
        if adapter.get("type", "lora") != "lora":
            raw["adapter"] = {**adapter, "r": 2}
        # the local optimizer the method's recipe needs (SCAFFOLD as published: plain SGD)
        raw["train"].update({k: v for k, v in own.get("train", {}).items() if k in ("optimizer", "momentum")})
    raw["method"]["name"] = method
    if method.startswith("fedkseed"):
        raw["method"]["num_seeds"] = 64
    if "f" in raw["method"]:  # Krum's assumed attackers, scaled to 5 clients per round
        raw["method"].update(f=1, **({"m": 2} if "m" in raw["method"] else {}))
    if method == "bulyan":  # Bulyan needs 4f + 3 = 7 replies for f = 1
        raw["sim"]["clients_per_round"] = 7
    return raw


def _one_round(raw: dict, task_dir: Path, run_dir: Path) -> tuple[dict, dict, list, object]:
    """Round 1 of `raw`: the server's messages → the real ClientApp on each sampled node → aggregate."""
    cfg = validate(raw)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg, 0)
    strategy = with_user_dp(get_strategy_class(cfg.method.name)(cfg, NodeDirectory(NODES), model, run_dir), cfg)
    arrays = strategy.initial_arrays()
    strategy.load_global(model, arrays)
    before = adapter_state(model)
    run_config = {CONFIG_KEY: cfg.to_json(), TASK_KEY: str(task_dir), RUN_DIR_KEY: str(run_dir)}
    replies = []
    for msg in strategy.configure_train(1, arrays, ConfigRecord(), _Grid()):
        node = msg.metadata.dst_node_id
        ctx = Context(run_id=msg.metadata.run_id, node_id=node, node_config={"partition-id": NODES[node]},
                      state=RecordDict(), run_config=run_config)
        replies.append(client_app(msg, ctx))
    new, metrics = strategy.aggregate_train(1, replies)
    strategy.load_global(model, new if new is not None else arrays)  # FedKSeed: replays the round's seeds
    after = adapter_state(model)
    return _flat(before), _flat(after), strategy.pop_rejections(), metrics


def _flat(state) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.float64) for k, v in state.items()}


@pytest.mark.parametrize("method", available_methods())
def test_every_method_trains_a_causal_lm_adapter(method, task_dir, tmp_path):
    before, after, rejected, metrics = _one_round(_raw(method), task_dir, tmp_path / method)
    assert not rejected, [r.reason for r in rejected]
    moved = sum(float(np.abs(after[k] - before[k]).sum()) for k in before if k in after)
    assert moved > 0, f"{method}: the global model did not move"
    assert metrics is not None and np.isfinite(float(metrics["train-loss"]))


@pytest.mark.parametrize("chain", [["delta", "topk:0.1"], ["delta", "int8"], ["delta", "randk:0.2", "ternary"]])
def test_upload_codecs_on_a_causal_lm(chain, task_dir, tmp_path):
    raw = _raw("fedavg")
    raw["codecs"] = {"up": chain, "down": ["fp16"]}
    before, after, rejected, _ = _one_round(raw, task_dir, tmp_path / "codec")
    assert not rejected and any(np.abs(after[k] - before[k]).sum() > 0 for k in before)


def test_sample_level_dp_sgd_on_a_causal_lm_reports_epsilon(task_dir, tmp_path):
    raw = _raw("fedavg")
    raw["dp"] = {"enabled": True, "noise_multiplier": 0.8, "max_grad_norm": 1.0}
    raw["train"]["local_steps"] = 2
    before, after, rejected, metrics = _one_round(raw, task_dir, tmp_path / "dp")
    assert not rejected
    assert any(np.abs(after[k] - before[k]).sum() > 0 for k in before)


def test_user_level_dp_on_a_causal_lm(task_dir, tmp_path):
    raw = _raw("fedavg")
    raw["dp"] = {"user": {"enabled": True, "noise_multiplier": 0.5, "clipping_norm": 0.5}}
    before, after, rejected, _ = _one_round(raw, task_dir, tmp_path / "udp")
    assert not rejected and any(np.abs(after[k] - before[k]).sum() > 0 for k in before)

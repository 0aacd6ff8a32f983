"""What a DP-SGD client releases: only the privatised adapter and non-data figures, the step scaled by
q·n, noise no one else can regenerate outside a simulation, σ solved for the busiest client, ghost refused."""

from __future__ import annotations

import importlib

import copy
import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.first_order import FirstOrderTrainer
from clients.app.runtime import ClientRuntime
from fedpeft.adapters import adapter_state
from fedpeft.config import Config, ConfigError
from fedpeft.data import prepare
from fedpeft.data.prepared import collate
from fedpeft.models import build_model
from fedpeft.privacy import sample_level
from fedpeft.privacy.dpsgd import dp_step, make_private, poisson_loader, release
from fedpeft.app.recipe import load
from fedpeft.state import ClientStateStore

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"
LLM_SMOKE = ROOT / "simulations" / "llm-smoke.toml"
DP = ["dp.enabled=true", "dp.noise_multiplier=1.0", "train.local_steps=2"]
DP_KEYS = {"num-examples", "epsilon", "delta", "noise-multiplier", "sample-rate", "dp-steps", "dp-noise-seeded"}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("task")
    prepare(load(SMOKE), out)
    return out


@pytest.fixture(scope="module")
def task(task_dir):
    from fedpeft.data import open_prepared

    return open_prepared(str(task_dir))


def _msg(state: dict, server_round: int = 1) -> Message:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _train(cfg: Config, task, model, start: dict, store: Path, simulated: bool, cls=FirstOrderTrainer) -> RecordDict:
    """One client's round on `model` from the adapter `start`, in a runtime that is `simulated` or not."""
    return cls(ClientRuntime(cfg, task, model, str(store), simulated=simulated)).train(_msg(start), 0)


# ----- 1. the reply carries nothing computed from the data but the adapter ---------------------------
def test_a_dp_reply_carries_no_loss_steps_or_time_only_the_example_count_and_privacy_figures(task, tmp_path):
    cfg = load(SMOKE, DP)
    model = build_model(cfg, task.num_labels)
    start = adapter_state(model)
    m = dict(_train(cfg, task, model, start, tmp_path, simulated=True)["metrics"])
    assert set(m) == DP_KEYS  # no train-loss, train-steps (non-empty draws) or train-s
    assert m["num-examples"] == len(task.client_dataset(0))
    plain = load(SMOKE, ["train.local_steps=2"])
    m = dict(_train(plain, task, model, start, tmp_path / "plain", simulated=True)["metrics"])
    assert {"train-loss", "train-steps", "train-s"} <= set(m)  # without DP they stay


def test_fedavg_aggregates_dp_replies_without_a_train_loss(task, tmp_path):
    from fedpeft.nodes import NodeDirectory
    from strategies import get_strategy_class

    cfg = load(SMOKE, DP)
    model = build_model(cfg, task.num_labels)
    reply = _train(cfg, task, model, adapter_state(model), tmp_path, simulated=True)
    msgs = [Message(reply, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))
            for node in (101, 102)]
    strategy = get_strategy_class("fedavg")(cfg, NodeDirectory({101: 0, 102: 1}), model)
    arrays, metrics = strategy.aggregate_train(1, msgs)
    assert arrays is not None and not strategy.pop_rejections()
    assert "train-loss" not in metrics and metrics["epsilon"] == pytest.approx(reply["metrics"]["epsilon"])


# ----- 2. the noisy sum is divided by the expected batch size q·n ------------------------------------
def _no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def test_a_noiseless_dp_step_is_the_clipped_sum_over_q_times_n(task):
    bound, lr = 0.05, 1.0
    cfg = load(SMOKE, [*DP, f"dp.max_grad_norm={bound}"])  # batch_size 16
    ds = task.client_dataset(0).select(range(30))  # n = 30: Opacus on its own divides by 30
    q = sample_level.sample_rate(cfg, len(ds))
    model = _no_dropout(build_model(cfg, task.num_labels)).train()
    reference = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    loader = poisson_loader(ds, q, task.pad_token_id, torch.Generator().manual_seed(0))
    dp_model, opt, criterion = make_private(model, torch.optim.SGD(params, lr=lr), loader, cfg, 0.0)
    assert opt.expected_batch_size == pytest.approx(16)
    rows = list(range(8))
    dp_step(dp_model, opt, criterion, collate([ds["input_ids"][i] for i in rows], [ds["label"][i] for i in rows],
                                              task.pad_token_id))
    release(dp_model, params)
    # Independently: each example's own gradient, clipped to the bound, summed, over q·n = 16.
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in ref_params]
    for i in rows:
        reference.zero_grad(set_to_none=True)
        reference(**collate([ds["input_ids"][i]], [ds["label"][i]], task.pad_token_id)).loss.backward()
        grads = [p.grad.detach().clone() for p in ref_params]
        norm = torch.cat([g.flatten() for g in grads]).norm()
        for t, g in zip(total, grads):
            t += g * min(1.0, bound / (float(norm) + 1e-6))
    for p, b, t in zip(params, before, total):
        torch.testing.assert_close(p.detach() - b, -lr * t / 16, rtol=1e-4, atol=1e-8)


# ----- 3. the target ε holds for a client sampled in every round --------------------------------------
def test_target_epsilon_holds_for_a_client_that_trains_in_every_round(tmp_path):
    cfg = load(SMOKE, ["dp.enabled=true", "dp.target_epsilon=4.0", "sim.rounds=3"])  # 5 of 10 clients a round
    plan = sample_level.plan(cfg, 120, 1e-4)
    store = ClientStateStore(tmp_path)
    for rnd in range(1, cfg.sim.rounds + 1):  # the busiest possible client: drawn every round
        eps = sample_level.account_round(store, 0, rnd, plan, plan.steps, "rdp")["epsilon"]
    assert 3.9 <= eps <= 4.0
    assert sample_level.max_participations(cfg) == 3


# ----- 5. ghost clipping cannot reach a loss it does not compute --------------------------------------
GHOST = ["dp.enabled=true", "dp.noise_multiplier=1.0", "dp.grad_sample_mode='ghost'"]


@pytest.mark.parametrize("recipe,extra", [
    (LLM_SMOKE, []),  # a causal recipe with DP and ghost turned on by overrides
    (SMOKE, ['model.kind="causal-lm"', 'model.tiny.arch="llama"']),  # a classifier recipe turned causal
])
def test_ghost_with_a_causal_lm_is_refused_when_the_recipe_is_loaded(recipe, extra):
    with pytest.raises(ConfigError, match="ghost.*causal-lm.*use 'hooks'"):
        load(recipe, [*extra, *GHOST])
    raw = load(recipe, [*extra, "dp.enabled=true", "dp.noise_multiplier=1.0"]).model_dump()
    raw["dp"]["grad_sample_mode"] = "ghost"  # the JSON a client rebuilds its config from is checked too
    with pytest.raises(ConfigError, match="ghost"):
        Config.from_json(json.dumps(raw))


class _OwnLoss(FirstOrderTrainer):
    def loss(self, ctx, model, batch):
        return 2 * super().loss(ctx, model, batch)


def test_ghost_with_a_trainer_that_changes_the_loss_is_refused_and_leaves_the_model_clean(task, tmp_path):
    cfg = load(SMOKE, GHOST)
    model = build_model(cfg, task.num_labels)
    with pytest.raises(ValueError, match="changes the loss"):
        _train(cfg, task, model, adapter_state(model), tmp_path, simulated=True, cls=_OwnLoss)
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


# ----- 6. DP noise: seeded in a simulation, unreproducible elsewhere ----------------------------------
def test_dp_noise_is_fresh_outside_a_simulation_and_reproducible_inside(task, tmp_path):
    cfg = load(SMOKE, [*DP, "train.local_steps=1"])
    model = build_model(cfg, task.num_labels)
    start = adapter_state(model)

    def adapter(simulated: bool, tag: str, c: Config = cfg) -> tuple[torch.Tensor, int]:
        reply = _train(c, task, model, start, tmp_path / tag, simulated)
        flat = torch.cat([torch.from_numpy(a.numpy()).flatten() for _, a in sorted(reply["arrays"].items())])
        return flat, int(reply["metrics"]["dp-noise-seeded"])

    (sim_a, seeded_a), (sim_b, seeded_b) = adapter(True, "s1"), adapter(True, "s2")
    (dep_a, os_a), (dep_b, os_b) = adapter(False, "d1"), adapter(False, "d2")
    assert (seeded_a, seeded_b, os_a, os_b) == (1, 1, 0, 0)
    assert torch.equal(sim_a, sim_b)  # same seed, same run: bit-identical
    assert not torch.equal(dep_a, dep_b) and not torch.equal(dep_a, sim_a)  # same seed, fresh noise
    forced, seeded = adapter(False, "f", load(SMOKE, [*DP, "train.local_steps=1", 'dp.noise_source="seeded"']))
    assert seeded == 1 and torch.equal(forced, sim_a)  # dp.noise_source overrides the default
    # Every example in every batch (q = 1): the batches cannot differ, so the Gaussian noise alone does.
    full = load(SMOKE, [*DP, "train.local_steps=1", "train.batch_size=100000"])
    assert not torch.equal(adapter(False, "q1", full)[0], adapter(False, "q2", full)[0])
    assert torch.equal(adapter(True, "q3", full)[0], adapter(True, "q4", full)[0])


def test_poisson_batches_are_fresh_outside_a_simulation_and_reproducible_inside(task, tmp_path):
    from clients.local_steps import DPSteps, LocalRound
    from clients.rows import ClientRows

    cfg = load(SMOKE, DP)
    model = build_model(cfg, task.num_labels)
    params = [p for p in model.parameters() if p.requires_grad]

    def labels(simulated: bool) -> list[list[int]]:
        trainer = FirstOrderTrainer(ClientRuntime(cfg, task, model, str(tmp_path), simulated=simulated))
        steps = DPSteps(trainer, LocalRound(_msg(adapter_state(model)), 0, 1, ClientRows(task, 0), params))
        return [[] if b is None else b["labels"].tolist() for b in steps.draws(6)]

    assert labels(True) == labels(True)
    assert labels(False) != labels(False)


@pytest.mark.parametrize("run_dir,simulated", [(True, True), (False, False)])
def test_the_clientapp_runtime_is_simulated_only_under_fedpeft_simulate(task_dir, tmp_path, monkeypatch,
                                                                        run_dir, simulated):
    runtime = importlib.import_module("clients.app.runtime")  # the module (clients.app re-exports a function of that name)
    from fedpeft.app.runconfig import CONFIG_KEY, RUN_DIR_KEY, TASK_KEY

    monkeypatch.setattr(runtime, "pin_client_threads", lambda n: None)  # keep this process's threads
    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path))
    rc = {CONFIG_KEY: load(SMOKE).to_json(), TASK_KEY: str(task_dir)}
    if run_dir:  # what `fedpeft simulate` adds to the run config
        rc[RUN_DIR_KEY] = str(tmp_path / "run")
    assert runtime._runtime.__wrapped__(tuple(rc.items()), 1).simulated is simulated


def test_an_empty_poisson_draw_takes_a_noise_only_step():
    """Skipping it would reveal in the adapter that the draw held no example; the accountant counts it as a step."""
    from opacus.optimizers import DPOptimizer

    from fedpeft.privacy import dpsgd

    layer = torch.nn.Linear(200, 100)
    before = [p.detach().clone() for p in layer.parameters()]
    opt = DPOptimizer(torch.optim.SGD(layer.parameters(), lr=1.0), noise_multiplier=2.0, max_grad_norm=0.5,
                      expected_batch_size=4, generator=torch.Generator().manual_seed(3))
    adjusted = []
    dpsgd.noise_step(opt, adjust=lambda: adjusted.append(True))
    step = torch.cat([(b - p.detach()).ravel() for b, p in zip(before, layer.parameters())])
    # SGD at lr 1 moves by the noised gradient: N(0, (σC)²) / (q·n) = std 2·0.5/4 = 0.25 per coordinate.
    assert abs(float(step.std()) - 0.25) < 0.01 and abs(float(step.mean())) < 0.01
    assert adjusted == [True] and all(p.grad is None for p in layer.parameters())

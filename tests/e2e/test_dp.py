"""Differential privacy: per-sample clipping, ε equal to Opacus's accountants, per-client accumulation, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import PRVAccountant, RDPAccountant
from peft import PeftModel

from fedpeft.privacy.dpsgd import dp_step, make_private, poisson_loader, release
from clients.first_order import FirstOrderTrainer
from clients.app.runtime import ClientRuntime
from fedpeft.privacy import sample_level as dp
from fedpeft.adapters import adapter_state, load_adapter_state
from fedpeft.config import ConfigError
from fedpeft.app.recipe import load
from fedpeft.data import prepare
from fedpeft.data.prepared import collate
from fedpeft.evaluation import evaluate
from fedpeft.models import build_model, load_base_model
from fedpeft.state import ClientStateStore

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"
DP = ["dp.enabled=true", "dp.noise_multiplier=1.0", "train.local_steps=3"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return prepare(load(SMOKE), tmp_path_factory.mktemp("task"))


def _batch(task, n: int = 8) -> dict[str, torch.Tensor]:
    ds = task.client_dataset(0)
    return collate(list(ds["input_ids"][:n]), list(ds["label"][:n]), task.pad_token_id)


def _msg(model, server_round: int) -> Message:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    content = RecordDict({"arrays": ArrayRecord(adapter_state(model)), "config": ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


# ----- clipping ----------------------------------------------------------------------------------
def test_per_sample_gradients_are_clipped_to_the_bound_before_noise(task):
    bound = 1e-3  # far below the raw per-sample norms, so every sample is clipped
    cfg = load(SMOKE, [*DP, f"dp.max_grad_norm={bound}"])
    model = build_model(cfg, task.num_labels).train()
    params = [p for p in model.parameters() if p.requires_grad]
    loader = poisson_loader(task.client_dataset(0), 0.1, task.pad_token_id, torch.Generator().manual_seed(0))
    dp_model, opt, _ = make_private(model, torch.optim.SGD(params, lr=1.0), loader, cfg, noise_multiplier=0.0)
    dp_model(**_batch(task)).loss.backward()
    per_sample = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params], dim=1).norm(dim=1)
    assert (per_sample > bound).all()
    opt.clip_and_accumulate()  # Opacus's own clipping step (pre-noise)
    factor = (bound / (per_sample + 1e-6)).clamp(max=1.0)
    clipped_norms = per_sample * factor
    assert (clipped_norms <= bound * (1 + 1e-5)).all()
    for p in params:  # the accumulated gradient is exactly the sum of the clipped per-sample ones
        expected = torch.einsum("i,i...->...", factor, p.grad_sample)
        torch.testing.assert_close(p.summed_grad, expected, rtol=1e-5, atol=1e-9)
    summed = torch.cat([p.summed_grad.flatten() for p in params]).norm()
    assert summed <= 8 * bound * (1 + 1e-5)
    release(dp_model, params)


def test_ghost_clipping_gives_the_same_noiseless_update_as_hooks(task):
    updates = []
    for mode in ("hooks", "ghost"):
        cfg = load(SMOKE, [*DP, "dp.max_grad_norm=0.01", f"dp.grad_sample_mode='{mode}'"])
        torch.manual_seed(0)
        model = build_model(cfg, task.num_labels).train()
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        loader = poisson_loader(task.client_dataset(0), 0.1, task.pad_token_id, torch.Generator().manual_seed(0))
        dp_model, opt, criterion = make_private(model, torch.optim.SGD(params, lr=1.0), loader, cfg, 0.0)
        dp_step(dp_model, opt, criterion, _batch(task))
        release(dp_model, params)
        updates.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)]))
    assert updates[0].abs().max() > 0
    torch.testing.assert_close(updates[0], updates[1], rtol=1e-4, atol=1e-7)


# ----- accounting ----------------------------------------------------------------------------------
def _trainer(tmp_path, task, overrides: list[str]) -> FirstOrderTrainer:
    cfg = load(SMOKE, [*DP, *overrides])
    return FirstOrderTrainer(ClientRuntime(cfg, task, build_model(cfg, task.num_labels), str(tmp_path)))


@pytest.mark.parametrize("mechanism,cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_reported_epsilon_equals_opacus_accountant(tmp_path, task, mechanism, cls):
    tr = _trainer(tmp_path, task, [f"dp.accountant='{mechanism}'"])
    m = tr.train(_msg(tr.rt.model, 1), 0)["metrics"]
    delta, q = dp.resolve_delta(tr.rt.cfg, [len(p) for p in task.partitions]), 16 / len(task.client_dataset(0))
    acc = cls()
    for _ in range(3):
        acc.step(noise_multiplier=1.0, sample_rate=q)
    assert m["sample-rate"] == pytest.approx(q) and m["delta"] == delta and m["dp-steps"] == 3
    assert m["epsilon"] == pytest.approx(acc.get_epsilon(delta=delta), rel=1e-9)


def test_epsilon_grows_only_for_clients_that_trained(tmp_path, task):
    tr = _trainer(tmp_path, task, [])
    model, store = tr.rt.model, ClientStateStore(tmp_path / "client_state")
    e0 = tr.train(_msg(model, 1), 0)["metrics"]["epsilon"]
    e1 = tr.train(_msg(model, 1), 1)["metrics"]["epsilon"]
    e0b = tr.train(_msg(model, 2), 0)["metrics"]["epsilon"]  # client 1 is not sampled in round 2
    assert e0b > e0
    assert store.load(1)["epsilon"] == e1 and store.load(1)["rounds"] == [1]
    assert store.load(0)["rounds"] == [1, 2] and store.load(0)["history"][-1][2] == 6
    acc = RDPAccountant()
    for _ in range(6):
        acc.step(noise_multiplier=1.0, sample_rate=store.load(0)["history"][0][1])
    assert e0b == pytest.approx(acc.get_epsilon(delta=store.load(0)["delta"]), rel=1e-9)
    assert store.client_ids() == [0, 1]


def test_cached_model_is_clean_after_a_dp_client(tmp_path, task):
    tr = _trainer(tmp_path, task, [])
    model = tr.rt.model
    tr.train(_msg(model, 1), 0)
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "_forward_counter") for p in model.parameters())
    fresh = build_model(tr.rt.cfg, task.num_labels)
    load_adapter_state(fresh, adapter_state(model))
    grads = []
    for m in (model, fresh):  # a plain (non-DP) forward/backward behaves like on a never-wrapped model
        m.eval()
        m(**_batch(task)).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad]))
        m.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[0], grads[1])


# ----- invalid combinations -----------------------------------------------------------------------
def test_dp_with_a_zeroth_order_method_is_rejected():
    with pytest.raises(ConfigError, match=r"dp\.enabled.*fedkseed"):
        load(SMOKE, ['method.name="fedkseed"', *DP])


@pytest.mark.parametrize("noise", [["dp.noise_multiplier=1.0", "dp.target_epsilon=8.0"], []], ids=["both", "neither"])
def test_exactly_one_noise_source(noise):
    with pytest.raises(ConfigError, match="exactly one of dp.noise_multiplier and dp.target_epsilon"):
        load(SMOKE, ["dp.enabled=true", *noise])


def test_delta_at_least_one_over_n_is_rejected():
    cfg = load(SMOKE, [*DP, "dp.delta=0.01"])
    with pytest.raises(ConfigError, match=r"dp\.delta = 0\.01 is >= 1/n .* n = 120"):
        dp.check_task(cfg, [120, 80])
    dp.check_task(load(SMOKE, [*DP, "dp.delta=0.001"]), [120, 80])  # 0.001 < 1/120: fine


def test_unreachable_target_epsilon_is_rejected():
    cfg = load(SMOKE, ["dp.enabled=true", "dp.target_epsilon=1e-7"])
    with pytest.raises(ConfigError, match=r"dp\.target_epsilon = 1e-07 cannot be reached"):
        dp.check_task(cfg, [120])


def test_target_epsilon_solves_noise_for_a_client_in_every_round():
    cfg = load(SMOKE, ["dp.enabled=true", "dp.target_epsilon=4.0"])
    plan = dp.plan(cfg, 120, 1e-4)
    total = 10 * cfg.sim.rounds  # 10 local steps in each of the 3 rounds (5 of 10 clients a round)
    acc = RDPAccountant()
    acc.history = [(plan.noise_multiplier, plan.sample_rate, total)]
    assert dp.max_participations(cfg) == 3
    assert 3.9 <= acc.get_epsilon(delta=1e-4) <= 4.0


# ----- end to end ------------------------------------------------------------------------------------
def test_dp_simulation_reports_epsilon_and_exports_a_loadable_adapter(tmp_path):
    from fedpeft.app.simulate import simulate

    cfg = load(SMOKE, [*DP, "sim.rounds=2", f'output.dir="{tmp_path}"'])
    summary = simulate(cfg)
    rd = Path(summary["run_dir"])
    rows = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if "epsilon_max" in r] == [1, 2]
    with (rd / "privacy.csv").open() as f:
        ledger = list(csv.DictReader(f))
    assert len(ledger) == 2 * cfg.sim.clients_per_round
    latest = {r["client_id"]: float(r["epsilon"]) for r in ledger}  # rows are in round order
    assert summary["epsilon_max"] == max(latest.values())
    assert rows[-1]["epsilon_max"] == max(float(r["epsilon"]) for r in ledger if r["round"] == "2")
    assert summary["epsilon_max"] >= summary["epsilon_median"] > 0
    assert {r["status"] for r in ledger} == {"accepted"} and summary["sample_noise_source"] == "seeded"
    # DP replies carry no training loss: the rows have none, and the report is written without it.
    assert not any("train_loss" in r for r in rows)
    from fedpeft.report import make_report

    assert make_report([rd], tmp_path / "report")["report.html"].is_file()
    from fedpeft.data import open_prepared

    t = open_prepared(str(rd / "data"))
    reloaded = PeftModel.from_pretrained(load_base_model(cfg, t.num_labels), str(rd / "adapter"))
    result = evaluate(reloaded, t.test, cfg.sim.eval_batch_size, t.pad_token_id)
    assert result["accuracy"] == summary["final_accuracy"]

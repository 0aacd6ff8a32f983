"""FedProx, SCAFFOLD and the server optimizers: each aggregate or step against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.base import ClientRuntime
from clients.registry import get_trainer_class
from fedpeft.adapters import adapter_state
from fedpeft.data import prepare
from fedpeft.models import build_model
from fedpeft.nodes import NodeDirectory
from fedpeft.app.recipe import load
from fedpeft.state import ClientStateStore
from strategies import method_spec
from fedpeft.methods.scaffold_wire import CONTROL, VARIATE_SET

SMOKE = "simulations/smoke.toml"
NODES = {101: 0, 102: 1, 103: 2}


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    cfg = load(SMOKE, ["data.builtin.num_train=200", "data.builtin.num_test=40", "sim.num_clients=3",
                       "sim.clients_per_round=3"])
    return prepare(cfg, tmp_path_factory.mktemp("task"))


def _cfg(method: str, *extra: str):
    return load(SMOKE, [f'method.name="{method}"', "sim.num_clients=3", "sim.clients_per_round=3",
                        "data.builtin.num_train=200", "data.builtin.num_test=40", *extra])


class _Grid:
    def get_node_ids(self):
        return list(NODES)


def _server(method: str, *extra: str):
    cfg = _cfg(method, *extra)
    model = build_model(cfg, 6)
    return method_spec(method).strategy(cfg, NodeDirectory(NODES), model), model


def _reply(node: int, arrays: dict[str, np.ndarray], n: int, control: dict | None = None) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    rd = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()}),
                     "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0})})
    if control is not None:
        rd[CONTROL] = ArrayRecord({k: Array(v) for k, v in control.items()})
    return Message(rd, reply_to=instruction)


def _round(server, rnd: int, arrays: ArrayRecord, replies_for) -> ArrayRecord:
    """configure → replies built from what each node was sent → aggregate; the new global."""
    msgs = list(server.configure_train(rnd, arrays, ConfigRecord(), _Grid()))
    replies = [replies_for(m) for m in msgs]
    new, _ = server.aggregate_train(rnd, replies)
    return new


def _state(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: rec[k].numpy().astype(np.float64) for k in rec}


# ----- server optimizers ----------------------------------------------------------------------------
SHIFTS = {101: (0.02, 10), 102: (-0.01, 30), 103: (0.05, 20)}  # node -> (update added to every entry, examples)


def _client_update(msg: Message, scale: float = 1.0) -> Message:
    node = msg.metadata.dst_node_id
    shift, n = SHIFTS[node]
    sent = _state(msg.content["arrays"])
    return _reply(node, {k: (v + scale * shift * (1 + np.arange(v.size).reshape(v.shape) % 3)).astype(np.float32)
                         for k, v in sent.items()}, n)


def _mean_delta(x: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    total = sum(n for _, n in SHIFTS.values())
    return {k: sum(n * scale * s * (1 + np.arange(v.size).reshape(v.shape) % 3) for s, n in SHIFTS.values()) / total
            for k, v in x.items()}


def test_fedadam_first_two_steps_equal_the_adam_update():
    server, _ = _server("fedadam", "method.eta=0.05", "method.beta_1=0.9", "method.beta_2=0.99", "method.tau=0.001")
    x = _state(server.initial_arrays())
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v2 = {k: np.zeros_like(v) for k, v in x.items()}
    arrays = server.initial_arrays()
    for t, scale in ((1, 1.0), (2, -0.5)):
        arrays = _round(server, t, arrays, lambda msg: _client_update(msg, scale))
        d = _mean_delta(x, scale)
        eta_t = 0.05 * np.sqrt(1 - 0.99 ** t) / (1 - 0.9 ** t)
        for k in x:
            m[k] = 0.9 * m[k] + 0.1 * d[k]
            v2[k] = 0.99 * v2[k] + 0.01 * d[k] ** 2
            x[k] = x[k] + eta_t * m[k] / (np.sqrt(v2[k]) + 0.001)
        got = _state(arrays)
        for k in x:
            np.testing.assert_allclose(got[k], x[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,rule", [
    ("fedyogi", "yogi"), ("fedadagrad", "adagrad"), ("fedavgm", "momentum"),
])
def test_other_server_optimizers_follow_their_update_rules(method, rule):
    server, _ = _server(method)
    o = server.options
    x = _state(server.initial_arrays())
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v2 = {k: np.zeros_like(v) for k, v in x.items()}
    arrays = server.initial_arrays()
    for t, scale in ((1, 1.0), (2, 0.5)):
        arrays = _round(server, t, arrays, lambda msg: _client_update(msg, scale))
        d = _mean_delta(x, scale)
        for k in x:
            if rule == "yogi":
                m[k] = o.beta_1 * m[k] + (1 - o.beta_1) * d[k]
                v2[k] = v2[k] - (1 - o.beta_2) * d[k] ** 2 * np.sign(v2[k] - d[k] ** 2)
                x[k] = x[k] + o.eta * m[k] / (np.sqrt(v2[k]) + o.tau)
            elif rule == "adagrad":
                v2[k] = v2[k] + d[k] ** 2
                x[k] = x[k] + o.eta * d[k] / (np.sqrt(v2[k]) + o.tau)
            else:  # heavy-ball momentum on the pseudo-gradient x − mean
                m[k] = -d[k] if t == 1 else o.momentum * m[k] - d[k]
                x[k] = x[k] - o.server_lr * m[k]
        got = _state(arrays)
        for k in x:
            np.testing.assert_allclose(got[k], x[k], rtol=1e-5, atol=1e-6)


def test_server_optimizer_state_restores_and_continues_identically():
    a, _ = _server("fedadam")
    arrays = _round(a, 1, a.initial_arrays(), _client_update)
    b, _ = _server("fedadam")
    b.load_state_dict({k: v.copy() for k, v in a.state_dict().items()})
    out_a = _round(a, 2, arrays, lambda m: _client_update(m, 0.3))
    out_b = _round(b, 2, arrays, lambda m: _client_update(m, 0.3))
    for k in out_a:
        assert np.array_equal(out_a[k].numpy(), out_b[k].numpy())


def test_server_optimizers_accept_upload_codecs_and_user_level_dp():
    for method in ("fedadam", "fedyogi", "fedadagrad", "fedavgm"):
        _cfg(method, 'codecs.up=["delta","int8"]')
        _cfg(method, "dp.user.enabled=true", "dp.user.noise_multiplier=1.0")


# ----- SCAFFOLD --------------------------------------------------------------------------------------
def test_scaffold_sends_the_control_variate_and_updates_it_by_the_formula():
    server, _ = _server("scaffold", 'train.optimizer="sgd"')
    arrays = server.initial_arrays()
    msgs = list(server.configure_train(1, arrays, ConfigRecord(), _Grid()))
    assert all(CONTROL in m.content.array_records for m in msgs)
    assert all(np.all(m.content[CONTROL][k].numpy() == 0) for m in msgs for k in m.content[CONTROL])
    deltas = {node: {k: np.full(v.numpy().shape, 0.1 * (i + 1), np.float32) for k, v in arrays.items()}
              for i, node in enumerate(NODES)}
    replies = [_reply(m.metadata.dst_node_id, _state(m.content["arrays"]), 10, deltas[m.metadata.dst_node_id])
               for m in msgs]
    server.aggregate_train(1, replies)
    # c ← c + |S|/N · mean(Δc): all 3 of 3 clients, mean of 0.1, 0.2, 0.3
    for k, c in server.control.items():
        np.testing.assert_allclose(c, 0.2, rtol=1e-6)
    assert set(server.state_dict()) == {f"control/{k}" for k in server.control}


def test_scaffold_reply_without_the_variate_is_rejected():
    server, _ = _server("scaffold-mean-grad")
    msgs = list(server.configure_train(1, server.initial_arrays(), ConfigRecord(), _Grid()))
    replies = [_reply(m.metadata.dst_node_id, _state(m.content["arrays"]), 10) for m in msgs]
    new, _ = server.aggregate_train(1, replies)
    assert new is None
    assert all("control" in r.reason for r in server.pop_rejections())


def _client(method: str, task, tmp_path, *extra: str):
    cfg = _cfg(method, "train.local_steps=4", "train.optimizer=\"sgd\"", "train.lr=0.05", *extra)
    spec = method_spec(method)
    rt = ClientRuntime(cfg, task, build_model(cfg, task.num_labels), str(tmp_path))
    return get_trainer_class(spec.trainer)(rt, spec.strategy), rt


def _train_msg(arrays: dict, rnd: int, control: dict | None = None) -> Message:
    rd = RecordDict({"arrays": ArrayRecord({k: Array(v.numpy() if torch.is_tensor(v) else v)
                                            for k, v in arrays.items()}),
                     "config": ConfigRecord({"server-round": rnd})})
    if control is not None:
        rd[CONTROL] = ArrayRecord({k: Array(v) for k, v in control.items()})
    msg = Message(rd, dst_node_id=101, message_type=MessageType.TRAIN)
    return msg


@pytest.mark.parametrize("method", ["scaffold", "scaffold-mean-grad"])
def test_scaffold_client_applies_the_correction_and_keeps_its_variate(task, tmp_path, method):
    """Option II by hand from the reply; under plain SGD the mean-gradient variate must give the same c_i⁺."""
    trainer, rt = _client(method, task, tmp_path)
    x = {k: v for k, v in adapter_state(rt.model).items() if k in trainer.keys}
    c = {k: np.full(v.shape, 0.5, np.float32) for k, v in x.items()}
    reply = trainer.train(_train_msg(x, 1, c), cid=0)
    y = {k: reply["arrays"][k].numpy().astype(np.float64) for k in x}
    delta_c = {k: reply[CONTROL][k].numpy() for k in x}
    stored = ClientStateStore(tmp_path / "client_state").load_arrays(0, VARIATE_SET)
    steps, lr = int(reply["metrics"]["train-steps"]), 0.05
    for k in x:
        expected = 0.0 - c[k] + (x[k].numpy() - y[k]) / (steps * lr)  # c_i was 0
        np.testing.assert_allclose(stored[k], expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(delta_c[k], stored[k], rtol=1e-6)
    # The correction c − c_i = 0.5 moved every exchanged entry: a plain SGD run from x differs by it.
    plain, rt2 = _client("fedavg", task, tmp_path / "plain")
    y0 = plain.train(_train_msg(x, 1), cid=0)["arrays"]
    gap = np.mean([np.mean(y0[k].numpy() - y[k]) for k in x])
    assert gap == pytest.approx(steps * lr * 0.5, rel=0.05)
    # Second participation: the stored c_i is used (c − c_i = 0 when c equals it: no correction).
    trainer.train(_train_msg(x, 3, stored), cid=0)
    assert ClientStateStore(tmp_path / "client_state").load_arrays(0, VARIATE_SET).keys() == stored.keys()


# ----- FedProx -------------------------------------------------------------------------------------
def _update_norm(trainer, rt, x, rnd=1) -> float:
    y = trainer.train(_train_msg(x, rnd), cid=0)["arrays"]
    return float(np.sqrt(sum(((y[k].numpy() - x[k].numpy()) ** 2).sum() for k in x)))


@pytest.mark.parametrize("dp", [False, True])
def test_fedprox_term_pulls_the_update_towards_the_global_adapter(task, tmp_path, dp):
    extra = ["dp.enabled=true", "dp.noise_multiplier=0.01"] if dp else []
    plain, rt = _client("fedprox", task, tmp_path / "a", "method.mu=0.0", *extra)
    x = {k: v for k, v in adapter_state(rt.model).items() if k in plain.keys}
    far = {k: v + 0.5 for k, v in x.items()}  # start away from the model's init: the prox pull is visible
    free = _update_norm(plain, rt, far)
    prox, rt2 = _client("fedprox", task, tmp_path / "b", "method.mu=5.0", *extra)
    assert _update_norm(prox, rt2, far) < 0.8 * free


def test_fedprox_gradient_is_mu_times_the_distance(task, tmp_path):
    trainer, rt = _client("fedprox", task, tmp_path, "method.mu=2.0")
    x = {k: v for k, v in adapter_state(rt.model).items() if k in trainer.keys}
    from clients.local_steps import LocalRound

    msg = _train_msg(x, 1)
    params = [p for p in rt.model.parameters() if p.requires_grad]
    ctx = LocalRound(msg, 0, 1, task.client_dataset(0), params)
    trainer.begin(ctx)
    with torch.no_grad():
        for p in params:
            p.add_(0.25)
            p.grad = torch.zeros_like(p)
    trainer.adjust_gradients(ctx)
    for p in params:
        torch.testing.assert_close(p.grad, torch.full_like(p, 0.5))


# ----- end to end (real Flower + Ray + peft) ----------------------------------------------------------
def _run(tmp_path, method: str, *extra: str) -> dict:
    import csv
    import json
    from pathlib import Path

    from fedpeft.app.simulate import simulate

    cfg = load(SMOKE, [f'method.name="{method}"', "sim.num_clients=6", "sim.clients_per_round=3", "sim.rounds=2",
                       "train.local_steps=3", "data.builtin.num_train=300", "data.builtin.num_test=60",
                       "sim.num_cpus=1", f'output.dir="{tmp_path}"', *extra])
    summary = simulate(cfg)
    run = Path(summary["run_dir"])
    return {"summary": summary, "run": run, "comm": list(csv.DictReader((run / "comm.csv").open())),
            "metrics": [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]}


def test_scaffold_run_charges_the_variates_both_ways_and_keeps_them_per_client(tmp_path):
    out = _run(tmp_path, "scaffold-mean-grad")  # AdamW moves every tensor: no two variates are equal
    train = [r for r in out["comm"] if int(r["round"]) >= 1 and r["message_type"] == "train"]
    for direction in ("down", "up"):
        sizes = {rec: [int(r["bytes"]) for r in train if r["direction"] == direction and r["record"] == rec]
                 for rec in ("control", "arrays")}
        assert len(sizes["control"]) == len(sizes["arrays"]) == 6  # 3 clients x 2 rounds: a variate per message
        assert all(b > 0 for b in sizes["control"])
    # Once c is non-zero (round 2 down, every upload) the variate costs what the adapter costs: same
    # tensors and shapes. Round 1's c = 0 compresses and its identical zero arrays travel once.
    full = [(r["round"], r["direction"], r["client_id"]) for r in train if r["record"] == "arrays"]
    by = {(r["round"], r["direction"], r["client_id"], r["record"]): int(r["bytes"]) for r in train}
    for rnd, direction, cid in full:
        if (rnd, direction) != ("1", "down"):
            assert by[(rnd, direction, cid, "control")] == pytest.approx(by[(rnd, direction, cid, "arrays")], rel=0.02)
    trained = {int(r["client_id"]) for r in train if r["direction"] == "up"}
    store = ClientStateStore(out["run"] / "client_state")
    assert {c for c in range(6) if store.load_arrays(c, VARIATE_SET)} == trained
    assert out["summary"]["rejected"] == 0 and np.isfinite(out["metrics"][-1]["loss"])


@pytest.mark.slow
def test_fedadam_run_with_coded_uploads_moves_the_global_adapter(tmp_path):
    out = _run(tmp_path, "fedadam", 'codecs.up=["delta","int8"]', "output.checkpoint_every=1")
    assert out["summary"]["rejected"] == 0
    ups = {r["record"] for r in out["comm"] if r["direction"] == "up" and int(r["round"]) >= 1}
    assert "codec" in ups and "arrays" not in ups
    from safetensors.torch import load_file

    first = load_file(str(out["run"] / "checkpoints" / "round-0001" / "adapter_model.safetensors"))
    final = load_file(str(out["run"] / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(first[k], final[k]) for k in final)


def test_published_scaffold_refuses_adaptive_local_optimizers():
    """Option II reads (x − y_i)/(K·η_l) as a gradient: AdamW or momentum is refused, naming the variant to use."""
    from fedpeft.config import ConfigError

    _cfg("scaffold", 'train.optimizer="sgd"')  # plain SGD: the paper's setting
    for extra in (['train.optimizer="adamw"'], ['train.optimizer="sgd"', "train.momentum=0.9"]):
        with pytest.raises(ConfigError, match="scaffold-mean-grad"):
            _cfg("scaffold", *extra)
    _cfg("scaffold-mean-grad", 'train.optimizer="adamw"')

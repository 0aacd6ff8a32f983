"""FedKSeed: seeded directions, bit-identical replay, ZO learning, Pro probabilities, reply validation."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.app.runtime import ClientRuntime
from clients.zeroth_order import ZerothOrderTrainer, catch_up
from fedpeft.app.recipe import validate
from fedpeft.data.builtin import generate
from fedpeft.data.prepared import PreparedTask, eval_batches, tokenize, train_batches
from fedpeft.models import build_model, load_tokenizer
from fedpeft.nodes import NodeDirectory
from fedpeft.seeding import rng
from fedpeft.methods.zo import (
    PackError, ZOStepper, direction_vector, pack_scalars, perturb, pro_probabilities, replay, seed_pool,
    tuned_parameters, unpack_scalars,
)
from strategies.fedkseed import FedKSeed

K = 64


def _cfg(**method):
    return validate({
        "model": {"source": "tiny", "max_length": 32},
        "adapter": {"type": "lora", "r": 4, "target_modules": ["query", "value"]},
        "method": {"name": "fedkseed", "num_seeds": K, **method},
        "train": {"local_steps": 30, "batch_size": 16, "lr": 0.05},
        "sim": {"num_clients": 2, "clients_per_round": 2},
    })


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


@pytest.fixture(scope="module")
def task() -> PreparedTask:
    tok = load_tokenizer(_cfg().model)
    train = tokenize(generate(64, 1, negation_rate=0.0), tok, 32).select_columns(["input_ids", "label"])
    return PreparedTask(train=train, test=train, partitions=[list(range(32)), list(range(32, 64))],
                        label_names=[str(i) for i in range(6)], pad_token_id=0)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _reply(content: RecordDict, node: int) -> Message:
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


def _scalars(idx, val, n=10) -> RecordDict:
    return RecordDict({"zo": ConfigRecord({"scalars": pack_scalars(np.array(idx), np.array(val, np.float32), K)}),
                       "metrics": MetricRecord({"num-examples": n})})


class Grid:
    """The one grid call `configure_train` makes: the online node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _server(cfg, tmp_path=None):
    return FedKSeed(cfg, NodeDirectory({11: 0, 12: 1}), build_model(cfg, 6), tmp_path)


def test_pack_round_trip_picks_the_cheaper_form():
    idx, val = np.array([3, 9, 40]), np.array([0.5, -1.25, 2.0], np.float32)
    blob = pack_scalars(idx, val, K)
    assert blob[:1] == b"S" and len(blob) == 1 + 4 + 3 * (2 + 4)
    got = unpack_scalars(blob, K)
    assert got[0].tolist() == [3, 9, 40] and got[1].tolist() == val.tolist()
    dense = pack_scalars(np.arange(60), np.ones(60, np.float32), K)
    assert dense[:1] == b"D" and len(dense) == 1 + 4 * K
    assert unpack_scalars(dense, K)[0].tolist() == list(range(60))


@pytest.mark.parametrize("blob,msg", [
    (b"S" + (1).to_bytes(4, "little") + (70).to_bytes(2, "little") + np.float32(1).tobytes(), "outside the pool"),
    (b"S" + (1).to_bytes(4, "little") + (3).to_bytes(2, "little") + np.float32("nan").tobytes(), "non-finite"),
    (b"D" + np.ones(K - 1, np.float32).tobytes(), "expected 64"),
    (b"S" + (2).to_bytes(4, "little") + (3).to_bytes(2, "little"), "does not match"),
    (b"S" + (2).to_bytes(4, "little") + np.array([5, 5], np.uint16).tobytes() + np.ones(2, np.float32).tobytes(), "duplicate"),
    (b"X123", "unknown"),
])
def test_malformed_scalars_are_refused(blob, msg):
    with pytest.raises(PackError, match=msg):
        unpack_scalars(blob, K)


def test_directions_are_reproducible_and_thread_independent():
    params = [torch.zeros(3000, 700), torch.zeros(5)]
    a = direction_vector(params, 42)
    assert torch.equal(a, direction_vector(params, 42)) and not torch.equal(a, direction_vector(params, 43))
    one, two = [torch.zeros(3000, 700)], [torch.zeros(3000, 700)]
    perturb(one, 5, 0.3, threads=1)
    perturb(two, 5, 0.3, threads=2)
    assert torch.equal(one[0], two[0])
    r = direction_vector(params, 1, "rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(float(r.mean())) < 0.01
    assert abs(float(a.std()) - 1) < 0.01


@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
@pytest.mark.parametrize("threads", [1, 2])
def test_stepper_is_bit_identical_to_three_perturbs_per_step(direction, threads):
    # The client's steps (z generated once per step into a buffer, the restore-and-update add
    # deferred into the next step's pass) must leave the same bits, and see the same losses, as
    # +eps z, -2 eps z, +(eps - lr g) z made by `perturb`. Sizes span chunk boundaries and a ragged tail.
    def params():
        gen = torch.Generator().manual_seed(3)
        return [torch.randn(3000, 700, generator=gen), torch.randn(5, generator=gen),
                torch.randn(1 << 20, generator=gen), torch.randn(333, 3, generator=gen)]

    def loss(ps) -> float:
        return float(sum(p.sum() * 1e-3 for p in ps) + ps[1].square().sum())

    ref, mine = params(), params()
    stepper = ZOStepper(mine, direction, threads=threads)
    eps, lr = 1e-2, 0.1
    with torch.inference_mode():
        for seed in (11, 12, 11, 40):
            perturb(ref, seed, eps, direction)
            plus = loss(ref)
            perturb(ref, seed, -2 * eps, direction)
            minus = loss(ref)
            g = (plus - minus) / (2 * eps)
            perturb(ref, seed, eps - lr * g, direction)
            assert stepper.step(seed, eps, lr, lambda: loss(mine)) == (plus, minus, g)
        stepper.flush()
    for a, b in zip(ref, mine):
        assert torch.equal(a, b)
    assert stepper.buffer.numel() == sum(p.numel() for p in mine)
    again = ZOStepper(mine, direction, threads=threads, buffer=stepper.buffer)
    assert again.buffer is stepper.buffer  # reused, not reallocated


@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
def test_replay_is_bit_identical_to_one_perturb_per_seed(direction):
    gen = torch.Generator().manual_seed(4)
    ref = [torch.randn(3000, 700, generator=gen), torch.randn(5, generator=gen), torch.randn(333, 3, generator=gen)]
    mine = [p.clone() for p in ref]
    pool, lr = np.arange(100, 100 + K), 0.05
    entries = [(3, 0.5), (7, -1.25), (3, 2.0), (60, 1e-3)]
    for idx, g in entries:
        perturb(ref, int(pool[idx]), -lr * g, direction)
    replay(mine, pool, entries, lr, direction)
    assert all(torch.equal(a, b) for a, b in zip(ref, mine))


def test_zo_estimate_points_along_the_true_gradient(task):
    cfg = _cfg()
    model = build_model(cfg, 6)
    params = tuned_parameters(model, "adapter")
    batch = next(eval_batches(task.train, 32, 0))
    model.eval()
    model(**batch).loss.backward()
    true = torch.cat([p.grad.view(-1) for _, p in sorted(model.named_parameters()) if p.requires_grad])
    est = torch.zeros_like(true)
    eps = 1e-3
    with torch.inference_mode():
        for s in range(300):
            perturb(params, s, eps)
            plus = float(model(**batch).loss)
            perturb(params, s, -2 * eps)
            minus = float(model(**batch).loss)
            perturb(params, s, eps)
            est += (plus - minus) / (2 * eps) * direction_vector(params, s)
    cos = float(torch.nn.functional.cosine_similarity(est, true, dim=0))
    assert cos > 0.2, cos


def test_server_and_client_replay_are_bit_identical(task, tmp_path):
    cfg = _cfg()
    server = _server(cfg, tmp_path)
    rounds = [([1, 7, 30], [0.5, -2.0, 1.5]), ([7], [3.0]), ([0, 63], [-0.25, 0.125])]
    for r, (idx, val) in enumerate(rounds, 1):
        server.aggregate_train(r, [_reply(_scalars(idx, val), 11)])
    history = [(np.array(i), np.array(v, np.float32)) for i, v in rounds]
    # A client at its first participation receives all three rounds in its message.
    fresh = ZerothOrderTrainer(ClientRuntime(cfg, task, build_model(cfg, 6), str(tmp_path)))
    fresh.sync(catch_up([], 1, history, 4))
    # A worker still at round 0 running a client that holds rounds 1..2 and is sent round 3.
    worker = ZerothOrderTrainer(ClientRuntime(cfg, task, build_model(cfg, 6), str(tmp_path)))
    worker.sync(catch_up(history[:2], 3, history[2:], 4))
    for trainer in (fresh, worker):
        assert trainer.round == 3
        for a, b in zip(server.params, trainer.params):
            assert torch.equal(a, b)
    assert not torch.equal(server.params[0], tuned_parameters(build_model(cfg, 6), "adapter")[0])
    assert catch_up(history[:1], 3, history[2:], 4) is None  # round 2 in neither: the client cannot catch up
    with pytest.raises(RuntimeError, match="cannot be undone"):
        fresh.sync(history[:2])


def test_replay_is_bit_identical_in_another_process(tmp_path):
    cfg = _cfg(scope="full")
    server = _server(cfg, tmp_path)
    server.aggregate_train(1, [_reply(_scalars([2, 5], [0.75, -0.5]), 11)])
    digest = hashlib.sha256(b"".join(p.numpy().tobytes() for p in server.params)).hexdigest()
    code = f"""
import hashlib
from fedpeft.config import Config
from fedpeft.models import build_model
from fedpeft.methods.zo import replay, seed_pool, tuned_parameters
cfg = Config.from_json({cfg.to_json()!r})
params = tuned_parameters(build_model(cfg, 6), "full")
replay(params, seed_pool(cfg.sim.seed, {K}), [(2, 0.75), (5, -0.5)], cfg.train.lr, "gaussian")
print(hashlib.sha256(b"".join(p.numpy().tobytes() for p in params)).hexdigest())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == digest


def test_zo_rounds_lower_the_loss(task, tmp_path):
    cfg = _cfg()
    server_model = build_model(cfg, 6).eval()
    server = FedKSeed(cfg, NodeDirectory({11: 0, 12: 1}), server_model, None)
    trainer = ZerothOrderTrainer(ClientRuntime(cfg, task, build_model(cfg, 6), str(tmp_path)))
    batch = next(eval_batches(task.train, 64, 0))

    def loss() -> float:
        with torch.inference_mode():
            return float(server_model(**batch).loss)

    before = loss()
    for r in range(1, 5):
        msgs = server.configure_train(r, ArrayRecord(), ConfigRecord(), Grid([11, 12]))
        server.aggregate_train(r, [_reply(trainer.train(m, m.metadata.dst_node_id - 11), m.metadata.dst_node_id)
                                   for m in msgs])
    assert loss() < before - 0.01
    assert server.confirmed == {0: 3, 1: 3}


@pytest.mark.parametrize("scope", ["adapter", "full"])
def test_client_scalars_match_the_three_perturb_loop(task, tmp_path, scope):
    # The client's reply is what a loop of +eps z, forward, -2 eps z, forward, +(eps - lr g) z
    # gives, bit for bit, and its model is back at the global model afterwards.
    cfg = _cfg(scope=scope)
    cfg.train.local_steps = 8
    trainer = ZerothOrderTrainer(ClientRuntime(cfg, task, build_model(cfg, 6), str(tmp_path)))
    start = [p.clone() for p in trainer.params]
    (msg,) = [m for m in _server(cfg).configure_train(1, ArrayRecord(), ConfigRecord(), Grid([11, 12]))
              if m.metadata.dst_node_id == 11]
    got_idx, got_val = unpack_scalars(trainer.train(msg, 0)["zo"]["scalars"], K)
    assert all(torch.equal(a, b) for a, b in zip(start, trainer.params))

    model = build_model(cfg, 6).eval()
    params = tuned_parameters(model, scope)
    picks, pool = rng(cfg.sim.seed, 1, 0, "zo-seeds"), seed_pool(cfg.sim.seed, K)
    acc = np.zeros(K)
    eps, lr = trainer.opts.eps, cfg.train.lr
    with torch.inference_mode():
        for batch in train_batches(task.client_dataset(0), cfg.train.batch_size, rng(cfg.sim.seed, 1, 0, "batches"),
                                   task.pad_token_id, steps=cfg.train.local_steps):
            i = int(picks.choice(K))
            perturb(params, int(pool[i]), eps)
            plus = float(model(**batch).loss)
            perturb(params, int(pool[i]), -2 * eps)
            minus = float(model(**batch).loss)
            g = (plus - minus) / (2 * eps)
            perturb(params, int(pool[i]), eps - lr * g)
            acc[i] += g
    idx = np.flatnonzero(acc)
    assert got_idx.tolist() == idx.tolist() and got_val.tolist() == acc[idx].astype(np.float32).tolist()


def test_pro_probabilities_match_the_formula():
    history = [[0.0], [0.0, 2.0, -4.0], [0.0, 0.5], [0.0, -0.2, 0.2, 0.1]]
    clip = 1.0
    amp = np.array([0.0, (0 + 1 + 1) / 3, 0.25, (0 + 0.2 + 0.2 + 0.1) / 4])
    norm = (amp - amp.min()) / (amp.max() - amp.min())
    expected = np.exp(norm) / np.exp(norm).sum()
    got = pro_probabilities(history, clip)
    assert np.allclose(got, expected, atol=1e-9) and abs(got.sum() - 1) < 1e-12
    assert np.allclose(pro_probabilities([[0.0]] * 5, clip), 0.2)


@pytest.mark.parametrize("content", [
    lambda: RecordDict({"zo": ConfigRecord({"scalars": b"S" + (1).to_bytes(4, "little") + (99).to_bytes(2, "little")
                                            + np.float32(1).tobytes()}), "metrics": MetricRecord({"num-examples": 5})}),
    lambda: _scalars([4], [float("nan")]),
    lambda: RecordDict({"zo": ConfigRecord({"scalars": b"D" + np.ones(K + 1, np.float32).tobytes()}),
                        "metrics": MetricRecord({"num-examples": 5})}),
    lambda: RecordDict({"metrics": MetricRecord({"num-examples": 5})}),
], ids=["unknown-seed", "nan", "wrong-length", "missing"])
def test_bad_reply_is_rejected_and_model_unchanged(content):
    cfg = _cfg()
    server = _server(cfg)
    before = [p.clone() for p in server.params]
    arrays, _ = server.aggregate_train(1, [_reply(content(), 11)])
    assert arrays is None
    (rej,) = server.pop_rejections()
    assert rej.client_id == 0 and rej.reason
    assert all(torch.equal(a, b) for a, b in zip(before, server.params))


def test_perturb_inside_then_outside_inference_mode():
    import threading

    errors = []

    def body() -> None:  # a fresh thread: no scratch buffer yet, as in a new worker
        try:
            p = [torch.zeros(3000, 700)]
            with torch.inference_mode():
                perturb(p, 1, 0.1, threads=1)
            perturb(p, 1, -0.1, threads=1)
            assert float(p[0].abs().max()) < 1e-6
        except Exception as err:  # surfaced below
            errors.append(err)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert not errors, errors

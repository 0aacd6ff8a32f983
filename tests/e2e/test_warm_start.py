"""Ray and its client workers start before the task is prepared, and a task that cannot be prepared stops them.

`fedpeft simulate` starts Ray first and creates the client actors at once (`fedpeft.app.engine.workers.start_actors`),
so the workers import the client stack while the driver prepares the task; Flower's pool then adopts
those actors instead of starting its own. The test reads Ray's actor table when the run directory
appears (the task is prepared, the engine not yet started) and after round 1.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from conftest import SMOKE

RUN = ["sim.num_clients=4", "sim.clients_per_round=4", "sim.rounds=1", "train.local_steps=2", "train.batch_size=4",
       "output.checkpoint_every=0", "sim.num_cpus=2", "sim.eval_batch_size=32", "data.builtin.num_train=80",
       "data.builtin.num_test=32"]


def _client_actors(alive_only: bool = False) -> set[str]:
    """Ids of this Ray session's Flower client actors (any state, or only the live ones)."""
    from ray._private import state

    actors = state.actors(actor_state_name="ALIVE") if alive_only else state.actors()
    return {aid for aid, a in actors.items() if a["ActorClassName"] == "ClientAppActor"}


@pytest.fixture
def made_temp_folders(monkeypatch) -> list[Path]:
    """fedpeft's temporary folders this test's run creates (warm-up spec, Ray's start-up log, task staging).

    Recorded as they are made rather than by listing the temp directory, which other test workers share.
    """
    made: list[Path] = []
    real = tempfile.mkdtemp

    def recording(*args, **kwargs):
        path = real(*args, **kwargs)
        if Path(path).name.startswith("fedpeft-"):
            made.append(Path(path))
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", recording)
    return made


def test_the_workers_started_before_the_task_was_prepared_run_the_clients(tmp_path, made_temp_folders):
    import ray

    from fedpeft.app.recipe import load
    from fedpeft.app.simulate import simulate

    cfg = load(SMOKE, [*RUN, f'output.dir="{tmp_path / "runs"}"'])
    seen: dict[str, set[str]] = {}
    rows: list[dict] = []

    def on_round(row: dict) -> None:
        rows.append(row)
        if row["round"] == 1:
            seen["after round 1"] = _client_actors(alive_only=True)

    summary = simulate(cfg, on_round=on_round, on_start=lambda _: seen.update(at_start=_client_actors()))

    assert len(seen["at_start"]) == 2, "one client actor per CPU exists once the task is prepared"
    assert seen["after round 1"] == seen["at_start"], "Flower's pool ran the clients on the actors started early"
    assert rows[1]["clients"] == 4 and rows[1]["rejected"] == 0
    assert summary["rounds_completed"] == 1
    assert not ray.is_initialized()
    made = {p.name.rsplit("-", 1)[0] for p in made_temp_folders}
    assert {"fedpeft-warmup", "fedpeft-ray-start", "fedpeft-task"} <= made, "the run made its three temp folders"
    assert not [p for p in made_temp_folders if p.exists()], "the warm-up spec and Ray's start-up log are removed"
    assert "Ray session logs" in (Path(summary["run_dir"]) / "run.log").read_text(), "Ray's start is logged in run.log"


def test_a_task_that_cannot_be_prepared_stops_ray_and_leaves_nothing(tmp_path, made_temp_folders):
    import ray

    from fedpeft.data import DataError
    from fedpeft.app.recipe import load
    from fedpeft.app.simulate import simulate

    cfg = load(SMOKE, [*RUN, 'partition.type="dirichlet"', 'partition.by="no_such_column"',
                       f'output.dir="{tmp_path / "runs"}"'])
    with pytest.raises(DataError, match="no_such_column"):
        simulate(cfg)
    assert not ray.is_initialized(), "Ray started for the run is shut down"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), "no run directory"
    assert made_temp_folders, "the run got as far as making its temp folders"
    assert not [p for p in made_temp_folders if p.exists()], "its temp folders are removed"

"""Worker recovery, end to end on real Flower and Ray: a client worker killed with SIGKILL mid-round is replaced.

The run has one Ray client worker (`sim.num_cpus = 1`), so with Flower's actor pool alone every
message after the kill would fail. Once the server has written round 0, the test looks the
worker's PID up in Ray's actor table and kills it with SIGKILL as soon as it is busy with a
round-1 client (its CPU time grows). With `sim.client_retries = 1` that client is re-run on the
fresh worker that replaced the dead one and accepted; round 2 has every reply accepted.
A worker start imports the whole client stack (about 30 CPU seconds here), so the test runs once.
The path without retries (the lost client counted failed, its reason naming the dead worker) is
checked end to end through the CLI by tests/e2e/test_run_output.py's dead-worker test.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import psutil

from conftest import SMOKE
from fedpeft.rundir import RunDir, read_status

CLIENTS = 3
RUN = [f"sim.num_clients={CLIENTS}", f"sim.clients_per_round={CLIENTS}", "sim.rounds=2", "sim.num_cpus=1",
       "sim.client_retries=1", "train.local_steps=30", "train.batch_size=8", "output.checkpoint_every=0",
       "sim.eval_batch_size=32", "data.builtin.num_train=180", "data.builtin.num_test=60"]
BUSY_TICKS = 10  # CPU clock ticks (0.1 s at 100 Hz) the worker spends on round 1 before it is killed


def _client_workers() -> dict[str, int]:
    """Actor id → PID of every live Flower client actor, from Ray's actor table."""
    from ray._private import state

    actors = state.actors(actor_state_name="ALIVE")
    return {aid: int(a["Pid"]) for aid, a in actors.items() if a["ActorClassName"] == "ClientAppActor" and a["Pid"]}


def _ray_processes() -> list[int]:
    """PIDs of the processes of the Ray node this process started (raylet, GCS, …)."""
    from ray._private import worker

    node = worker._global_node  # pylint: disable=protected-access
    return [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]


def _cpu_ticks(pid: int) -> int:
    """User + system CPU clock ticks of process `pid` so far (its /proc stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class KillMidRound:
    """An `on_round` hook: after round 0, SIGKILL the client worker once it is busy in round 1."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.processes: dict[int, psutil.Process] = {}  # every Ray process seen during the run
        self.killed: int | None = None
        self.kill_round: int | None = None
        self.workers_after: dict[str, int] = {}
        self._round_done = threading.Event()
        self._thread = threading.Thread(target=self._kill_when_busy, daemon=True)

    def _track(self, pids: list[int]) -> None:
        for pid in pids:
            if pid not in self.processes:
                self.processes[pid] = psutil.Process(pid)  # keeps its start time: a reused PID is not it

    def __call__(self, row: dict) -> None:
        self.rows.append(row)
        self._track([*_client_workers().values(), *_ray_processes()])
        if row["round"] == 0:
            self._thread.start()
        elif row["round"] == 1:
            self._round_done.set()
            self._thread.join()
            self.workers_after = _client_workers()

    def _kill_when_busy(self) -> None:
        workers: dict[str, int] = {}
        while not workers and not self._round_done.is_set():  # the actor is up once its warm-up is done
            workers = _client_workers()
            self._round_done.wait(0.05)
        if not workers:
            return
        (pid,) = workers.values()
        self._track([pid])
        idle = _cpu_ticks(pid)
        while not self._round_done.is_set():
            if _cpu_ticks(pid) - idle >= BUSY_TICKS:
                os.kill(pid, signal.SIGKILL)  # this run's own Ray worker, by the PID Ray reported
                self.killed, self.kill_round = pid, self.rows[-1]["round"] + 1
                return
            self._round_done.wait(0.01)


def test_a_killed_worker_is_replaced_its_client_retried_and_later_rounds_have_full_participation(tmp_path):
    import ray

    from fedpeft.app.recipe import load
    from fedpeft.app.simulate import simulate

    cfg = load(SMOKE, [*RUN, f'output.dir="{tmp_path / "runs"}"'])
    hook = KillMidRound()
    summary = simulate(cfg, on_round=hook)

    assert hook.killed is not None and hook.kill_round == 1, "the worker was killed while round 1 ran"
    r1, r2 = hook.rows[1:]
    # Round 1: the lost client was re-run on a fresh worker and its reply accepted.
    assert (r1["clients"], r1["rejected"], r1["workers_replaced"], r1["client_retries"]) == (CLIENTS, 0, 1, 1), r1
    # The pool kept its size: a fresh worker took the dead one's place, and round 2 had every reply.
    assert len(hook.workers_after) == 1 and hook.killed not in hook.workers_after.values()
    assert (r2["clients"], r2["rejected"], r2["workers_replaced"], r2["client_retries"]) == (CLIENTS, 0, 0, 0), r2
    assert summary["rounds_completed"] == 2 and summary["participations"] == 2 * CLIENTS
    assert summary["rejected"] == 0
    run_dir = Path(summary["run_dir"])
    assert read_status(run_dir)["status"] == "completed"
    assert [m["round"] for m in RunDir(run_dir).metrics()] == [0, 1, 2]
    log = (run_dir / "run.log").read_text()
    assert f"pid {hook.killed}) while running client" in log and "replaced by a fresh worker" in log
    assert "retry 1 of 1 on a fresh worker" in log

    # Nothing of this run's Ray outlives it: the driver shut Ray down, and its processes exit.
    assert not ray.is_initialized()
    assert hook.killed in hook.processes and len(hook.processes) >= 3
    _, alive = psutil.wait_procs(list(hook.processes.values()), timeout=30)
    assert not alive, [p.pid for p in alive]

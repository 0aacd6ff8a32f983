"""Real deployment on loopback: a SuperNode killed mid-round (SIGKILL) fails that round while the run goes on
with the others; restarted with the same client id (Flower gives it a new node id), it is asked for its client
id before the next round, sampled again and its reply is accepted. Every process is stopped by PID."""

from __future__ import annotations

import csv
import json
import shlex
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import kill_supernode
from fedpeft.app.deploy.local import LocalDeployment
from fedpeft.app.deploy.processes import pid_alive
from fedpeft.app.deploy.run import app_dir
from fedpeft.app.deploy.shards import write_shards
from fedpeft.app.recipe import load
from fedpeft.app.runconfig import NODE_WAIT_KEY, OVERRIDES_KEY, RECIPE_KEY

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"
ROUNDS = 2  # round 1: the victim's SuperNode is killed mid-round and started again; round 2: it is back
VICTIM = 2  # the client whose SuperNode is killed and restarted
# sim.round_timeout_s: well above a cold `flwr-clientapp` start on 2 busy cores (35–60 s seen). The dead node's
# round ends earlier, when the SuperLink answers for it (no heartbeat for 2 × 30 s), or at this timeout.
TIMEOUT_S = 120
TINY = ["sim.num_clients=3", "sim.clients_per_round=3", f"sim.rounds={ROUNDS}", "sim.min_replies=2",
        f"sim.round_timeout_s={TIMEOUT_S}", "train.local_steps=2", "data.builtin.num_train=300",
        "data.builtin.num_test=60", "output.checkpoint_every=0"]
RECEIVED = "Receiving: train message"  # what a SuperNode logs when a round's message reaches it


def _wait_for_log(log: Path, text: str, runner: threading.Thread, limit_s: float = 600.0) -> None:
    """Poll a process's log until `text` appears (a safety limit, not an assertion)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and runner.is_alive():
        if log.is_file() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{log.name}: {text!r} not seen (run still going: {runner.is_alive()})")


@pytest.mark.slow
def test_killed_supernode_fails_its_round_and_is_sampled_again_after_it_comes_back(tmp_path):
    base = tmp_path.resolve()
    runs = base / "runs"
    overrides = [*TINY, f"output.dir={runs}"]
    shards = write_shards(load(SMOKE, overrides), base / "shards")
    run_config = {RECIPE_KEY: str(SMOKE), OVERRIDES_KEY: shlex.join(overrides), NODE_WAIT_KEY: 60.0}
    result: dict = {}
    with LocalDeployment(base, tls=False, auth=False) as dep:
        dep.start_superlink()
        nodes = [dep.start_node(cid, shards[cid]) for cid in range(3)]
        assert len(dep.wait_online(3, timeout=120)) == 3
        runner = threading.Thread(target=lambda: result.update(r=dep.run_app(app_dir(), run_config, timeout=900)))
        runner.start()
        try:
            # Round 1's message reached the victim: kill its SuperNode mid-round and start it again at once
            # (same client id and data file). Round 1 goes on without it.
            _wait_for_log(nodes[VICTIM].proc.log, RECEIVED, runner)
            kill_supernode(dep, nodes[VICTIM].proc.pid)
            assert nodes[VICTIM].proc.proc.wait(30) == -signal.SIGKILL
            dep.start_node(VICTIM, shards[VICTIM], name=f"node-{VICTIM}-restarted")
            runner.join(900)
        finally:
            dep.stop()
            runner.join(60)
        pids, alive = dict(dep.procs.seen_pids), dep.procs.alive()

    r = result["r"]
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    run_dir = next(runs.glob("*/metrics.jsonl")).parent
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(ROUNDS + 1))  # every round ran; the run never stopped
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == ROUNDS and "stopped" not in summary and summary["failed_rounds"] == 0
    with (run_dir / "comm.csv").open() as f:
        ledger = list(csv.DictReader(f))

    def nodes_of(rnd: int, direction: str, kind: str) -> dict[int, int]:
        return {int(x["client_id"]): int(x["node_id"]) for x in ledger
                if int(x["round"]) == rnd and x["direction"] == direction and x["message_type"] == kind}

    old_node = nodes_of(0, "up", "query")[VICTIM]
    assert all(int(x["client_id"]) >= 0 for x in ledger)  # the SuperLink's "unavailable" answer is not charged
    assert sorted(nodes_of(0, "up", "query")) == [0, 1, 2]
    _, dead, back = metrics
    # Round 1: the victim was sampled, then killed: the SuperLink's "node unavailable" answer (its heartbeats
    # stopped) or the round timeout ends its part, a counted failure; the other two carry the round.
    assert nodes_of(1, "down", "train")[VICTIM] == old_node and VICTIM not in nodes_of(1, "up", "train")
    assert [x["client_id"] for x in dead["rejections"]] == [VICTIM], dead["rejections"]
    reason = dead["rejections"][0]["reason"]
    assert "node unavailable" in reason or reason.startswith("timed out"), reason
    assert dead["sampled"] == 3 and dead["accepted"] == 2 and dead["rejected"] == 1 and "round_failed" not in dead
    # Round 2: the new node id was asked for its client id (charged to round 2), then sampled and accepted;
    # the dead id, which Flower may still list online, was neither asked nor sampled.
    new_node = nodes_of(2, "up", "query")[VICTIM]
    assert new_node != old_node and set(nodes_of(2, "down", "query").values()) == {new_node}
    assert nodes_of(2, "down", "train")[VICTIM] == new_node and nodes_of(2, "up", "train")[VICTIM] == new_node
    assert back["sampled"] == 3 and back["accepted"] == 3 and "rejections" not in back
    # Every process started (SuperLink, 4 SuperNodes) or seen under them is stopped.
    assert len(pids) >= 5 and alive == []
    assert not any(pid_alive(p, started) for p, started in pids.items())

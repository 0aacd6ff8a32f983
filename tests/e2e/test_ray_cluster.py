"""`fedpeft simulate --ray-address`: a real two-node Ray cluster on loopback (head + a second node).

Both nodes are real `ray start --block` processes, each in its own process group; the test stops
exactly those groups (and any process they spawned) by id and checks that nothing is left.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procs import command_line, proc_files

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OWN_RAY = """
import ray
from fedpeft.app.engine.ray_session import ray_init_args
from fedpeft.app.recipe import load
ray.init(**ray_init_args(load("simulations/smoke.toml", ["sim.num_cpus=1"]), verbose=False))
print(ray.get_runtime_context().gcs_address)
ray.shutdown()
"""


def _ppid_map() -> dict[int, int]:
    out = {}
    for pid, f in proc_files("stat"):
        try:
            out[pid] = int(f["stat"].rsplit(b")", 1)[1].split()[1])
        except (ValueError, IndexError):
            pass
    return out


def _tree(root_pids: list[int]) -> set[int]:
    """The given processes and all their descendants."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppid_map().items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = set(), list(root_pids)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return seen


def _marked(marker: str) -> set[int]:
    """Processes whose command line names this test's private Ray temp dir (Ray daemons and workers)."""
    return {pid for pid, f in proc_files("cmdline") if marker in command_line(f)}


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _ray_start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(procs: list[subprocess.Popen], marker: str) -> set[int]:
    """Stop both nodes: SIGTERM their process groups, then SIGKILL whatever is left of them. Returns leftovers."""
    pids = _tree([p.pid for p in procs]) | _marked(marker)
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
        pids |= _marked(marker)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    time.sleep(0.5)
    return {pid for pid in pids | _marked(marker) if _alive(pid)}


def test_simulation_runs_on_both_nodes_of_an_existing_ray_cluster(tmp_path):
    # A short private temp dir: Ray's socket paths must stay under the Unix limit, and other Ray
    # instances on this machine never see (or attach to) this cluster.
    ray_tmp = tempfile.mkdtemp(prefix="fpr-", dir="/tmp")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    head_cache, node_cache = tmp_path / "head-cache", tmp_path / "node2-cache"
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0",
              "--object-store-memory", str(80 * 1024 * 1024)]
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_ray_start(
            ["--head", "--port", str(port), "--temp-dir", ray_tmp, "--include-dashboard", "false",
             "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
             *common], {**env, "FEDPEFT_CACHE": str(head_cache)}, tmp_path / "head.log"))
        _wait_port(port, procs[0], tmp_path / "head.log")
        procs.append(_ray_start(
            ["--address", address, "--dashboard-agent-listen-port", str(_free_port()),
             "--resources", json.dumps({"second-node": 1}), *common],
            {**env, "FEDPEFT_CACHE": str(node_cache)}, tmp_path / "node2.log"))
        nodes = _wait_nodes(address, 2, procs, tmp_path)
        daemons = {pid for pid in _tree([p.pid for p in procs]) if _comm(pid) in ("gcs_server", "raylet")}
        assert len(daemons) == 3  # one GCS, a raylet per node

        out = tmp_path / "runs"
        cmd = [str(BIN / "fedpeft"), "simulate", str(ROOT / "simulations/smoke.toml"), "--ray-address", address,
               "--set", "sim.num_clients=8", "--set", "sim.clients_per_round=8", "--set", "sim.rounds=2",
               "--set", "output.checkpoint_every=0", "--set", f"output.dir={out}"]
        run = subprocess.run(cmd, env={**env, "FLWR_HOME": str(tmp_path / "flwr")}, capture_output=True,
                             text=True, timeout=180, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

        (run_dir,) = list(out.iterdir())
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1, 2] and all(r["clients"] == 8 for r in rows[1:])
        placement = list(csv.DictReader((run_dir / "placement.csv").open()))
        assert len(placement) == 16  # every client round trip, recorded where it ran
        assert sorted({(int(r["round"]), int(r["client_id"])) for r in placement}) == [
            (rnd, c) for rnd in (1, 2) for c in range(8)]
        used = {r["ray_node_id"] for r in placement}
        assert used == set(nodes), f"clients ran on {used}, cluster nodes {nodes}"
        # Both machines read the task from their own cache, shipped through the object store.
        for cache in (head_cache, node_cache):
            (task_copy,) = list((cache / "tasks").glob("ray-*/task.json"))
            assert json.loads(task_copy.read_text())["partitions"] == json.loads(
                (run_dir / "data" / "task.json").read_text())["partitions"]
        # The ledger charged every message (nothing was added to the messages for placement).
        comm = list(csv.DictReader((run_dir / "comm.csv").open()))
        assert sum(1 for r in comm if r["direction"] == "up" and r["record"] == "_envelope") == 16
        # The driver left the cluster running: it did not start it, so it did not stop it.
        assert all(_alive(pid) for pid in daemons)
        assert sorted(_wait_nodes(address, 2, procs, tmp_path)) == sorted(nodes)
        # Without sim.ray_address a run starts its own Ray, even with this cluster named by RAY_ADDRESS
        # (plain ray.init() would join it, and refuse the run's num_cpus).
        own = subprocess.run([sys.executable, "-c", OWN_RAY], env={**env, "RAY_ADDRESS": address},
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert own.returncode == 0, own.stderr[-3000:]
        assert own.stdout.split()[-1] not in ("", address), own.stdout
        assert sorted(_wait_nodes(address, 2, procs, tmp_path)) == sorted(nodes)
    finally:
        left = _stop(procs, ray_tmp)
        subprocess.run(["rm", "-rf", ray_tmp], check=False)
    assert not left, f"Ray processes left running: {sorted(left)}"


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"Ray head did not listen on {port}: {log.read_text()[-3000:]}")


def _wait_nodes(address: str, n: int, procs: list[subprocess.Popen], tmp_path: Path, timeout: float = 60) -> list[str]:
    """Ids of the cluster's alive nodes once there are `n` (asked from a short-lived driver)."""
    code = ("import json, sys, time, ray; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR');"
            "t = time.monotonic()\n"
            "while True:\n"
            "    alive = [x['NodeID'] for x in ray.nodes() if x['Alive'] and x['Resources'].get('CPU')]\n"
            "    if len(alive) >= int(sys.argv[2]) or time.monotonic() - t > 60: break\n"
            "    time.sleep(0.3)\n"
            "print(json.dumps(alive)); ray.shutdown()")
    got = subprocess.run([sys.executable, "-c", code, address, str(n)], capture_output=True, text=True,
                         timeout=timeout + 30, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert got.returncode == 0, got.stderr[-3000:]
    alive = json.loads(got.stdout.strip().splitlines()[-1])
    logs = "".join((tmp_path / f).read_text()[-1500:] for f in ("head.log", "node2.log"))
    assert len(alive) == n, f"{len(alive)} of {n} nodes came up: {logs}"
    return alive

"""Running on an existing Ray cluster: ship the prepared task through Ray's object store, record placement.

`fedpeft simulate` normally starts Ray itself and hands every client worker the path of the
prepared task folder. On a cluster (`sim.ray_address`) workers on other machines cannot read
that path, so the driver packs the task folder (a tar of the tokenized Arrow files and
`task.json`) into Ray's object store, behind a small named actor that lives as long as the
driver's connection. Each worker process fetches the archive once per machine into its local
cache (`$FEDPEFT_CACHE/tasks/ray-<sha256>`, under a file lock) and memory-maps it from there.
The object store is used rather than a shared path because it needs nothing from the machines
beyond Ray itself; the archive is addressed by its SHA-256, so every machine trains on
byte-identical data.

The same actor collects, for every client round trip, which Ray node and process ran it; the
driver appends them to `placement.csv` in the run directory after every round. Nothing is added to the messages,
so the ledger is unchanged.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import os
import shutil
import socket
import tarfile
import tempfile
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

SERVICE_KEY = "fedpeft-ray-service"  # run config: "<actor name>|<sha256 of the task archive>"
PLACEMENT_FILE = "placement.csv"
PLACEMENT_COLUMNS = ["round", "client_id", "ray_node_id", "hostname", "pid"]
_LOCAL_TASKS: dict[str, str] = {}  # sha256 → task folder, in the driver process that packed it


class RunService:
    """A Ray actor holding the task archive and collecting where each client ran."""

    def __init__(self, archive: bytes) -> None:
        self.archive = archive
        self.rows: list[tuple] = []

    def task(self) -> bytes:
        return self.archive

    def record(self, row: tuple) -> None:
        self.rows.append(tuple(row))

    def take(self) -> list[tuple]:
        rows, self.rows = self.rows, []
        return rows


def pack_task(task_dir: Path) -> bytes:
    """The task folder as an uncompressed tar (the Arrow files are already compact)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(Path(task_dir).rglob("*")):
            if p.is_file():
                tar.add(str(p), arcname=str(p.relative_to(task_dir)), recursive=False)
    return buf.getvalue()


class ClusterRun:
    """The driver's side: the service actor for one run, and writing its placement records."""

    def __init__(self, task_dir: Path) -> None:
        import ray

        archive = pack_task(task_dir)
        self.sha = hashlib.sha256(archive).hexdigest()
        self.name = f"fedpeft-run-{uuid.uuid4().hex[:12]}"
        # num_cpus=0: the service never takes a client slot. Not detached: it ends with the driver.
        actor = ray.remote(num_cpus=0)(RunService)
        self.actor = actor.options(name=self.name).remote(ray.put(archive))
        ray.get(self.actor.take.remote())  # wait until it is up
        self.archive_bytes = len(archive)
        _LOCAL_TASKS[self.sha] = str(task_dir)  # the driver's own ServerApp reads the folder it packed

    @property
    def config_value(self) -> str:
        return f"{self.name}|{self.sha}"

    def start_placement(self, run_dir: Path) -> None:
        """Create `placement.csv` (header only); rows are appended after every round."""
        self.placement_path = Path(run_dir) / PLACEMENT_FILE
        with self.placement_path.open("w", newline="") as f:
            csv.writer(f).writerow(PLACEMENT_COLUMNS)

    def flush_placement(self) -> None:
        """Append the placements collected since the last flush (every client has reported before replying)."""
        import ray

        rows = sorted(ray.get(self.actor.take.remote()))
        with self.placement_path.open("a", newline="") as f:
            csv.writer(f).writerows(rows)

    def wrap(self, on_round):
        """A round callback that first writes the round's placements (in the server thread, while Ray is up)."""

        def callback(row: dict) -> None:
            if row.get("round", 0) > 0:
                self.flush_placement()
            if on_round is not None:
                on_round(row)

        return callback


@lru_cache(maxsize=4)
def _actor(name: str):
    import ray

    return ray.get_actor(name)


def _parse(value: str) -> tuple[str, str]:
    name, _, sha = value.partition("|")
    return name, sha


def fetch_task(value: str, cache: Path) -> str:
    """This machine's copy of the run's task: fetched from the service once, verified, unpacked."""
    import ray

    name, sha = _parse(value)
    if sha in _LOCAL_TASKS:
        return _LOCAL_TASKS[sha]
    dest = Path(cache) / "tasks" / f"ray-{sha}"
    if (dest / "task.json").is_file():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f"ray-{sha}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker per machine fetches; the others wait and reuse it
        if not (dest / "task.json").is_file():
            archive = ray.get(_actor(name).task.remote())
            got = hashlib.sha256(archive).hexdigest()
            if got != sha:
                raise RuntimeError(f"task archive from {name} has sha256 {got}, expected {sha}")
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".ray-{sha[:12]}."))
            try:
                with tarfile.open(fileobj=io.BytesIO(archive), mode="r") as tar:
                    tar.extractall(tmp, filter="data")
                os.replace(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def record_placement(value: str, server_round: int, client_id: int) -> None:
    """Tell the run's service which Ray node and process ran this client round trip."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    row = (int(server_round), int(client_id), node, socket.gethostname(), os.getpid())
    # Waited for, so that the placement file is complete when the run ends (about a millisecond).
    ray.get(_actor(_parse(value)[0]).record.remote(row))


def ray_connect_args(address: str, verbose: bool) -> dict[str, Any]:
    """`ray.init` arguments to attach to an existing cluster (resources are the cluster's own)."""
    from fedpeft.env import OFFLINE_DEFAULTS

    return {
        "address": address,
        "log_to_driver": verbose,
        "logging_level": "INFO" if verbose else "ERROR",
        "configure_logging": True,
        # Workers on other machines run offline like the driver, whatever their shell had.
        "runtime_env": {"env_vars": {k: os.environ.get(k, v) for k, v in OFFLINE_DEFAULTS.items()}},
    }

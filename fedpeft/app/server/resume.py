"""Resumable runs: after every round, the server's whole state in one atomically written file.

`<run>/resume.npz` holds the last completed round, the global adapter record, the strategy's
state (server optimizer moments, SCAFFOLD's variate, FedKSeed's history, the user-level DP
wrapper's clipping bound and releases) and the byte lengths of every log the run appends to.
Everything else a round draws is derived from (run seed, round, client), and per-client state
is versioned by round in the client state store, so a run resumed from round R (`fedpeft
simulate --resume RUN_DIR`) truncates its logs to those lengths, rolls the client state back
to round R, and goes on exactly as if it had never stopped.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

RESUME_FILE = "resume.npz"
APPENDED = ("metrics.jsonl", "comm.csv", "privacy.csv", "generations.jsonl")  # logs a round appends to


class ResumeError(RuntimeError):
    """A run directory that cannot be resumed, and why."""


@dataclass
class Checkpoint:
    """The server's state after round `round`."""

    round: int
    arrays: ArrayRecord
    strategy: dict[str, np.ndarray] = field(default_factory=dict)
    log_sizes: dict[str, int] = field(default_factory=dict)  # file name in the run dir -> bytes
    extra: dict[str, Any] = field(default_factory=dict)


def log_sizes(run_dir: Path, extra_files: tuple[Path, ...] = ()) -> dict[str, int]:
    """Current byte length of each appended log (fsynced first, so the lengths survive a machine crash)."""
    out = {}
    for path in [*(Path(run_dir) / n for n in APPENDED), *extra_files]:
        if path.is_file():
            with path.open("rb+") as f:
                os.fsync(f.fileno())
            out[str(path.relative_to(run_dir))] = path.stat().st_size
    return out


def write_checkpoint(run_dir: Path, ckpt: Checkpoint) -> None:
    """Write `ckpt` atomically: temp file, fsync, rename over the previous one, fsync the folder."""
    run_dir = Path(run_dir)
    meta = {"round": ckpt.round, "keys": list(ckpt.arrays.keys()), "log_sizes": ckpt.log_sizes, "extra": ckpt.extra,
            "strategy_keys": list(ckpt.strategy)}
    payload = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    payload.update({f"a{i}": ckpt.arrays[k].numpy() for i, k in enumerate(meta["keys"])})
    payload.update({f"s{i}": np.asarray(ckpt.strategy[k]) for i, k in enumerate(meta["strategy_keys"])})
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{RESUME_FILE}.")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / RESUME_FILE)
    dir_fd = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_checkpoint(run_dir: Path) -> Checkpoint:
    """The last checkpoint of a run directory; ResumeError if there is none or it is unreadable."""
    path = Path(run_dir) / RESUME_FILE
    if not path.is_file():
        raise ResumeError(f"{run_dir} has no {RESUME_FILE}: it stopped before round 0 was recorded, "
                          "or was made by a fedpeft without resume support; start it again instead")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes().decode())
            arrays = ArrayRecord({k: Array(data[f"a{i}"]) for i, k in enumerate(meta["keys"])})
            strategy = {k: data[f"s{i}"] for i, k in enumerate(meta["strategy_keys"])}
    except (OSError, ValueError, KeyError) as err:
        raise ResumeError(f"{path} is unreadable ({err})") from None
    return Checkpoint(int(meta["round"]), arrays, strategy, dict(meta["log_sizes"]), dict(meta["extra"]))


def truncate_logs(run_dir: Path, sizes: dict[str, int]) -> None:
    """Cut every appended log back to its length at the checkpoint (logs it did not have yet are removed)."""
    run_dir = Path(run_dir)
    names = {*APPENDED, *sizes}
    for name in names:
        path = run_dir / name
        if not path.is_file():
            continue
        if name not in sizes:
            path.unlink()
        elif path.stat().st_size < sizes[name]:
            raise ResumeError(f"{path} is shorter than at the last checkpoint ({path.stat().st_size} < {sizes[name]} B)")
        else:
            os.truncate(path, sizes[name])

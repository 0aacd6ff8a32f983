"""Per-client state that outlives one round (a privacy accountant, an error-feedback residual, local factors).

JSON values live in one file per client; named tensor sets (numpy arrays) in `.npz` files beside it.

Ray workers are stateless between rounds (any worker may run any client), so state lives on
disk: under `<run_dir>/client_state/` in simulation, else under
`$FEDPEFT_CACHE/client_state/run-<flower run id>` (default cache: `<tempdir>/fedpeft-cache`).

Each file records the round that wrote it, and the version it replaces (written in an earlier,
hence completed, round) is kept beside it as `*.prev.*`: a run resumed after round R rolls every
file written later back to that version (`rollback`), so no client state runs ahead of the server.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

STATE_DIR = "client_state"
ROUND_KEY = "__round__"  # the round that wrote a file (a JSON key, an npz array)
PREV = ".prev"


class ClientStateStore:
    """A folder of `client-<id>.json` files, each written atomically; `server_round` versions what it writes."""

    def __init__(self, root: Path, server_round: int | None = None) -> None:
        self.root = Path(root)
        self.server_round = server_round

    def path(self, client_id: int) -> Path:
        """The file holding one client's state."""
        return self.root / f"client-{int(client_id)}.json"

    def load(self, client_id: int) -> dict[str, Any]:
        """The client's saved state, or {} if it has none yet."""
        p = self._readable(self.path(client_id))
        if p is None:
            return {}
        state = json.loads(p.read_text())
        state.pop(ROUND_KEY, None)
        return state

    def save(self, client_id: int, state: dict[str, Any]) -> None:
        """Replace the client's state (temp file + os.replace: readers never see half a file)."""
        target = self.path(client_id)
        self._keep_previous(target)
        body = {**state, ROUND_KEY: self.server_round} if self.server_round is not None else state
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".client-{int(client_id)}.")
        with os.fdopen(fd, "w") as f:
            json.dump(body, f)
        os.replace(tmp, target)

    def array_path(self, client_id: int, name: str) -> Path:
        """The file holding one named tensor set of one client."""
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"tensor set name must be letters, digits, '_' or '-', got {name!r}")
        return self.root / f"client-{int(client_id)}.{name}.npz"

    def load_arrays(self, client_id: int, name: str) -> dict[str, np.ndarray]:
        """The client's saved tensor set `name` (e.g. "residual"), or {} if it has none yet."""
        p = self._readable(self.array_path(client_id, name))
        if p is None:
            return {}
        with np.load(p, allow_pickle=False) as data:
            return {k: data[k] for k in data.files if k != ROUND_KEY}

    def save_arrays(self, client_id: int, name: str, arrays: dict[str, np.ndarray]) -> None:
        """Replace the client's tensor set `name` atomically."""
        target = self.array_path(client_id, name)
        self._keep_previous(target)
        body = {k: np.asarray(v) for k, v in arrays.items()}
        if self.server_round is not None:
            body[ROUND_KEY] = np.asarray(self.server_round)
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".client-{int(client_id)}.{name}.", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **body)
        os.replace(tmp, target)

    def client_ids(self) -> list[int]:
        """Ids of every client with saved state."""
        if not self.root.is_dir():
            return []
        return sorted(int(p.stem.split("-", 1)[1]) for p in self.root.glob("client-*.json") if PREV not in p.name)

    # ----- versions -------------------------------------------------------------------------
    def _readable(self, target: Path) -> Path | None:
        """The version a client of `server_round` starts from: the newest written before this round.

        A client retried in the same round (its worker died) must not start from what its first
        attempt already wrote.
        """
        if not target.is_file():
            return None
        if self.server_round is None:
            return target
        written = _round_of(target)
        if written is None or written < self.server_round:
            return target
        prev = _prev(target)
        return prev if prev.is_file() and (_round_of(prev) or 0) < self.server_round else None

    def _keep_previous(self, target: Path) -> None:
        # The file about to be replaced was written in an earlier round: keep it until this one commits.
        if self.server_round is None or not target.is_file():
            return
        written = _round_of(target)
        if written is not None and written < self.server_round:
            os.replace(target, _prev(target))

    def rollback(self, last_round: int) -> int:
        """Undo every write of rounds after `last_round` (back to the version before); returns the files undone."""
        if not self.root.is_dir():
            return 0
        undone = 0
        for cur in sorted(p for p in self.root.glob("client-*") if PREV not in p.name and not p.name.startswith(".")):
            written = _round_of(cur)
            if written is None or written <= last_round:
                continue
            prev = _prev(cur)
            if prev.is_file() and (_round_of(prev) or 0) <= last_round:
                os.replace(prev, cur)
            else:
                cur.unlink()
                prev.unlink(missing_ok=True)
            undone += 1
        for prev in self.root.glob(f"client-*{PREV}.*"):  # a kill between keeping the old version and writing the new
            cur = prev.with_name(prev.name.replace(PREV, "", 1))
            if not cur.exists() and (_round_of(prev) or 0) <= last_round:
                os.replace(prev, cur)
                undone += 1
        return undone


def _prev(path: Path) -> Path:
    stem, _, suffix = path.name.rpartition(".")
    return path.with_name(f"{stem}{PREV}.{suffix}")


def _round_of(path: Path) -> int | None:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return int(data[ROUND_KEY]) if ROUND_KEY in data.files else None
        value = json.loads(path.read_text()).get(ROUND_KEY)
        return int(value) if value is not None else None
    except (OSError, ValueError, KeyError):
        return None


def store_for(run_dir: str | None, run_id: int | str = 0, server_round: int | None = None) -> ClientStateStore:
    """The store for this run: inside the run directory if there is one, else in the cache folder."""
    if run_dir:
        return ClientStateStore(Path(run_dir) / STATE_DIR, server_round)
    cache = Path(os.environ.get("FEDPEFT_CACHE", Path(tempfile.gettempdir()) / "fedpeft-cache"))
    return ClientStateStore(cache / STATE_DIR / f"run-{run_id}", server_round)

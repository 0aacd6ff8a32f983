"""Per-client state that outlives one round (a privacy accountant, an error-feedback residual, local factors).

JSON values live in one file per client; named tensor sets (numpy arrays) in `.npz` files beside it.

Ray workers are stateless between rounds (any worker may run any client), so state lives on
disk: under `<run_dir>/client_state/` in simulation, else under
`$FEDPEFT_CACHE/client_state/run-<flower run id>` (default cache: `<tempdir>/fedpeft-cache`).
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


class ClientStateStore:
    """A folder of `client-<id>.json` files, each written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, client_id: int) -> Path:
        """The file holding one client's state."""
        return self.root / f"client-{int(client_id)}.json"

    def load(self, client_id: int) -> dict[str, Any]:
        """The client's saved state, or {} if it has none yet."""
        p = self.path(client_id)
        return json.loads(p.read_text()) if p.is_file() else {}

    def save(self, client_id: int, state: dict[str, Any]) -> None:
        """Replace the client's state (temp file + os.replace: readers never see half a file)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".client-{int(client_id)}.")
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.path(client_id))

    def array_path(self, client_id: int, name: str) -> Path:
        """The file holding one named tensor set of one client."""
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"tensor set name must be letters, digits, '_' or '-', got {name!r}")
        return self.root / f"client-{int(client_id)}.{name}.npz"

    def load_arrays(self, client_id: int, name: str) -> dict[str, np.ndarray]:
        """The client's saved tensor set `name` (e.g. "residual"), or {} if it has none yet."""
        p = self.array_path(client_id, name)
        if not p.is_file():
            return {}
        with np.load(p, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def save_arrays(self, client_id: int, name: str, arrays: dict[str, np.ndarray]) -> None:
        """Replace the client's tensor set `name` atomically."""
        target = self.array_path(client_id, name)
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".client-{int(client_id)}.{name}.", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
        os.replace(tmp, target)

    def client_ids(self) -> list[int]:
        """Ids of every client with saved state."""
        if not self.root.is_dir():
            return []
        return sorted(int(p.stem.split("-", 1)[1]) for p in self.root.glob("client-*.json"))


def store_for(run_dir: str | None, run_id: int | str = 0) -> ClientStateStore:
    """The store for this run: inside the run directory if there is one, else in the cache folder."""
    if run_dir:
        return ClientStateStore(Path(run_dir) / STATE_DIR)
    cache = Path(os.environ.get("FEDPEFT_CACHE", Path(tempfile.gettempdir()) / "fedpeft-cache"))
    return ClientStateStore(cache / STATE_DIR / f"run-{run_id}")

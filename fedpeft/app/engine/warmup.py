"""Worker warm-up: a Ray worker-process setup hook that does a client worker's one-time work at start.

Flower creates its client actors when the engine starts, but a worker used to import torch,
transformers and peft, open the task and build the base model only when its first client
message arrived, so round 1 paid for all of it. `fedpeft simulate` starts its own Ray before it
prepares the task, with this hook: each worker imports the client stack while the driver
prepares the task, then waits for the run's spec (config, prepared task, number of labels),
opens the task and builds the base model while the server builds its own model and evaluates
round 0. The caches it fills are the ones the ClientApp uses, so the work is not repeated; the
model is seeded, so it is the same model either way. Best effort: any failure here is ignored
and the ClientApp does the work itself.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

ENV_KEY = "FEDPEFT_WARMUP"
SPEC_WAIT_S = 900.0  # longer than any task preparation; a worker of a run that failed is shut down anyway
_POLL_S = 0.05


class WarmupSpec:
    """The file this run's warm-up hook reads, in a private folder that exists before Ray starts."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="fedpeft-warmup-"))
        self.path = self.folder / "spec.json"

    def write(self, cfg_json: str, task_dir: str, num_labels: int) -> None:
        """Publish the run's config, prepared task folder and number of labels (atomically: workers poll for it)."""
        tmp = self.folder / "spec.json.tmp"
        tmp.write_text(json.dumps({"config": cfg_json, "task": task_dir, "num_labels": num_labels}))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        """Delete the folder (a worker still waiting then gives up)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _await_spec(path: Path, timeout_s: float = SPEC_WAIT_S) -> dict | None:
    """The spec once the driver has written it; None if its folder is removed first or the wait times out."""
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if not path.parent.is_dir() or time.monotonic() > deadline:
            return None
        time.sleep(_POLL_S)
    return json.loads(path.read_text())


def setup() -> None:
    """Import the client stack, then open the task and build the worker's base model (Ray calls this)."""
    spec_path = os.environ.get(ENV_KEY, "")
    if not spec_path:
        return
    try:
        import clients.app  # noqa: F401  (torch, transformers, peft, flwr, every method's trainer)
        from fedpeft.config import Config
        from fedpeft.data import open_prepared
        from fedpeft.env import pin_client_threads, quiet_libraries
        from fedpeft.models import cached_model

        quiet_libraries()
        spec = _await_spec(Path(spec_path))
        if spec is None:
            return
        cfg = Config.from_json(spec["config"])
        pin_client_threads(cfg.sim.cpus_per_client)
        if Path(spec["task"], "task.json").is_file():
            open_prepared(spec["task"])
        cached_model(cfg, int(spec["num_labels"]))
    except Exception:  # noqa: BLE001  warm-up is an optimization only
        pass

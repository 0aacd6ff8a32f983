"""Worker warm-up: a Ray worker-process setup hook that does a client worker's one-time work at start.

Flower creates its client actors when the engine starts, but a worker used to import torch,
transformers and peft, open the task and build the base model only when its first client
message arrived, so round 1 paid for all of it. With this hook (set by `fedpeft simulate` when
it starts Ray itself) each worker does that while the server builds its own model and evaluates
round 0. The caches it fills are the ones the ClientApp uses, so the work is not repeated; the
model is seeded, so it is the same model either way. Best effort: any failure here is ignored
and the ClientApp does the work itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV_KEY = "FEDPEFT_WARMUP"


def write_spec(path: Path, cfg_json: str, task_dir: str, num_labels: int) -> Path:
    """The file the hook reads: the run's config, its prepared task folder and number of labels."""
    path.write_text(json.dumps({"config": cfg_json, "task": task_dir, "num_labels": num_labels}))
    return path


def setup() -> None:
    """Import the client stack, open the task and build the worker's base model (Ray calls this)."""
    spec_path = os.environ.get(ENV_KEY, "")
    if not spec_path:
        return
    try:
        spec = json.loads(Path(spec_path).read_text())
        import clients.app  # noqa: F401  (torch, transformers, peft, flwr, every method's trainer)
        from fedpeft.config import Config
        from fedpeft.data import open_prepared
        from fedpeft.env import pin_client_threads, quiet_libraries
        from fedpeft.models import cached_model

        quiet_libraries()
        cfg = Config.from_json(spec["config"])
        pin_client_threads(cfg.sim.cpus_per_client)
        if Path(spec["task"], "task.json").is_file():
            open_prepared(spec["task"])
        cached_model(cfg, int(spec["num_labels"]))
    except Exception:  # noqa: BLE001  warm-up is an optimization only
        pass

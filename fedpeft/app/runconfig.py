"""What Flower's run config carries to the ServerApp and every ClientApp.

`fedpeft simulate` passes the resolved config as JSON plus the prepared task folder. Under
`flwr run` (local simulation or real SuperNodes) the run config instead names a `recipe` with
optional `overrides`; each process then prepares the task itself, deterministically, into a
cache folder keyed by the config, so every process sees identical data.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import tempfile
from pathlib import Path

from fedpeft.app.engine.cluster import SERVICE_KEY
from fedpeft.config import Config, ConfigError

from fedpeft.app.recipe import load
from fedpeft.data import PreparedTask, open_prepared, prepare
from fedpeft.data.prepared import TASK_FORMAT

CONFIG_KEY = "fedpeft-config"
TASK_KEY = "fedpeft-task"
RUN_DIR_KEY = "fedpeft-run-dir"
RECIPE_KEY = "recipe"
OVERRIDES_KEY = "overrides"
NODE_WAIT_KEY = "node-wait-s"
RESUME_KEY = "fedpeft-resume"  # "1": go on from the run directory's last checkpoint (fedpeft.app.server.resume)
DEFAULT_NODE_WAIT_S = 60.0
APP_ROOT = Path(__file__).resolve().parents[2]  # the Flower app (FAB) folder: pyproject.toml, simulations/


def config_from(run_config: dict) -> Config:
    """The run's Config: from its JSON form, or from `recipe` + `overrides`."""
    text = str(run_config.get(CONFIG_KEY, "") or "")
    if text:
        return Config.from_json(text)
    recipe = str(run_config.get(RECIPE_KEY, "") or "")
    if not recipe:
        raise ConfigError(f"the run config has neither '{CONFIG_KEY}' nor '{RECIPE_KEY}'")
    path = Path(recipe)
    if not path.is_absolute():
        # A relative recipe is looked up in $FEDPEFT_APP_DIR or the working directory, then in the
        # app itself: under `flwr run` the FAB carries simulations/, so every node has the recipe.
        base = Path(os.environ.get("FEDPEFT_APP_DIR", "."))
        path = base / path if (base / path).is_file() or not (APP_ROOT / path).is_file() else APP_ROOT / path
    return load(path, shlex.split(str(run_config.get(OVERRIDES_KEY, "") or "")))


def cache_root() -> Path:
    """Where processes of one machine share prepared tasks and run files (`$FEDPEFT_CACHE`)."""
    return Path(os.environ.get("FEDPEFT_CACHE", Path(tempfile.gettempdir()) / "fedpeft-cache"))


def shared_dir(run_config: dict, run_id: int) -> Path:
    """A folder the ServerApp and the ClientApps of one run on one machine can all reach.

    The run directory under `fedpeft simulate`; under `flwr run`, a cache folder named by Flower's run id.
    """
    given = str(run_config.get(RUN_DIR_KEY, "") or "")
    return Path(given) if given else cache_root() / "runs" / str(run_id)


def task_from(run_config: dict, cfg: Config) -> PreparedTask:
    """The prepared task: the folder named in the run config, or a per-config cache built once."""
    service = str(run_config.get(SERVICE_KEY, "") or "")
    if service:  # on an existing Ray cluster: this machine's copy, fetched through the object store
        from fedpeft.app.engine.cluster import fetch_task

        return open_prepared(fetch_task(service, cache_root()))
    given = str(run_config.get(TASK_KEY, "") or "")
    if given:
        return open_prepared(given)
    root = cache_root() / "tasks"
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(
        (cfg.data.model_dump_json() + cfg.partition.model_dump_json() + cfg.model.model_dump_json()
         + str(cfg.sim.num_clients) + str(cfg.sim.seed) + f"format{TASK_FORMAT}").encode()
    ).hexdigest()[:16]
    dest = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process prepares; the others wait and reuse it
        if not (dest / "task.json").is_file():
            prepare(cfg, dest)
    return open_prepared(str(dest))

"""ClientApp wiring: build a process's runtime (config, tokenized data, the one base model) from Flower's context."""

from __future__ import annotations

from functools import lru_cache

from flwr.app import Context

from clients.base import ClientRuntime
from fedpeft.app.engine.cluster import SERVICE_KEY
from fedpeft.data.nodefile import DATA_FILE_KEY, node_task
from fedpeft.env import pin_client_threads
from fedpeft.models import cached_model
from fedpeft.app.runconfig import (
    CONFIG_KEY, OVERRIDES_KEY, RECIPE_KEY, RUN_DIR_KEY, TASK_KEY, config_from, shared_dir, task_from,
)

__all__ = ["ClientRuntime", "client_id", "runtime"]


@lru_cache(maxsize=2)
def _runtime(items: tuple[tuple[str, str], ...], run_id: int, data_file: str = "", cid: int = -1) -> ClientRuntime:
    rc = dict(items)
    cfg = config_from(rc)
    if RUN_DIR_KEY in rc:  # a simulation worker (a deployed SuperNode keeps its machine's threads)
        pin_client_threads(cfg.sim.cpus_per_client)
    task = task_from(rc, cfg)
    if data_file:  # a deployed node trains on its own file, not on a simulation partition
        task = node_task(task, cfg, data_file, cid)
    # Only `fedpeft simulate` names its run directory in the run config (the server checks the same).
    return ClientRuntime(cfg, task, cached_model(cfg, task.num_labels), str(shared_dir(rc, run_id)),
                         simulated=bool(rc.get(RUN_DIR_KEY, "")))


def runtime(context: Context) -> ClientRuntime:
    """The runtime for this run, built on first use in this process and reused afterwards."""
    keys = (CONFIG_KEY, TASK_KEY, RECIPE_KEY, OVERRIDES_KEY, RUN_DIR_KEY, SERVICE_KEY)
    items = tuple((k, str(context.run_config[k])) for k in keys if k in context.run_config)
    data_file = str(context.node_config.get(DATA_FILE_KEY, "") or "")
    if data_file:
        return _runtime(items, context.run_id, data_file, client_id(context))
    return _runtime(items, context.run_id)


def client_id(context: Context) -> int:
    """This node's client id: `client-id` from the node config, else the simulation partition id."""
    nc = context.node_config
    if "client-id" in nc:
        return int(nc["client-id"])
    if "partition-id" not in nc:
        raise ValueError("the node config has no 'client-id' (start the SuperNode with --node-config \"client-id=N\")")
    return int(nc["partition-id"])

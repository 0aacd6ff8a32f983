"""Every Flower internal fedpeft uses, in one place, each guarded by the Flower version it was written for.

fedpeft drives Flower's simulation engine itself (`fedpeft.app.simulate`) and replaces three of its
module globals for the length of a run:

- `node-ids`: the id draw behind `create_node`, so virtual SuperNodes get seeded, fixed-width ids
  (byte-identical messages for one seed);
- `dispatch`: the engine's message dispatcher (`fedpeft.app.engine.dispatch`: one scan per tick);
- `ray-backend`: the Ray backend class, so a dead worker is replaced (`fedpeft.app.engine.workers`).

Each internal is named here with the module, the attribute and, for a callable fedpeft calls or
replaces, the parameters it relies on. `problems()` lists what no longer matches in the installed
Flower; `tests/unit/test_flower_internals.py` fails on any of them, naming it. At run time the
dispatcher and Ray-backend replacements are installed only under the Flower version they were
written for with every internal present; otherwise Flower's own behaviour is kept and run.log says
so (they change cost and recovery, not results). The engine's entry points and the seeded node ids
(`engine`, `node-ids`) have no fallback, since results depend on them: a missing one stops the run
with a clear error; another Flower version with all of them present runs, with a warning.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import flwr

WRITTEN_FOR = "1.42.0"  # the Flower release every entry below was checked against (pinned in pyproject.toml)

log = logging.getLogger("fedpeft.app.engine.flower")


class FlowerChanged(RuntimeError):
    """The installed Flower lacks an internal fedpeft relies on."""


@dataclass(frozen=True)
class Internal:
    """One Flower internal: `module.attr`, and the parameter names fedpeft relies on if it is a callable."""

    module: str
    attr: str
    params: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        """`module.attr`."""
        return f"{self.module}.{self.attr}"


_VCE = "flwr.server.superlink.fleet.vce"
_LINKSTATE = "flwr.server.superlink.linkstate"
_ACTOR = "flwr.simulation.ray_transport.ray_actor"

# What each use needs. Names are fedpeft's, unique across groups.
INTERNALS: dict[str, dict[str, Internal]] = {
    "engine": {
        "start_vce": Internal(_VCE, "start_vce", ("backend_name", "backend_config_json_stream", "app_dir", "is_app",
                                                  "f_stop", "run", "metrics", "client_app", "state_factory",
                                                  "existing_nodes_mapping")),
        "VceMetrics": Internal(f"{_VCE}.metrics", "VceMetrics"),
        "run_serverapp_th": Internal("flwr.simulation.run_simulation", "run_serverapp_th",
                                     ("server_app_attr", "server_app", "server_app_context", "grid", "app_dir",
                                      "f_stop", "exception_queue", "enable_tf_gpu_growth", "ctx_queue")),
        "LinkStateFactory": Internal(_LINKSTATE, "LinkStateFactory"),
        "RunRecord": Internal(f"{_LINKSTATE}.in_memory_linkstate", "RunRecord"),
        "SUPERLINK_NODE_ID": Internal("flwr.common.constant", "SUPERLINK_NODE_ID"),
        "PARTITION_ID_KEY": Internal("flwr.common.constant", "PARTITION_ID_KEY"),
        "Task": Internal("flwr.proto.task_pb2", "Task"),
        "FLWR_IN_MEMORY_DB_NAME": Internal("flwr.supercore.constant", "FLWR_IN_MEMORY_DB_NAME"),
        "NOOP_FEDERATION_ID": Internal("flwr.supercore.constant", "NOOP_FEDERATION_ID"),
        "update_console_handler": Internal("flwr.supercore.logger", "update_console_handler"),
        "ObjectStoreFactory": Internal("flwr.supercore.object_store", "ObjectStoreFactory"),
        "Run": Internal("flwr.supercore.run", "Run"),
        "TaskIdentity": Internal("flwr.supercore.task_identity", "TaskIdentity"),
        "NoOpFederationManager": Internal("flwr.superlink.federation", "NoOpFederationManager"),
        "InMemoryGrid": Internal("flwr.superlink.grid", "InMemoryGrid"),
    },
    "node-ids": {
        "register_nodes": Internal(f"{_VCE}.vce_api", "_register_nodes", ("num_nodes", "state_factory")),
        "generate_rand_int_from_bytes": Internal(f"{_LINKSTATE}.in_memory_linkstate", "generate_rand_int_from_bytes",
                                                 ("num_bytes", "exclude")),
    },
    "dispatch": {
        "add_messages_to_queue": Internal(f"{_VCE}.vce_api", "add_messages_to_queue",
                                          ("state", "queue", "nodes_mapping", "f_stop")),
        "now": Internal("flwr.supercore.date", "now"),
    },
    "ray-backend": {
        "RayBackend": Internal(f"{_VCE}.backend.raybackend", "RayBackend", ("backend_config",)),
        "BasicActorPool": Internal(_ACTOR, "BasicActorPool", ("actor_type", "client_resources", "actor_kwargs")),
        "ClientAppActor": Internal(_ACTOR, "ClientAppActor"),
        "pool_size_from_resources": Internal(_ACTOR, "pool_size_from_resources", ("client_resources",)),
    },
    # Not patched, but private: the ledger measures a message's bytes as Flower's wire serializes it.
    "ledger": {
        "get_all_nested_objects": Internal("flwr.supercore.inflatable.inflatable_object", "get_all_nested_objects"),
        "no_object_id_recompute": Internal("flwr.supercore.inflatable.inflatable_object", "no_object_id_recompute"),
    },
}
# Methods of Flower's actor pool that the recovering backend calls.
POOL_METHODS = ("submit", "fetch_result_and_return_actor_to_pool", "add_actor_back_to_pool")

_BY_NAME = {name: item for group in INTERNALS.values() for name, item in group.items()}


def _lookup(item: Internal) -> Any:
    return getattr(importlib.import_module(item.module), item.attr)


def _problem(name: str, item: Internal) -> str | None:
    """What is wrong with one internal in the installed Flower, or None."""
    try:
        obj = _lookup(item)
    except (ImportError, AttributeError) as err:
        return f"{name}: {item.path} is gone ({type(err).__name__}: {err})"
    if item.params:
        try:
            have = set(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            return f"{name}: {item.path} is no longer a callable with a signature"
        missing = [p for p in item.params if p not in have]
        if missing:
            return f"{name}: {item.path} lost parameter(s) {', '.join(missing)}"
    return None


def problems(group: str | None = None, version: bool = True) -> list[str]:
    """What no longer matches in the installed Flower (all groups, or one), version first; empty when all do."""
    out = [] if flwr.__version__ == WRITTEN_FOR or not version else [
        f"flwr {flwr.__version__} is installed; fedpeft's engine code was written for flwr {WRITTEN_FOR}"]
    groups = [group] if group else list(INTERNALS)
    for g in groups:
        out += [p for name, item in INTERNALS[g].items() if (p := _problem(name, item))]
    if (group in (None, "ray-backend")) and not _problem("BasicActorPool", INTERNALS["ray-backend"]["BasicActorPool"]):
        pool = get("BasicActorPool")
        out += [f"ray-backend: BasicActorPool.{m} is gone" for m in POOL_METHODS if not hasattr(pool, m)]
    return out


def get(name: str) -> Any:
    """The Flower object fedpeft calls `name` (see INTERNALS); FlowerChanged naming it when it is gone."""
    item = _BY_NAME[name]
    try:
        return _lookup(item)
    except (ImportError, AttributeError) as err:
        raise FlowerChanged(f"Flower internal {item.path} is not in flwr {flwr.__version__} "
                            f"(fedpeft's engine was written for flwr {WRITTEN_FOR}): {err}") from None


def usable(group: str) -> bool:
    """Whether the patch `group` may be installed: the Flower it was written for, every internal present."""
    found = problems(group)
    if found:
        log.warning("Flower's own %s is kept (fedpeft's replacement is off): %s", group, "; ".join(found))
    return not found


@contextmanager
def replaced(name: str, value: Any) -> Iterator[Any]:
    """Replace the module global Flower calls `name` with `value` for the block; yields the original."""
    item = _BY_NAME[name]
    module = importlib.import_module(item.module)
    original = getattr(module, item.attr)
    setattr(module, item.attr, value)
    try:
        yield original
    finally:
        setattr(module, item.attr, original)

"""Worker recovery: a Ray client worker that dies is replaced, and its client optionally retried.

Flower 1.41's Ray backend (`flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend`) runs
each message on an actor popped from its `BasicActorPool` and, whatever the error, puts that
actor back in the pool (`add_actor_back_to_pool`). An actor whose process died (SIGKILL, the OOM
killer, Ray's memory monitor) stays in the pool for good: every later message that lands on it
fails at once with `ActorDiedError`, so each later round loses about 1/(pool size) of its
clients. Flower's other pool (`VirtualClientEngineActorPool`) has a removal path, but the
simulation engine does not use it, and it only shrinks the pool.

`RecoveringRayBackend` subclasses that backend and owns its `process_message`: the dead actor is
dropped (and `ray.kill`-ed, which is a no-op for a dead one and frees the resources of one that is
only half gone), a fresh actor takes its place in the pool, so the pool keeps its size and every
later round has full participation. The client that was running on it is then either reported
failed for the round with Ray's own error (which names the worker's actor id and pid), as
before, or re-run up to `sim.client_retries` times on a fresh worker first. `worker_recovery()`
installs the subclass for the duration of one engine run; Flower's `start_vce` imports
`RayBackend` from that module when it builds the backend, so the patch is that one attribute.
It relies on `BasicActorPool`'s internals (`submit`, `fetch_result_and_return_actor_to_pool`, the
idle list `pool`, `create_actor_fn`, `_future_to_actor`) as they are in the Flower release pinned in
pyproject.toml: if Flower's backend module or those pool methods are not there, the patch is not
installed and Flower's behaviour is left as it is, with a warning in run.log.

`start_actors()` creates the pool's actors right after Ray starts, exactly as the pool would
(`ClientAppActor` with the client resources, as many as the cluster holds); the backend's `build`
adopts them instead of creating its own. Ray starts a worker process for an actor only when the
actor is created, so the workers' start and warm-up (`fedpeft.app.engine.warmup`) then run while the driver
prepares the task, not in round 1.

The server reads the counts of each round (`workers_replaced`, `client_retries`) with
`round_counts()`; a dead worker is only noticed by the message that ran on it, before that
message's reply is stored, so the counts belong to the round that received that reply.
"""

from __future__ import annotations

import logging
import re
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from fedpeft.app.engine import flower

log = logging.getLogger("fedpeft.app.engine.workers")
_PID = re.compile(r"\bpid: (\d+)")


class WorkerRecovery:
    """What one engine run's recovery did: replaced workers and client retries, counted per round."""

    def __init__(self, retries: int) -> None:
        self.retries = retries
        self._lock = threading.Lock()
        self._counts = {"workers_replaced": 0, "client_retries": 0}
        self.totals = dict(self._counts)

    def count(self, key: str) -> None:
        """Add one event of kind `key` ("workers_replaced" or "client_retries")."""
        with self._lock:
            self._counts[key] += 1
            self.totals[key] += 1

    def pop_counts(self) -> dict[str, int]:
        """The counts since the last call, then zero them."""
        with self._lock:
            out = dict(self._counts)
            self._counts = dict.fromkeys(out, 0)
        return out


_ACTIVE: list[WorkerRecovery] = []


def round_counts() -> dict[str, int]:
    """The running simulation's `workers_replaced` / `client_retries` since the last call ({} outside one)."""
    return _ACTIVE[-1].pop_counts() if _ACTIVE else {}


def _lost_worker_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, OutOfMemoryError, WorkerCrashedError

    return ActorDiedError, OutOfMemoryError, WorkerCrashedError


def _run_on(actor: Any, app_fn: Any, message: Any, cid: str, context: Any) -> Any:
    return actor.run.remote(app_fn, message, cid, context)


def _describe(actor: Any, err: BaseException) -> str:
    """'actor <id>, pid <pid>' of a lost worker, from the handle and Ray's error text."""
    try:
        actor_id = actor._actor_id.hex()  # pylint: disable=protected-access
    except AttributeError:
        actor_id = getattr(err, "actor_id", None) or "?"
    m = _PID.search(str(err))
    return f"actor {actor_id}, pid {m.group(1) if m else '?'}"


def start_actors(client_resources: dict[str, float]) -> list[Any]:
    """Create the client actors Flower's pool would create for these resources, now (none if it cannot adopt them)."""
    if flower.problems("ray-backend"):
        return []
    count = flower.get("pool_size_from_resources")(client_resources)
    return [flower.get("ClientAppActor").options(**client_resources).remote() for _ in range(count)]


def recovering_backend(base: type, recovery: WorkerRecovery, actors: list[Any] | None = None) -> type:
    """A subclass of Flower's `RayBackend` (`base`) that replaces dead actors and retries per `recovery`.

    Its pool is `actors` (from `start_actors`) when given, else the actors Flower's `build` creates.
    """
    lost_errors = _lost_worker_errors()
    early = list(actors or [])

    class RecoveringRayBackend(base):  # type: ignore[valid-type, misc]
        """Flower's RayBackend whose `process_message` replaces a dead actor instead of re-pooling it."""

        def build(self, app_fn: Any) -> None:
            """Build the actor pool from the actors started early, as Flower builds it otherwise."""
            if not early:
                return super().build(app_fn)
            self.pool = flower.get("BasicActorPool")(
                actor_type=flower.get("ClientAppActor"), client_resources=self.client_resources, actor_kwargs=self.actor_kwargs
            )
            # start_actors made exactly the pool's capacity, with the same resources
            self.pool.pool.extend(early)
            self.pool.num_actors += len(early)
            early.clear()
            self.app_fn = app_fn

        def process_message(self, message: Any, context: Any) -> tuple[Any, Any]:
            """Run the ClientApp on an idle actor; a lost actor is replaced, the client retried if allowed."""
            if self.pool is None or self.app_fn is None:
                return super().process_message(message, context)  # Flower's own errors for these
            pool, cid = self.pool, str(context.node_config[flower.get("PARTITION_ID_KEY")])
            attempt = 0
            while True:
                future = pool.submit(_run_on, (self.app_fn, message, cid, context))
                try:
                    return pool.fetch_result_and_return_actor_to_pool(future)
                except lost_errors as err:
                    self._replace(pool, pool._future_to_actor.pop(future), err, cid)  # pylint: disable=protected-access
                    if attempt >= recovery.retries:
                        raise  # Flower's worker thread turns it into the client's error reply
                    attempt += 1
                    recovery.count("client_retries")
                    log.warning("client %s: retry %d of %d on a fresh worker", cid, attempt, recovery.retries)
                except Exception:
                    pool.add_actor_back_to_pool(future)  # as Flower does for any other error
                    raise

        @staticmethod
        def _replace(pool: Any, actor: Any, err: BaseException, cid: str) -> None:
            import ray

            try:
                ray.kill(actor, no_restart=True)  # frees its resources if it is not quite gone yet
            except Exception:  # noqa: BLE001  already dead and gone: nothing to free
                pass
            pool.pool.append(pool.create_actor_fn())
            recovery.count("workers_replaced")
            log.warning("Ray worker died (%s) while running client %s: %s; replaced by a fresh worker",
                        _describe(actor, err), cid, type(err).__name__)

    return RecoveringRayBackend


@contextmanager
def worker_recovery(retries: int = 0, actors: list[Any] | None = None) -> Iterator[WorkerRecovery]:
    """Replace dead Ray client workers (retrying their client up to `retries` times) while the block runs.

    `actors` (from `start_actors`) become the pool's first actors.
    """
    recovery = WorkerRecovery(retries)
    _ACTIVE.append(recovery)
    try:
        if flower.usable("ray-backend"):  # else Flower's own backend, and run.log says why
            backend = recovering_backend(flower.get("RayBackend"), recovery, actors)
            with flower.replaced("RayBackend", backend):
                yield recovery
        else:
            yield recovery
    finally:
        _ACTIVE.remove(recovery)

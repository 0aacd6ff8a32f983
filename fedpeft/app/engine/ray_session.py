"""The Ray a simulation runs on: started (or attached to) before the task is prepared, stopped by this driver.

A local Ray gets the worker warm-up hook (`fedpeft.app.engine.warmup`) and its client actors at once
(`fedpeft.app.engine.workers.start_actors`), so the workers import the client stack while the driver
prepares the task. Ray's log lines from its start go to a start-up log the driver moves into
run.log once the run directory exists.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from fedpeft.config import Config
from fedpeft.ledger import MIB
from fedpeft.app.runlog import run_log
from fedpeft.app.engine.warmup import ENV_KEY, WarmupSpec
from fedpeft.app.engine.workers import start_actors


def ray_init_args(cfg: Config, verbose: bool) -> dict[str, Any]:
    """Arguments for `ray.init` sized for this run.

    Workers' own output stays in Ray's session folder unless `verbose` (`log_to_driver`); the
    driver's Ray log lines go to run.log (see `fedpeft.app.runlog`).
    """
    args: dict[str, Any] = {
        # Always a new Ray of our own: without it, ray.init joins the newest `ray start` cluster on this
        # machine (or RAY_ADDRESS), which refuses num_cpus and is not ours to size or stop.
        "address": "local",
        "include_dashboard": False,
        "object_store_memory": cfg.sim.object_store_mib * MIB,
        "log_to_driver": verbose,
        "logging_level": "INFO" if verbose else "WARNING",
        "configure_logging": True,
    }
    if cfg.sim.num_cpus:
        args["num_cpus"] = cfg.sim.num_cpus
    return args


def ray_args(cfg: Config, verbose: bool, warmup: Path | None = None) -> dict[str, Any]:
    """`ray.init` arguments: attach to `sim.ray_address` when set, else start a local Ray sized for the run.

    A local Ray gets the worker warm-up hook (`fedpeft.app.engine.warmup`), reading its spec from `warmup`.
    """
    if cfg.sim.ray_address:
        from fedpeft.app.engine.cluster import ray_connect_args

        return ray_connect_args(cfg.sim.ray_address, verbose)
    args = ray_init_args(cfg, verbose)
    if warmup is not None:
        args["runtime_env"] = {"worker_process_setup_hook": "fedpeft.app.engine.warmup.setup", "env_vars": {ENV_KEY: str(warmup)}}
    return args


def client_resources(cfg: Config) -> dict[str, float]:
    """What one virtual client holds on Ray (Flower's `client_resources`)."""
    return {"num_cpus": cfg.sim.cpus_per_client, "num_gpus": cfg.sim.gpus_per_client}


def start_ray(cfg: Config, verbose: bool, spec: WarmupSpec | None) -> tuple[Path, list]:
    """Start (or attach to) Ray before the task is prepared; a local Ray's client workers start at once.

    Returns the start-up log (Ray's log lines from its start; the caller moves them into run.log
    once the run directory exists) and the client actors started early (`fedpeft.app.engine.workers`): their
    workers import the client stack while the driver prepares the task.
    """
    import ray

    boot_log = Path(tempfile.mkdtemp(prefix="fedpeft-ray-start-")) / "run.log"
    with run_log(boot_log, verbose):
        ray.init(**ray_args(cfg, verbose, spec.path if spec else None))
        log_ray_session()
    return boot_log, (start_actors(client_resources(cfg)) if spec is not None else [])


def stop_ray(local: bool) -> None:
    """Shut down (on a cluster: disconnect from) this driver's Ray, once; a `local` one's monitor is stopped first.

    A local node's monitor (no autoscaling here) answers SIGTERM by reporting to the GCS, which
    `ray.shutdown` has already stopped, so Ray waited out its one-second grace period on every run.
    """
    import ray

    if not ray.is_initialized():  # already stopped
        return
    if not local:
        ray.shutdown()
        return
    try:
        from ray._private import ray_constants
        from ray._private.worker import _global_node

        for info in _global_node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []):
            info.process.kill()
            info.process.wait(5)
    except Exception:  # noqa: BLE001  Ray's internals moved: ray.shutdown stops it, only slower
        pass
    ray.shutdown()


def carry_log(boot_log: Path, log_file: Path) -> None:
    """Put the start-up log at the head of run.log."""
    try:
        text = boot_log.read_text(encoding="utf-8")
        with log_file.open("a", encoding="utf-8") as fh:
            fh.write(text)
    except OSError:  # informational only
        pass


def log_ray_session() -> None:
    """Log where Ray keeps this session's worker output."""
    try:
        from ray._private.worker import global_worker

        logging.getLogger("fedpeft").info("Ray session logs (worker output): %s/logs",
                                          global_worker.node.get_session_dir_path())
    except Exception:  # informational only; Ray's internals may move
        pass

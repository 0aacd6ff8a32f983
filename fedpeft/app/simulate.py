"""The simulation driver: prepare the task once, run Flower's simulation engine on Ray, shut it down.

This mirrors what `flwr.simulation.run_simulation` does, with two differences that matter here:
the virtual SuperNodes are registered before the ServerApp starts, so the server knows which node
holds which client partition (seeded, reproducible sampling from round 1), and Ray is started and
stopped by this driver, so no process outlives the call.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from queue import Empty, Queue
from typing import Any, Callable

from fedpeft.config import Config
from fedpeft.data import prepare
from fedpeft.app.engine.dispatch import fast_dispatch
from fedpeft.app.engine import flower
from fedpeft.privacy.sample_level import check_task
from fedpeft.env import set_offline_env
from fedpeft.nodes import NodeDirectory
from fedpeft.rundir import RunDir
from fedpeft.seeding import fixed_width_id
from fedpeft.tracking.session import check_installed
from fedpeft.app.runlog import error_text, origin, run_log, write_traceback
from fedpeft.app.server.resume import ResumeError, read_checkpoint
from fedpeft.app.runconfig import CONFIG_KEY, RESUME_KEY, RUN_DIR_KEY, TASK_KEY
from fedpeft.app.server import RoundCallback, make_server_app
from fedpeft.app.engine.ray_session import carry_log, client_resources, start_ray, stop_ray
from fedpeft.app.engine.warmup import WarmupSpec
from fedpeft.app.engine.workers import worker_recovery


def _write_app_descriptor(run_dir: Path, run_config: dict) -> Path:
    # Flower gives virtual SuperNodes the run config of an app directory fused with the run's
    # overrides; this minimal descriptor declares the keys fedpeft passes to every client.
    app_dir = run_dir / ".flwr-app"
    app_dir.mkdir(exist_ok=True)
    keys = "\n".join(f'{k} = ""' for k in run_config)
    (app_dir / "pyproject.toml").write_text(
        '[project]\nname = "fedpeft-run"\nversion = "0.1.0"\n\n'
        '[tool.flwr.app]\npublisher = "fedpeft"\n\n'
        '[tool.flwr.app.components]\nserverapp = "fedpeft.app.server:app"\nclientapp = "clients.app:app"\n\n'
        f"[tool.flwr.app.config]\n{keys}\n"
    )
    return app_dir


def _attach_cluster(cfg: Config, rundir: RunDir, run_config: dict):
    """On a Ray cluster: ship the task through the object store and record placement (see fedpeft.app.engine.cluster)."""
    if not cfg.sim.ray_address:
        return None
    from fedpeft.app.engine.cluster import SERVICE_KEY, ClusterRun

    cluster = ClusterRun(rundir.task_dir)
    cluster.start_placement(rundir.path)
    run_config[SERVICE_KEY] = cluster.config_value
    return cluster


def simulate(
    cfg: Config,
    on_round: RoundCallback | None = None,
    verbose: bool = False,
    on_start: Callable[[Path], None] | None = None,
    resume: Path | None = None,
) -> dict[str, Any]:
    """Run one federated simulation end to end and return its summary.

    With `resume` (a run directory whose run was killed or interrupted), go on from its last
    completed round with its own config (`cfg` must be that config: `resume_config`), exactly
    as if it had never stopped.

    `on_start` is called with the run directory as soon as it exists. From then on, Flower's and
    Ray's log lines go to `<run dir>/run.log` (and, unless `verbose`, nowhere else), and a run that
    stops on an error or Ctrl-C is recorded as failed / interrupted in `status.json`, with the
    traceback in run.log.
    """
    set_offline_env()
    check_installed(cfg.output.trackers)  # a missing tracker library stops the run before anything starts
    import ray  # before run_log: importing Ray installs its console handler, which run_log then holds back

    # Ray and its client workers start first: the workers import torch, transformers and peft while
    # the driver prepares the task (on few cores that import was most of the first round).
    own_ray, local = not ray.is_initialized(), not cfg.sim.ray_address
    spec = WarmupSpec() if own_ray and local else None
    boot_log, actors = start_ray(cfg, verbose, spec) if own_ray else (None, [])
    try:
        rundir, task = _reopen(resume) if resume is not None else _prepare_run(cfg)
        if boot_log is not None:
            carry_log(boot_log, rundir.log_file)
        if spec is not None:
            spec.write(cfg.to_json(), str(rundir.task_dir.resolve()), task.num_labels)
        if on_start:
            on_start(rundir.path)
        os.environ.setdefault("FLWR_HOME", str(rundir.path / ".flwr"))
        with run_log(rundir.log_file, verbose):
            try:
                _run(cfg, rundir, on_round, verbose, resume, actors)
            except KeyboardInterrupt:
                rundir.write_status("interrupted")
                raise
            except BaseException as err:
                _record_failure(rundir, err)
                raise
            finally:
                if own_ray:  # inside run_log, so Ray's last lines go to run.log; on a cluster it only disconnects
                    stop_ray(local)
    finally:
        if own_ray:  # still up if the task could not be prepared: Ray stops before the error is reported
            stop_ray(local)
        if spec is not None:
            spec.remove()
        if boot_log is not None:
            shutil.rmtree(boot_log.parent, ignore_errors=True)
    return rundir.summary()


def _run(cfg: Config, rundir: RunDir, on_round: RoundCallback | None, verbose: bool, resume: Path | None,
         actors: list) -> None:
    """Run the engine over a prepared run directory (Ray is up; `actors` are client actors started early)."""
    from clients.app import app as client_app

    run_config = {CONFIG_KEY: cfg.to_json(), TASK_KEY: str(rundir.task_dir.resolve()), RUN_DIR_KEY: str(rundir.path)}
    if resume is not None:
        run_config[RESUME_KEY] = "1"
    cluster = _attach_cluster(cfg, rundir, run_config)
    with fast_dispatch():  # one scan of pending messages per tick, not one per node (fedpeft.app.engine.dispatch)
        _run_engine(cfg, run_config, client_app, cluster.wrap(on_round) if cluster else on_round, verbose, actors)


def _prepare_run(cfg: Config):
    """A fresh run directory with the prepared task in it."""
    # Prepare data before the run directory exists: a missing file or a bad column fails here
    # and leaves nothing half-made behind.
    staging = Path(tempfile.mkdtemp(prefix="fedpeft-task-"))
    try:
        task = prepare(cfg, staging)
        check_task(cfg, [len(p) for p in task.partitions])  # δ and target ε fail before any run dir exists
        rundir = RunDir.create(cfg)
        try:
            shutil.move(str(staging), str(rundir.task_dir))
        except BaseException as err:
            _record_failure(rundir, err)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return rundir, task


def resume_config(run_dir: Path) -> Config:
    """The config a run directory was started with (its config.toml); ResumeError if it cannot be resumed."""
    from fedpeft.app.recipe import load

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ResumeError(f"{run_dir} is not a fedpeft run directory (no config.toml)")
    return load(run_dir / "config.toml")


def _reopen(run_dir: Path):
    """The run directory and prepared task of a run to resume; ResumeError if it cannot be resumed."""
    from fedpeft.data import open_prepared
    from fedpeft.rundir import read_status

    rundir = RunDir(Path(run_dir))
    status = read_status(rundir.path)
    if status["status"] == "completed":
        raise ResumeError(f"{rundir.path} completed: there is nothing to resume")
    if status["status"] == "running":
        raise ResumeError(f"{rundir.path} is still running (process {status.get('pid')}): stop it first")
    read_checkpoint(rundir.path)  # fails with the reason before anything starts
    if not (rundir.task_dir / "task.json").is_file():
        raise ResumeError(f"{rundir.path} has lost its prepared task ({rundir.task_dir}); start the run again")
    task = open_prepared(str(rundir.task_dir))
    rundir.write_status("running", pid=os.getpid(), host=socket.gethostname(), resumed=True)
    return rundir, task


def _record_failure(rundir: RunDir, err: BaseException) -> None:
    """Mark the run failed in status.json and append the traceback to run.log."""
    from fedpeft.config import ConfigError
    from fedpeft.data import DataError
    from fedpeft.models import ModelLoadError

    expected = isinstance(err, (ConfigError, DataError, ModelLoadError))
    try:
        write_traceback(rundir.log_file, err, header=f"run failed: {error_text(err)}")
        rundir.mark_failed(error_text(err), origin(err), expected=expected)
    except OSError:  # the run directory itself is gone or unwritable: the caller still reports err
        pass


def register_nodes(num_nodes: int, state_factory, seed: int) -> dict[int, int]:
    """Register the virtual SuperNodes under ids drawn from the run seed; node id → partition id.

    Flower draws node ids at random, and they sit in every message's metadata, so two runs with
    the same seed differed in their charged bytes (a varint's width) and in comm.csv. Seeded ids
    of one fixed width make the same config and seed give byte-identical messages.
    """
    ids = iter([fixed_width_id(seed, "node-id", i) for i in range(num_nodes)])
    # Flower's create_node (1.41, 1.42) draws the id through this module global; only node ids are drawn meanwhile.
    with flower.replaced("generate_rand_int_from_bytes", lambda num_bytes, exclude=None: next(ids)):
        mapping = flower.get("register_nodes")(num_nodes=num_nodes, state_factory=state_factory)
    if len(mapping) != num_nodes or 0 in mapping:
        raise RuntimeError(f"registered {len(mapping)} of {num_nodes} virtual nodes (an id collided)")
    return mapping


def _run_engine(cfg: Config, run_config: dict, client_app, on_round: RoundCallback | None, verbose: bool,
                actors: list) -> None:
    # Flower's engine pieces, as flwr.simulation.run_simulation assembles them (fedpeft.app.engine.flower).
    from flwr.app import Context, RecordDict

    if found := flower.problems("engine", version=False) + flower.problems("node-ids", version=False):
        raise flower.FlowerChanged("Flower's simulation engine changed: " + "; ".join(found))
    if flwr_version := flower.problems("engine")[:1]:
        logging.getLogger("fedpeft.app.engine.flower").warning("%s", flwr_version[0])
    g = flower.get
    update_console_handler, Run, TaskIdentity, Task = (g("update_console_handler"), g("Run"), g("TaskIdentity"),
                                                       g("Task"))
    NOOP_FEDERATION_ID, SUPERLINK_NODE_ID = g("NOOP_FEDERATION_ID"), g("SUPERLINK_NODE_ID")

    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        update_console_handler(level=logging.DEBUG, timestamps=True, colored=True)

    state_factory = g("LinkStateFactory")(g("FLWR_IN_MEMORY_DB_NAME"), g("NoOpFederationManager")(),
                                         g("ObjectStoreFactory")())
    # Seeded ids (Flower draws them at random): they sit in every message's metadata.
    run = Run.create_empty(run_id=fixed_width_id(cfg.sim.seed, "run-id"))
    run.primary_task_id = fixed_width_id(cfg.sim.seed, "task-id")
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(run_config)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    state = state_factory.state()
    state.run_ids[run.run_id] = g("RunRecord")(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)

    # Register the virtual SuperNodes first: their partition ids become fedpeft client ids.
    mapping = register_nodes(cfg.sim.num_clients, state_factory, cfg.sim.seed)
    directory = NodeDirectory(mapping)
    grid = g("InMemoryGrid")(state_factory=state_factory)
    grid.set_run(run)

    app_dir = _write_app_descriptor(Path(run_config[RUN_DIR_KEY]), run_config)
    server_ctx = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    f_stop, stop = threading.Event(), threading.Event()
    errors: Queue[BaseException] = Queue()
    server_th = g("run_serverapp_th")(
        server_app_attr=None,
        server_app=make_server_app(directory, on_round, stop),
        server_app_context=server_ctx,
        grid=grid,
        app_dir="",
        f_stop=f_stop,
        exception_queue=errors,
        enable_tf_gpu_growth=False,
        ctx_queue=Queue(),
    )
    backend_config = {
        "client_resources": client_resources(cfg),
        "init_args": {},
        "actor": {"tensorflow": 0},
    }
    # Ctrl-C asks the round loop and the engine to stop, lets in-flight clients finish, shuts
    # Ray down, then raises KeyboardInterrupt; a second Ctrl-C interrupts at once.
    interrupted = threading.Event()

    def on_sigint(signum, frame) -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()
        stop.set()
        f_stop.set()

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    try:
        with worker_recovery(cfg.sim.client_retries, actors):  # a dead Ray worker is replaced (fedpeft.app.engine.workers)
            g("start_vce")(
                backend_name="ray",
                backend_config_json_stream=json.dumps(backend_config),
                app_dir=str(app_dir),
                is_app=True,
                f_stop=f_stop,
                run=run,
                metrics=g("VceMetrics")(),
                client_app=client_app,
                state_factory=state_factory,
                existing_nodes_mapping=mapping,
            )
    finally:
        stop.set()
        f_stop.set()
        server_th.join()
        if in_main:
            signal.signal(signal.SIGINT, previous)
    if interrupted.is_set():
        raise KeyboardInterrupt
    try:
        raise errors.get_nowait()
    except Empty:
        pass


"""The fedpeft ServerApp: set a run up, then each round's phases (`phases.ServerRound`), then the summary.

A round: sample and send → collect and screen → aggregate → record → checkpoint. The strategy
interface the round relies on is `protocol.RoundStrategy`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedpeft.app.runconfig import (
    DEFAULT_NODE_WAIT_S, NODE_WAIT_KEY, RESUME_KEY, RUN_DIR_KEY, config_from, shared_dir, task_from,
)
from fedpeft.app.server.phases import Sent, ServerRound
from fedpeft.app.server.resume import Checkpoint, read_checkpoint, truncate_logs
from fedpeft.app.server.secure import SecureRounds
from fedpeft.app.server.summary import run_summary, score_summary
from fedpeft.config import Config, ConfigError
from fedpeft.env import quiet_libraries
from fedpeft.evaluation import Evaluator
from fedpeft.faults.server_side import ServerFaults
from fedpeft.ledger import CommLedger, LedgerGrid
from fedpeft.models import build_model, device_for
from fedpeft.nodes import NodeDirectory, discover
from fedpeft.privacy.distributed import is_distributed
from fedpeft.privacy.ledger import PrivacyLedger
from fedpeft.privacy.sample_level import check_task
from fedpeft.privacy.user_level import with_user_dp
from fedpeft.round_outcome import FailurePolicy, describe_failed_rounds
from fedpeft.rundir import RunDir
from fedpeft.state import store_for
from fedpeft.tracking.session import Tracking
from strategies import get_strategy_class

RoundCallback = Callable[[dict[str, Any]], None]


def run_server(
    grid: Grid,
    context: Context,
    directory: NodeDirectory | None = None,
    on_round: RoundCallback | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Run every round of the configured method and return the run summary."""
    quiet_libraries()
    rc = context.run_config
    cfg = config_from(rc)
    rundir = RunDir(Path(str(rc[RUN_DIR_KEY]))) if rc.get(RUN_DIR_KEY) else RunDir.create(cfg)
    task = task_from(rc, cfg)
    check_task(cfg, [len(p) for p in task.partitions])
    # A fresh model per run, not the per-process cache: the server loads each round's global
    # state into it, so a cached one would hand the last run's final adapter (or, for FedKSeed
    # scope=full, its base weights) to the next in-process run as its "initial" state.
    model = build_model(cfg, task.num_labels).to(device_for(cfg))
    t_start = time.perf_counter()
    workdir = shared_dir(rc, context.run_id)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = _resume_point(rundir, workdir, context.run_id) if str(rc.get(RESUME_KEY, "")) == "1" else None

    holder = {"dir": directory}
    ledger = CommLedger(rundir.comm_csv, client_of=lambda n: holder["dir"].client_of(n) if holder["dir"] else -1,
                        resume=ckpt is not None)
    lgrid = LedgerGrid(grid, ledger, stop, max_reply_mib=cfg.sim.max_reply_mib)
    simulated = directory is not None  # the driver's virtual nodes train on this task's partitions
    if directory is None:
        # Under `flwr run`: wait (up to `node-wait-s`) for as many nodes as the recipe has clients.
        wait_s = float(rc.get(NODE_WAIT_KEY, DEFAULT_NODE_WAIT_S))
        holder["dir"] = directory = discover(lgrid, cfg.sim.round_timeout_s, cfg.sim.num_clients, wait_s)
        log(INFO, "run directory %s; %d nodes: clients %s", rundir.path, len(directory.node_to_client),
            sorted(directory.node_to_client.values()))
    strategy = get_strategy_class(cfg.method.name)(cfg, directory, model, workdir)
    if simulated:  # a reply claiming more examples than its client holds is forged
        strategy.example_limits = {cid: len(p) for cid, p in enumerate(task.partitions)}
    with_user_dp(strategy, cfg, simulated=str(rc.get(RUN_DIR_KEY, "") or "") != "")
    faults = ServerFaults(cfg, directory.client_of) if cfg.faults.active else None
    secure = _secure_rounds(cfg, strategy, lgrid, directory, faults)
    run = ServerRound(cfg, strategy, lgrid, directory, ledger, PrivacyLedger(rundir.privacy_csv),
                      Evaluator(cfg, task), rundir, model, simulated, faults, secure, t_start)
    policy = FailurePolicy(cfg.sim.max_failed_rounds)
    strategy.summary()
    if secure is not None:
        secure.summary()
    arrays = strategy.initial_arrays()

    if ckpt is not None:
        arrays = ckpt.arrays
        strategy.load_server_state(ckpt.strategy)
        rows = rundir.metrics()
        policy.failed = sum(1 for r in rows if "round_failed" in r)
        log(INFO, "resuming after round %d (%s)", ckpt.round, rundir.path)
    else:
        row0 = {"round": 0, **run.evaluate(0, arrays), **run.round_bytes(0), "clients": 0, "rejected": 0,
                "round_s": 0.0, "elapsed_s": time.perf_counter() - t_start}
        ledger.flush()
        rundir.append_metrics(row0)
        run.checkpoint(0, arrays)
        if on_round:
            on_round(row0)
        rows = [row0]
    stopped = None
    # output.trackers: fed the rounds recorded so far, then each round; closed however the run ends
    with Tracking.open(cfg, rundir, resumed=ckpt is not None) as tracking:
        for rnd in range(rows[-1]["round"] + 1, cfg.sim.rounds + 1):
            t0 = time.perf_counter()
            sent = run.sample_and_send(rnd, arrays)
            if not isinstance(sent, Sent):  # the communication budget would be exceeded
                stopped = sent
                break
            agg = run.aggregate(rnd, run.collect_and_screen(rnd, sent), arrays)
            arrays = agg.arrays
            row = run.record(rnd, sent, agg, t0)
            rows.append(row)
            run.checkpoint(rnd, arrays)
            tracking.log(row)
            if on_round:
                on_round(row)
            if (stopped := policy.record(rnd, "round_failed" in row)) is not None:
                log(WARNING, "%s", describe_failed_rounds(stopped.record()))
                break

        if stopped is not None:
            rundir.append_metrics(stopped.event())
        strategy.export(model, rundir)
        summary = run_summary(cfg, rows, ledger, model, time.perf_counter() - t_start, rundir)
        summary.update(score_summary(run.evaluator.primary, rows))
        summary["label_names"] = list(task.label_names)
        summary.update(run.privacy.summary())
        summary.update(strategy.run_report(ledger, rows))
        if faults is not None:
            summary["injected_faults"] = dict(sum((Counter(r.get("faults", {})) for r in rows), Counter()))
        if stopped is not None:
            summary["stopped"] = stopped.record()
        rundir.write_summary(summary)
    return summary


def _secure_rounds(cfg: Config, strategy: Any, grid: LedgerGrid, directory: NodeDirectory,
                   faults: ServerFaults | None) -> SecureRounds | None:
    """The secure-aggregation driver when `secagg.enabled`, with the public largest weight a client may send."""
    if not cfg.secagg.enabled:
        return None
    if is_distributed(cfg):  # distributed DP: every clipped update counts alike, weight 1
        return SecureRounds(cfg, strategy, grid, directory, faults, 1.0)
    largest = max(strategy.example_limits.values()) if strategy.example_limits else None
    if cfg.secagg.max_weight is not None:
        if largest is not None and largest > cfg.secagg.max_weight:
            raise ConfigError(f"secagg.max_weight = {cfg.secagg.max_weight} is below the largest partition "
                              f"({largest} examples): that client's upload would be refused; raise it or unset it")
        return SecureRounds(cfg, strategy, grid, directory, faults, cfg.secagg.max_weight)
    if largest is None:
        # a weight above the public maximum is refused, so the maximum must be known to every party
        raise ConfigError("secagg.enabled = true on SuperNodes needs secagg.max_weight: the server does not know "
                          "the clients' example counts, and the public bound on a client's weight must be set")
    return SecureRounds(cfg, strategy, grid, directory, faults, largest)


def _resume_point(rundir: RunDir, workdir: Path, run_id: int) -> Checkpoint:
    """The checkpoint to resume from, with the logs cut back to it and the client state rolled back to its round."""
    ckpt = read_checkpoint(rundir.path)
    truncate_logs(rundir.path, ckpt.log_sizes)
    undone = store_for(str(workdir), run_id).rollback(ckpt.round)
    log(INFO, "resume: logs cut back to round %d; %d client state files written later rolled back", ckpt.round, undone)
    return ckpt


def make_server_app(
    directory: NodeDirectory | None = None, on_round: RoundCallback | None = None, stop: threading.Event | None = None
) -> ServerApp:
    """A ServerApp running fedpeft; the simulation driver passes its node directory, a progress hook and a stop event."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context, directory, on_round, stop)

    return app


app = make_server_app()

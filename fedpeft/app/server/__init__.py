"""The fedpeft ServerApp: rounds of configure → send → validate/aggregate → evaluate → checkpoint."""

from __future__ import annotations

import threading
from collections import Counter
import time
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedpeft.budget import check_round
from fedpeft.config import Config
from fedpeft.env import quiet_libraries
from fedpeft.privacy.sample_level import check_task
from fedpeft.evaluation import Evaluator
from fedpeft.faults.server_side import ServerFaults
from fedpeft.ledger import CommLedger, LedgerGrid, message_bytes
from fedpeft.models import build_model, device_for
from fedpeft.nodes import NodeDirectory, discover, rediscover
from fedpeft.privacy.ledger import PrivacyLedger, epsilon_stats
from fedpeft.records import TRAIN_SECONDS
from fedpeft.app.runconfig import (
    DEFAULT_NODE_WAIT_S, NODE_WAIT_KEY, RESUME_KEY, RUN_DIR_KEY, config_from, shared_dir, task_from,
)
from fedpeft.app.server.resume import Checkpoint, log_sizes, read_checkpoint, truncate_logs, write_checkpoint
from fedpeft.round_outcome import FailurePolicy, describe_failed_rounds, failures
from fedpeft.rundir import RunDir
from fedpeft.state import store_for
from fedpeft.privacy.user_level import with_user_dp
from fedpeft.app.engine.workers import round_counts
from strategies import get_strategy_class

RoundCallback = Callable[[dict[str, Any]], None]


def full_model_message_bytes(model) -> int:
    """Bytes of a FedAvg message carrying every base-model weight (the full-model reference)."""
    # The frozen parameters are exactly the original model's weights (adapters and the
    # trainable head copy are the only trainable ones).
    arrays = {n: p.detach().cpu() for n, p in model.named_parameters() if not p.requires_grad}
    msg = Message(
        RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    return message_bytes(msg)


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
    privacy = PrivacyLedger(rundir.privacy_csv)
    lgrid = LedgerGrid(grid, ledger, stop, max_reply_mb=cfg.sim.max_reply_mb)
    simulated = directory is not None  # the driver's virtual nodes train on this task's partitions
    if directory is None:
        # Under `flwr run`: wait (up to `node-wait-s`) for as many nodes as the recipe has clients.
        wait_s = float(rc.get(NODE_WAIT_KEY, DEFAULT_NODE_WAIT_S))
        holder["dir"] = directory = discover(lgrid, cfg.sim.round_timeout_s, cfg.sim.num_clients, wait_s)
        log(INFO, "run directory %s; %d nodes: clients %s", rundir.path, len(directory.node_to_client),
            sorted(directory.node_to_client.values()))
    method = get_strategy_class(cfg.method.name)(cfg, directory, model, workdir)
    if simulated:  # a reply claiming more examples than its client holds is forged
        method.example_limits = {cid: len(p) for cid, p in enumerate(task.partitions)}
    strategy = with_user_dp(method, cfg, simulated=str(rc.get(RUN_DIR_KEY, "") or "") != "")
    faults = ServerFaults(cfg, directory.client_of) if cfg.faults.active else None
    policy = FailurePolicy(cfg.sim.max_failed_rounds)
    strategy.summary()
    arrays = strategy.initial_arrays()

    evaluator = Evaluator(cfg, task)

    def eval_now(rnd: int) -> dict[str, float]:
        strategy.load_global(model, arrays)
        out = evaluator(model, rnd)
        if "generate_s" in out:
            rundir.write_generations(rnd, evaluator.samples)
        return out

    def save_point(rnd: int) -> None:  # after every round, so a killed run resumes from here
        write_checkpoint(rundir.path, Checkpoint(rnd, arrays, strategy.state_dict(), log_sizes(rundir.path)))

    if ckpt is not None:
        arrays = ckpt.arrays
        strategy.load_state_dict(ckpt.strategy)
        rows = rundir.metrics()
        policy.failed = sum(1 for r in rows if "round_failed" in r)
        log(INFO, "resuming after round %d (%s)", ckpt.round, rundir.path)
    else:
        row0 = {"round": 0, **eval_now(0), **_bytes(ledger, 0), "clients": 0, "rejected": 0,
                "round_s": 0.0, "elapsed_s": time.perf_counter() - t_start}
        ledger.flush()
        rundir.append_metrics(row0)
        save_point(0)
        if on_round:
            on_round(row0)
        rows = [row0]
    stopped = None
    for rnd in range(rows[-1]["round"] + 1, cfg.sim.rounds + 1):
        t0 = time.perf_counter()
        ledger.round = rnd
        if not simulated:  # a SuperNode that joined or came back since: ask its client id (charged to this round)
            rediscover(lgrid, directory, cfg.sim.round_timeout_s)
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), lgrid))
        if (stopped := check_round(cfg.sim.comm_budget_mb, rnd, ledger, msgs)) is not None:
            break
        replies = lgrid.send_and_receive(msgs, timeout=cfg.sim.round_timeout_s)
        sampled = [directory.client_of(m.metadata.dst_node_id) for m in msgs]
        lost = [(directory.client_of(r.node_id), f"refused: {r.reason}") for r in lgrid.refused]
        lost += [(directory.client_of(n), f"timed out: no reply within sim.round_timeout_s = "
                  f"{cfg.sim.round_timeout_s:g} s") for n in lgrid.timed_out]
        if faults is not None:
            replies, dropped = faults.on_replies(rnd, replies, strategy.reference)
            lost += [(c, "reply lost in transit (injected drop)") for c in dropped]
        new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        if new_arrays is not None:
            arrays = new_arrays
        injected = faults.injected if faults is not None else None
        invalid = [(r.client_id, r.reason) for r in strategy.pop_rejections()]
        rejected = failures(rnd, invalid + lost, injected)
        failure = getattr(strategy, "failure", None)
        row = {"round": rnd, **eval_now(rnd), **_bytes(ledger, rnd), "clients": len(replies), "rejected": len(rejected),
               "sampled": len(sampled), "accepted": 0 if failure else len(replies) - len(invalid),
               **round_counts()}  # workers_replaced, client_retries under the simulation engine
        if failure:
            row["round_failed"] = failure
        if faults is not None:
            row["faults"] = faults.counts(rnd, sampled)
        client_metrics = strategy.pop_client_metrics()
        row.update(epsilon_stats(privacy.record(rnd, client_metrics)))
        seconds = [float(m[TRAIN_SECONDS]) for _, m in client_metrics if TRAIN_SECONDS in m]
        if seconds:
            row["client_train_s"] = sum(seconds) / len(seconds)  # mean wall seconds of local training
        if cfg.dp.user.enabled:
            row.update(strategy.privacy())
            privacy.record_user(rnd, row)
        if train_metrics is not None and "train-loss" in train_metrics:
            row["train_loss"] = float(train_metrics["train-loss"])
        row.update(strategy.round_metrics(rnd, ledger))
        if rejected:
            row["rejections"] = rejected
        row["round_s"] = time.perf_counter() - t0
        row["elapsed_s"] = time.perf_counter() - t_start
        ledger.flush()
        rundir.append_metrics(row)
        rows.append(row)
        save_point(rnd)
        every = cfg.output.checkpoint_every
        if every and rnd % every == 0 and rnd != cfg.sim.rounds:
            rundir.checkpoint(model, rnd)
        if on_round:
            on_round(row)
        if (stopped := policy.record(rnd, bool(failure))) is not None:
            log(WARNING, "%s", describe_failed_rounds(stopped.record()))
            break
        log(INFO, "round %d: %s %s, loss %.4f, %d B down, %d B up", rnd, evaluator.primary,
            f"{row[evaluator.primary]:.4f}" if evaluator.primary in row else "-", row["loss"], row["bytes_down"], row["bytes_up"])

    if stopped is not None:
        rundir.append_metrics(stopped.event())
    strategy.export(model, rundir)
    summary = _summary(cfg, rows, ledger, model, time.perf_counter() - t_start, rundir)
    summary.update(_score_summary(evaluator.primary, rows))
    summary["label_names"] = list(task.label_names)
    summary.update(privacy.summary())
    summary.update(strategy.run_metrics(ledger, rows))
    if faults is not None:
        summary["injected_faults"] = dict(sum((Counter(r.get("faults", {})) for r in rows), Counter()))
    if cfg.dp.user.enabled:
        summary.update(strategy.privacy())
    if stopped is not None:
        summary["stopped"] = stopped.record()
    rundir.write_summary(summary)
    return summary


def _resume_point(rundir: RunDir, workdir: Path, run_id: int) -> Checkpoint:
    """The checkpoint to resume from, with the logs cut back to it and the client state rolled back to its round."""
    ckpt = read_checkpoint(rundir.path)
    truncate_logs(rundir.path, ckpt.log_sizes)
    undone = store_for(str(workdir), run_id).rollback(ckpt.round)
    log(INFO, "resume: logs cut back to round %d; %d client state files written later rolled back", ckpt.round, undone)
    return ckpt


def _bytes(ledger: CommLedger, rnd: int) -> dict[str, int]:
    t = ledger.totals(rnd)
    return {"bytes_down": t["down"], "bytes_up": t["up"]}


def _summary(cfg: Config, rows: list[dict], ledger: CommLedger, model, wall_s: float, rundir: RunDir) -> dict[str, Any]:
    totals = ledger.totals()
    per_client = [c["down"] + c["up"] for cid, c in ledger.per_client().items() if cid >= 0]
    participations = sum(r["clients"] for r in rows)
    full = full_model_message_bytes(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    return {
        "name": cfg.name,
        "run_dir": str(rundir.path),
        "method": cfg.method.name,
        "adapter": cfg.adapter.type,
        "rounds": cfg.sim.rounds,
        "rounds_completed": rows[-1]["round"],
        "num_clients": cfg.sim.num_clients,
        "clients_per_round": cfg.sim.clients_per_round,
        "final_loss": rows[-1]["loss"],
        "bytes_down": totals["down"],
        "bytes_up": totals["up"],
        "bytes_total": totals["down"] + totals["up"],
        "participations": participations,
        "rejected": sum(r["rejected"] for r in rows),
        "failed_rounds": sum(1 for r in rows if "round_failed" in r),
        "bytes_per_client_max": max(per_client, default=0),
        "bytes_per_client_mean": sum(per_client) / len(per_client) if per_client else 0.0,
        "trainable_params": trainable,
        "total_params": total_params,
        "full_model_message_bytes": full,
        "full_model_fedavg_bytes": 2 * full * participations,
        "wall_s": wall_s,
    }


def _score_summary(primary: str, rows: list[dict]) -> dict[str, Any]:
    """Round 0, final and best of the primary metric (over the rounds that measured it), and causal-LM extras."""
    scored = [r for r in rows if primary in r]
    out: dict[str, Any] = {"primary_metric": primary}
    if scored:
        out.update({f"initial_{primary}": scored[0][primary], f"final_{primary}": scored[-1][primary],
                    f"best_{primary}": max(r[primary] for r in scored)})
    if "perplexity" in rows[-1]:
        out["final_perplexity"] = rows[-1]["perplexity"]
    if scored and "exact_match" in scored[-1]:
        out["final_exact_match"] = scored[-1]["exact_match"]
        out["best_exact_match"] = max(r["exact_match"] for r in scored)
        trained = rows[1:]
        round_s = sum(r["round_s"] for r in trained)
        out["generation_share"] = sum(r.get("generate_s", 0.0) for r in trained) / round_s if round_s else 0.0
    return out


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

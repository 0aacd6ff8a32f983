"""One server round in named phases: sample and send, collect and screen, aggregate, record, checkpoint.

`ServerRound` holds what a run's rounds share (the strategy, the ledgers, the evaluator, the run
directory); `run_server` (`fedpeft.app.server`) calls its phases in order, once per round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.supercore import log

from fedpeft.app.engine.workers import round_counts
from fedpeft.app.server.protocol import RoundStrategy
from fedpeft.app.server.resume import Checkpoint, log_sizes, write_checkpoint
from fedpeft.app.server.secure import SecureOutcome, SecureRounds
from fedpeft.budget import BudgetStop, check_round
from fedpeft.config import Config
from fedpeft.evaluation import Evaluator
from fedpeft.faults.server_side import ServerFaults
from fedpeft.ledger import CommLedger, LedgerGrid
from fedpeft.nodes import NodeDirectory, rediscover
from fedpeft.privacy.ledger import PrivacyLedger, epsilon_stats
from fedpeft.records import TRAIN_SECONDS
from fedpeft.round_outcome import failures
from fedpeft.rundir import RunDir


@dataclass
class Sent:
    """What the sample-and-send phase produced: the messages and the replies that came back."""

    messages: list[Message]
    replies: list[Message]
    sampled: list[int]  # client ids of the sampled nodes
    lost: list[tuple[int, str]] = field(default_factory=list)  # (client id, why no usable reply arrived)
    secure: SecureOutcome | None = None  # the round ran secure aggregation: its outcome (replies: masked uploads)


@dataclass
class Aggregated:
    """What the aggregate phase produced."""

    arrays: ArrayRecord  # the global adapter after the round (unchanged when nothing was accepted)
    metrics: MetricRecord | None
    rejected: list[dict[str, Any]]  # every client without a usable reply, with why
    invalid: int  # replies that arrived but failed validation


@dataclass
class ServerRound:
    """A run's rounds: the strategy, grid, ledgers, evaluator and run directory every phase uses."""

    cfg: Config
    strategy: RoundStrategy
    grid: LedgerGrid
    directory: NodeDirectory
    ledger: CommLedger
    privacy: PrivacyLedger
    evaluator: Evaluator
    rundir: RunDir
    model: Any
    simulated: bool
    faults: ServerFaults | None = None
    secure: SecureRounds | None = None  # `[secagg]`: the round's exchange is SecAgg+'s four stages
    t_start: float = field(default_factory=time.perf_counter)

    def evaluate(self, rnd: int, arrays: ArrayRecord) -> dict[str, float]:
        """The global model's scores on the held-out set (generations written where the task generates)."""
        self.strategy.load_global(self.model, arrays)
        out = self.evaluator(self.model, rnd)
        if "generate_s" in out:
            self.rundir.write_generations(rnd, self.evaluator.samples)
        return out

    def round_bytes(self, rnd: int) -> dict[str, int]:
        """The ledger's bytes of round `rnd`, both directions."""
        t = self.ledger.totals(rnd)
        return {"bytes_down": t["down"], "bytes_up": t["up"]}

    # ----- the phases ---------------------------------------------------------------------------
    def sample_and_send(self, rnd: int, arrays: ArrayRecord) -> Sent | BudgetStop:
        """Sample the round's clients, send each its message and wait for the replies (or stop on the budget)."""
        self.ledger.round = rnd
        if not self.simulated:  # a SuperNode that joined or came back since: ask its client id (charged to this round)
            rediscover(self.grid, self.directory, self.cfg.sim.round_timeout_s)
        msgs = list(self.strategy.configure_train(rnd, arrays, ConfigRecord(), self.grid))
        if (stopped := check_round(self.cfg.sim.comm_budget_mib, rnd, self.ledger, msgs)) is not None:
            return stopped
        sampled = [self.directory.client_of(m.metadata.dst_node_id) for m in msgs]
        if self.secure is not None:  # each stage screened as it came back: collect_and_screen has nothing to add
            outcome = self.secure.run(rnd, msgs)
            return Sent(msgs, outcome.replies, sampled, list(outcome.lost), outcome)
        replies = self.grid.send_and_receive(msgs, timeout=self.cfg.sim.round_timeout_s)
        return Sent(msgs, list(replies), sampled)

    def collect_and_screen(self, rnd: int, sent: Sent) -> Sent:
        """Name the clients refused or timed out by the grid, and apply injected transit faults."""
        if sent.secure is not None:
            return sent
        client_of, timeout = self.directory.client_of, self.cfg.sim.round_timeout_s
        sent.lost = [(client_of(r.node_id), f"refused: {r.reason}") for r in self.grid.refused]
        sent.lost += [(client_of(n), f"timed out: no reply within sim.round_timeout_s = {timeout:g} s")
                      for n in self.grid.timed_out]
        if self.faults is not None:
            sent.replies, dropped = self.faults.on_replies(rnd, sent.replies, self.strategy.reference)
            sent.lost += [(c, "reply lost in transit (injected drop)") for c in dropped]
        return sent

    def aggregate(self, rnd: int, sent: Sent, arrays: ArrayRecord) -> Aggregated:
        """The strategy validates and aggregates the replies; every client without a usable reply, with why."""
        injected = self.faults.injected if self.faults is not None else None
        if sent.secure is not None:  # the strategy gets the decoded mean update, never a client's own
            new = self.strategy.aggregate_secure(rnd, sent.secure.mean, len(sent.secure.survivors),
                                                 sent.secure.failure)
            rejected = failures(rnd, sent.secure.invalid + sent.lost, injected)
            return Aggregated(new if new is not None else arrays, None, rejected, 0)
        new_arrays, metrics = self.strategy.aggregate_train(rnd, sent.replies)
        invalid = [(r.client_id, r.reason) for r in self.strategy.pop_rejections()]
        rejected = failures(rnd, invalid + sent.lost, injected)
        return Aggregated(new_arrays if new_arrays is not None else arrays, metrics, rejected, len(invalid))

    def record(self, rnd: int, sent: Sent, agg: Aggregated, t0: float) -> dict[str, Any]:
        """The round's metrics row (scores, bytes, participation, ε, the strategy's report), written to the run."""
        failure = self.strategy.failure
        row = {"round": rnd, **self.evaluate(rnd, agg.arrays), **self.round_bytes(rnd), "clients": len(sent.replies),
               "rejected": len(agg.rejected), "sampled": len(sent.sampled),
               "accepted": 0 if failure else len(sent.replies) - agg.invalid,
               **round_counts()}  # workers_replaced, client_retries under the simulation engine
        if failure:
            row["round_failed"] = failure
        if self.faults is not None:
            row["faults"] = self.faults.counts(rnd, sent.sampled)
        if sent.secure is not None:
            row.update(sent.secure.report)
        client_metrics = self.strategy.pop_client_metrics()
        row.update(epsilon_stats(self.privacy.record(rnd, client_metrics)))
        seconds = [float(m[TRAIN_SECONDS]) for _, m in client_metrics if TRAIN_SECONDS in m]
        if seconds:
            row["client_train_s"] = sum(seconds) / len(seconds)  # mean wall seconds of local training
        if agg.metrics is not None and "train-loss" in agg.metrics:
            row["train_loss"] = float(agg.metrics["train-loss"])
        row.update(self.strategy.report(rnd, self.ledger))
        if "user_epsilon" in row:
            self.privacy.record_user(rnd, row)
        if agg.rejected:
            row["rejections"] = agg.rejected
        row["round_s"] = time.perf_counter() - t0
        row["elapsed_s"] = time.perf_counter() - self.t_start
        self.ledger.flush()
        self.rundir.append_metrics(row)
        log(INFO, "round %d: %s %s, loss %.4f, %d B down, %d B up", rnd, self.evaluator.primary,
            f"{row[self.evaluator.primary]:.4f}" if self.evaluator.primary in row else "-", row["loss"],
            row["bytes_down"], row["bytes_up"])
        return row

    def checkpoint(self, rnd: int, arrays: ArrayRecord) -> None:
        """The resume point after round `rnd` (every round), and the periodic adapter checkpoint."""
        write_checkpoint(self.rundir.path, Checkpoint(rnd, arrays, self.strategy.server_state(),
                                                      log_sizes(self.rundir.path)))
        every = self.cfg.output.checkpoint_every
        if rnd and every and rnd % every == 0 and rnd != self.cfg.sim.rounds:
            self.rundir.checkpoint(self.model, rnd)

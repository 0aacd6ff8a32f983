"""Report numbers, computed from the ledger (comm.csv) and the per-round metrics (metrics.jsonl).

Byte figures come only from comm.csv, never from summary.json or the bytes_* keys of
metrics.jsonl: the ledger is the record of what crossed the wire, the rest are derived copies.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from fedpeft.budget import describe_stop
from fedpeft.ledger import ENVELOPE, MB
from fedpeft.report.load import Run

DASH = "—"
DEFAULT_TARGET = 0.9


@dataclass
class RoundStats:
    """One round: evaluation after it, and the bytes it moved according to the ledger."""

    round: int
    accuracy: float
    loss: float
    bytes_down: int
    bytes_up: int
    cum_bytes: int  # down + up of every ledger row with round <= this round
    clients: int
    train_loss: float | None = None
    epsilon_max: float | None = None
    epsilon_median: float | None = None


@dataclass
class ClientStats:
    """Bytes one client received and sent over the run."""

    client_id: int
    bytes_down: int
    bytes_up: int
    messages_down: int
    messages_up: int

    @property
    def bytes_total(self) -> int:
        """Down plus up."""
        return self.bytes_down + self.bytes_up


@dataclass
class RunStats:
    """Headline numbers and per-round/per-client tables of one run."""

    label: str
    path: str
    method: str
    adapter: str
    codecs: str | None
    bytes_down: int
    bytes_up: int
    messages_down: int
    messages_up: int
    participations: int
    initial_accuracy: float
    final_accuracy: float
    best_accuracy: float
    target_fraction: float
    target_accuracy: float
    target_round: int
    bytes_to_target: int
    full_model_message_bytes: int | None
    epsilon: float | None
    wall_s: float | None
    num_clients: int | None = None
    incomplete: str | None = None  # why the run did not complete (failed, interrupted, …)
    stopped: str | None = None  # why a completed run ended before its last round (the communication budget)
    rounds: list[RoundStats] = field(default_factory=list)
    clients: list[ClientStats] = field(default_factory=list)

    @property
    def bytes_total(self) -> int:
        """Every byte in the ledger, both directions."""
        return self.bytes_down + self.bytes_up

    @property
    def full_model_fedavg_bytes(self) -> int | None:
        """FedPara's reference cost: 2 × participations × full-model message bytes."""
        if self.full_model_message_bytes is None:
            return None
        return 2 * self.participations * self.full_model_message_bytes

    @property
    def full_model_ratio(self) -> float | None:
        """How many times more full-model FedAvg would have moved than this run did."""
        ref = self.full_model_fedavg_bytes
        if ref is None or self.bytes_total == 0:
            return None
        return ref / self.bytes_total

    @property
    def has_epsilon(self) -> bool:
        """Whether any round reports a privacy budget."""
        return any(r.epsilon_max is not None for r in self.rounds)


def run_stats(run: Run, target_fraction: float = DEFAULT_TARGET) -> RunStats:
    """Compute every report number of one run from its ledger and metrics."""
    if not 0 < target_fraction <= 1:
        raise ValueError(f"target fraction must be in (0, 1], got {target_fraction}")
    per_round: dict[int, dict[str, int]] = defaultdict(lambda: {"down": 0, "up": 0})
    per_client: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    totals = {"down": 0, "up": 0}
    messages = {"down": 0, "up": 0}
    participations = 0
    for rec in run.ledger:
        per_round[rec.round][rec.direction] += rec.bytes
        totals[rec.direction] += rec.bytes
        c = per_client[rec.client_id]
        c[rec.direction] += rec.bytes
        # Every message carries exactly one _envelope row, so these rows count messages.
        if rec.record == ENVELOPE:
            messages[rec.direction] += 1
            c[f"msg_{rec.direction}"] += 1
            # Round 0 holds only node discovery (under `flwr run`), not training replies.
            if rec.direction == "up" and rec.round >= 1:
                participations += 1

    rounds = _round_stats(run, per_round)
    initial, final = rounds[0].accuracy, rounds[-1].accuracy
    target = target_fraction * final
    # The last round always qualifies (fraction <= 1), so a first qualifying round exists.
    reached = next(r for r in rounds if r.accuracy >= target)
    clients = [
        ClientStats(cid, c["down"], c["up"], c["msg_down"], c["msg_up"])
        for cid, c in sorted(per_client.items()) if cid >= 0
    ]
    full = run.summary.get("full_model_message_bytes")
    eps = [r.epsilon_max for r in rounds if r.epsilon_max is not None]
    wall = run.summary.get("wall_s", run.metrics[-1].get("elapsed_s"))
    return RunStats(
        label=run.label, path=str(run.path), method=run.method, adapter=run.adapter,
        codecs=format_codecs(_configured(run.config.get("codecs"))),
        bytes_down=totals["down"], bytes_up=totals["up"],
        messages_down=messages["down"], messages_up=messages["up"], participations=participations,
        initial_accuracy=initial, final_accuracy=final, best_accuracy=max(r.accuracy for r in rounds),
        target_fraction=target_fraction, target_accuracy=target, target_round=reached.round,
        bytes_to_target=reached.cum_bytes,
        full_model_message_bytes=int(full) if isinstance(full, (int, float)) else None,
        epsilon=eps[-1] if eps else None,
        wall_s=float(wall) if isinstance(wall, (int, float)) else None,
        num_clients=_opt_int(run.config.get("sim", {}).get("num_clients", run.summary.get("num_clients"))),
        incomplete=run.incomplete, stopped=describe_stop(run.stopped) if run.stopped else None,
        rounds=rounds, clients=clients,
    )


def _round_stats(run: Run, per_round: dict[int, dict[str, int]]) -> list[RoundStats]:
    out = []
    for m in run.metrics:
        rnd = int(m["round"])
        cum = sum(b["down"] + b["up"] for r, b in per_round.items() if r <= rnd)
        out.append(RoundStats(
            round=rnd, accuracy=float(m["accuracy"]), loss=float(m["loss"]),
            bytes_down=per_round.get(rnd, {}).get("down", 0), bytes_up=per_round.get(rnd, {}).get("up", 0),
            cum_bytes=cum, clients=int(m.get("clients", 0) or 0),
            train_loss=_opt_float(m.get("train_loss")),
            epsilon_max=_opt_float(m.get("epsilon_max")), epsilon_median=_opt_float(m.get("epsilon_median")),
        ))
    return out


def _configured(codecs: Any) -> Any:
    # A resolved config.toml spells out every default (merge = "mean", …): show only what was set.
    if not isinstance(codecs, dict):
        return codecs
    from fedpeft.config import CodecsConfig

    defaults = CodecsConfig().model_dump()
    return {k: v for k, v in codecs.items() if k not in defaults or v != defaults[k]}


def format_codecs(codecs: Any) -> str | None:
    """A short text for a config's `codecs` section; None when there is none."""
    if not codecs:
        return None
    if isinstance(codecs, dict):
        parts = []
        for k, v in codecs.items():
            text = format_codecs(v)
            if text:
                parts.append(f"{k}={text}" if not isinstance(v, dict) else f"{k}({text})")
        return ", ".join(parts) or None
    if isinstance(codecs, (list, tuple)):
        return "+".join(str(c) for c in codecs) or None
    return str(codecs)


def sort_runs(stats: list[RunStats]) -> list[RunStats]:
    """Runs lined up by method, then adapter, then name."""
    return sorted(stats, key=lambda s: (s.method, s.adapter, s.label))


# ----- table rows (shared by the HTML, Markdown and CSV writers) ----------------------------
COMPARISON_COLUMNS = [
    "run", "method", "adapter", "codecs", "final_accuracy", "total_mb", "bytes_down", "bytes_up",
    "bytes_to_target", "target_round", "full_model_ratio", "epsilon", "wall_s",
]


def comparison_rows(stats: list[RunStats]) -> list[dict[str, Any]]:
    """One row per run with raw values (None where a figure does not apply)."""
    return [
        {
            "run": s.label, "method": s.method, "adapter": s.adapter, "codecs": s.codecs,
            "final_accuracy": s.final_accuracy, "total_mb": s.bytes_total / MB,
            "bytes_down": s.bytes_down, "bytes_up": s.bytes_up,
            "bytes_to_target": s.bytes_to_target, "target_round": s.target_round,
            "full_model_ratio": s.full_model_ratio, "epsilon": s.epsilon, "wall_s": s.wall_s,
        }
        for s in sort_runs(stats)
    ]


ROUND_COLUMNS = ["run", "round", "accuracy", "loss", "train_loss", "bytes_down", "bytes_up", "cum_bytes",
                 "clients", "epsilon_max", "epsilon_median"]
CLIENT_COLUMNS = ["run", "client_id", "bytes_down", "bytes_up", "bytes_total", "messages_down", "messages_up"]


def round_rows(stats: list[RunStats]) -> list[dict[str, Any]]:
    """One row per (run, round)."""
    return [
        {"run": s.label, "round": r.round, "accuracy": r.accuracy, "loss": r.loss, "train_loss": r.train_loss,
         "bytes_down": r.bytes_down, "bytes_up": r.bytes_up, "cum_bytes": r.cum_bytes, "clients": r.clients,
         "epsilon_max": r.epsilon_max, "epsilon_median": r.epsilon_median}
        for s in sort_runs(stats) for r in s.rounds
    ]


def client_rows(stats: list[RunStats]) -> list[dict[str, Any]]:
    """One row per (run, client)."""
    return [
        {"run": s.label, "client_id": c.client_id, "bytes_down": c.bytes_down, "bytes_up": c.bytes_up,
         "bytes_total": c.bytes_total, "messages_down": c.messages_down, "messages_up": c.messages_up}
        for s in sort_runs(stats) for c in s.clients
    ]


def fmt_bytes(n: int | None) -> str:
    """Bytes as MB with 3 decimals and the exact count, or a dash."""
    return DASH if n is None else f"{n / MB:,.3f} MB ({n:,} B)"


def fmt_mb(n: int | None) -> str:
    """Bytes as MB with 3 decimals, or a dash."""
    return DASH if n is None else f"{n / MB:,.3f}"


def fmt_num(v: float | None, digits: int = 4) -> str:
    """A float with fixed digits, or a dash when absent or NaN."""
    return DASH if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _opt_float(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _opt_int(v: Any) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None

"""Report numbers, computed from the ledger (comm.csv) and the per-round metrics (metrics.jsonl).

Byte figures come only from comm.csv, never from summary.json or the bytes_* keys of
metrics.jsonl: the ledger is the record of what crossed the wire, the rest are derived copies.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from fedpeft.round_outcome import describe_stop
from fedpeft.ledger import ENVELOPE, MIB, format_bytes
from fedpeft.report.load import Run
from fedpeft.report.samples import SamplePair, sample_pairs
from fedpeft.scores import EXACT_MATCH, metric_label

DASH = "—"
# causal-lm: multiple-choice accuracy by choice log-likelihood, plain and length-normalized (fedpeft.multiple_choice)
MC_ACCURACY, MC_ACCURACY_NORM = "mc_accuracy", "mc_accuracy_norm"
DEFAULT_TARGET = 0.9


@dataclass
class RoundStats:
    """One round: evaluation after it, and the bytes it moved according to the ledger."""

    round: int
    score: float | None  # the run's primary metric; None on rounds that do not measure it (no generation)
    loss: float
    bytes_down: int
    bytes_up: int
    cum_bytes: int  # down + up of every ledger row with round <= this round
    clients: int
    train_loss: float | None = None
    epsilon_max: float | None = None
    epsilon_median: float | None = None
    perplexity: float | None = None
    exact_match: float | None = None
    mc_accuracy: float | None = None  # causal-lm: multiple-choice accuracy (generation rounds)
    mc_accuracy_norm: float | None = None


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
    primary_metric: str  # the metric scores are in: "accuracy", "rouge_l", …
    initial_score: float
    final_score: float
    best_score: float
    target_fraction: float
    target_score: float
    target_round: int
    bytes_to_target: int
    full_model_message_bytes: int | None
    epsilon: float | None
    wall_s: float | None
    num_clients: int | None = None
    final_exact_match: float | None = None
    final_perplexity: float | None = None
    generation_share: float | None = None  # fraction of round time spent generating (causal-LM runs)
    initial_mc_accuracy: float | None = None  # causal-lm: multiple-choice accuracy, first and last measured
    final_mc_accuracy: float | None = None
    final_mc_accuracy_norm: float | None = None
    sample_rounds: tuple[int, int] | None = None  # (first, last) generation round of `samples`
    samples: list[SamplePair] = field(default_factory=list)
    user_privacy: str | None = None  # user-level DP: ε, δ, how clients were sampled, the adjacency, the noise source
    incomplete: str | None = None  # why the run did not complete (failed, interrupted, …)
    stopped: str | None = None  # why a completed run ended before its last round (the communication budget)
    rounds: list[RoundStats] = field(default_factory=list)
    clients: list[ClientStats] = field(default_factory=list)

    @property
    def metric_label(self) -> str:
        """The primary metric's display name ("accuracy", "Rouge-L")."""
        return metric_label(self.primary_metric)

    @property
    def scored_rounds(self) -> list[RoundStats]:
        """The rounds that measured the primary metric, in order."""
        return [r for r in self.rounds if r.score is not None]

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
            # Node discovery (QUERY messages: round 0 under `flwr run`, and later rounds that a node
            # joined or came back in) is not training, nor are secure aggregation's other stages
            # (`train.secagg_*`): one participation is one reply to a round's train message.
            if rec.direction == "up" and rec.round >= 1 and rec.message_type != "query" \
                    and not rec.message_type.startswith("train."):
                participations += 1

    metric = run.primary_metric
    rounds = _round_stats(run, per_round, metric)
    # Only rounds that measured the metric count (causal-LM runs generate every few rounds);
    # loading guarantees there is at least one.
    scored = [r for r in rounds if r.score is not None]
    initial, final = scored[0].score, scored[-1].score
    target = target_fraction * final
    # The last scored round always qualifies (fraction <= 1), so a first qualifying round exists.
    reached = next(r for r in scored if r.score >= target)
    clients = [
        ClientStats(cid, c["down"], c["up"], c["msg_down"], c["msg_up"])
        for cid, c in sorted(per_client.items()) if cid >= 0
    ]
    full = run.summary.get("full_model_message_bytes")
    first_gen, last_gen, pairs = sample_pairs(run.generations)
    eps = [r.epsilon_max for r in rounds if r.epsilon_max is not None]
    wall = run.summary.get("wall_s", run.metrics[-1].get("elapsed_s"))
    return RunStats(
        label=run.label, path=str(run.path), method=run.method, adapter=run.adapter,
        codecs=format_codecs(_configured(run.config.get("codecs"))),
        bytes_down=totals["down"], bytes_up=totals["up"],
        messages_down=messages["down"], messages_up=messages["up"], participations=participations,
        primary_metric=metric, initial_score=initial, final_score=final, best_score=max(r.score for r in scored),
        target_fraction=target_fraction, target_score=target, target_round=reached.round,
        bytes_to_target=reached.cum_bytes,
        full_model_message_bytes=int(full) if isinstance(full, (int, float)) else None,
        epsilon=eps[-1] if eps else None,
        wall_s=float(wall) if isinstance(wall, (int, float)) else None,
        num_clients=_opt_int(run.config.get("sim", {}).get("num_clients", run.summary.get("num_clients"))),
        final_exact_match=_last(rounds, "exact_match"), final_perplexity=_last(rounds, "perplexity"),
        generation_share=_opt_float(run.summary.get("generation_share")),
        initial_mc_accuracy=_first(rounds, "mc_accuracy"), final_mc_accuracy=_last(rounds, "mc_accuracy"),
        final_mc_accuracy_norm=_last(rounds, "mc_accuracy_norm"),
        sample_rounds=None if first_gen is None else (first_gen, last_gen), samples=pairs,
        user_privacy=user_privacy_text(run.summary),
        incomplete=run.incomplete, stopped=describe_stop(run.stopped) if run.stopped else None,
        rounds=rounds, clients=clients,
    )


def _first(rounds: list[RoundStats], attr: str) -> float | None:
    values = [getattr(r, attr) for r in rounds if getattr(r, attr) is not None]
    return values[0] if values else None


def _last(rounds: list[RoundStats], attr: str) -> float | None:
    values = [getattr(r, attr) for r in rounds if getattr(r, attr) is not None]
    return values[-1] if values else None


def _round_stats(run: Run, per_round: dict[int, dict[str, int]], metric: str) -> list[RoundStats]:
    out = []
    for m in run.metrics:
        rnd = int(m["round"])
        cum = sum(b["down"] + b["up"] for r, b in per_round.items() if r <= rnd)
        out.append(RoundStats(
            round=rnd, score=_opt_float(m.get(metric)), loss=float(m["loss"]),
            bytes_down=per_round.get(rnd, {}).get("down", 0), bytes_up=per_round.get(rnd, {}).get("up", 0),
            cum_bytes=cum, clients=int(m.get("clients", 0) or 0),
            train_loss=_opt_float(m.get("train_loss")),
            epsilon_max=_opt_float(m.get("epsilon_max")), epsilon_median=_opt_float(m.get("epsilon_median")),
            perplexity=_opt_float(m.get("perplexity")), exact_match=_opt_float(m.get(EXACT_MATCH)),
            mc_accuracy=_opt_float(m.get(MC_ACCURACY)), mc_accuracy_norm=_opt_float(m.get(MC_ACCURACY_NORM)),
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


def shared_metric(stats: list[RunStats]) -> str | None:
    """The primary metric every run uses, or None when the runs are scored by different metrics."""
    metrics = {s.primary_metric for s in stats}
    return metrics.pop() if len(metrics) == 1 else None


def metric_labels(stats: list[RunStats]) -> str:
    """The runs' primary metrics as one phrase ("accuracy", "accuracy or Rouge-L")."""
    return " or ".join(dict.fromkeys(s.metric_label for s in sort_runs(stats)))


# ----- table rows (shared by the HTML, Markdown and CSV writers) ----------------------------
# Scores are in generic columns, named by `metric` in every row, so runs scored by different
# metrics share one CSV schema.
COMPARISON_COLUMNS = [
    "run", "method", "adapter", "codecs", "metric", "final_score", "best_score", "final_exact_match",
    "final_perplexity", "final_mc_accuracy", "final_mc_accuracy_norm", "generation_share", "total_mib", "bytes_down", "bytes_up",
    "bytes_to_target", "target_round", "full_model_ratio", "epsilon", "wall_s",
]


def comparison_rows(stats: list[RunStats]) -> list[dict[str, Any]]:
    """One row per run with raw values (None where a figure does not apply)."""
    return [
        {
            "run": s.label, "method": s.method, "adapter": s.adapter, "codecs": s.codecs,
            "metric": s.primary_metric, "final_score": s.final_score, "best_score": s.best_score,
            "final_exact_match": s.final_exact_match, "final_perplexity": s.final_perplexity,
            "final_mc_accuracy": s.final_mc_accuracy, "final_mc_accuracy_norm": s.final_mc_accuracy_norm,
            "generation_share": s.generation_share, "total_mib": s.bytes_total / MIB,
            "bytes_down": s.bytes_down, "bytes_up": s.bytes_up,
            "bytes_to_target": s.bytes_to_target, "target_round": s.target_round,
            "full_model_ratio": s.full_model_ratio, "epsilon": s.epsilon, "wall_s": s.wall_s,
        }
        for s in sort_runs(stats)
    ]


ROUND_COLUMNS = ["run", "round", "metric", "score", "loss", "perplexity", "exact_match", "mc_accuracy",
                 "mc_accuracy_norm", "train_loss", "bytes_down", "bytes_up", "cum_bytes", "clients", "epsilon_max",
                 "epsilon_median"]
CLIENT_COLUMNS = ["run", "client_id", "bytes_down", "bytes_up", "bytes_total", "messages_down", "messages_up"]


def round_rows(stats: list[RunStats]) -> list[dict[str, Any]]:
    """One row per (run, round)."""
    return [
        {"run": s.label, "round": r.round, "metric": s.primary_metric, "score": r.score, "loss": r.loss,
         "perplexity": r.perplexity, "exact_match": r.exact_match, "mc_accuracy": r.mc_accuracy,
         "mc_accuracy_norm": r.mc_accuracy_norm, "train_loss": r.train_loss,
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
    """Bytes in MiB with 3 decimals and the exact count, or a dash."""
    return DASH if n is None else f"{format_bytes(n)} ({n:,} B)"


def fmt_mib(n: int | None) -> str:
    """Bytes in MiB with 3 decimals and no unit (a column headed MiB), or a dash."""
    return DASH if n is None else f"{n / MIB:,.3f}"


def fmt_num(v: float | None, digits: int = 4) -> str:
    """A float with fixed digits, or a dash when absent or NaN."""
    return DASH if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _opt_float(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _opt_int(v: Any) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def user_privacy_text(summary: dict[str, Any]) -> str | None:
    """One line on a run's user-level DP guarantee and how it was obtained (None without user-level DP)."""
    if "user_epsilon" not in summary:
        return None
    return (f"ε = {float(summary['user_epsilon']):.3f} at δ = {float(summary['user_delta']):.3g} after "
            f"{int(summary['user_releases'])} rounds; {summary.get('user_sampling', 'poisson')} client sampling at "
            f"q = {float(summary['user_sample_rate']):.3g}, {summary.get('user_adjacency', 'add/remove one user')} "
            f"adjacency, noise multiplier {float(summary['user_noise_multiplier']):.4g}, "
            f"{summary.get('user_noise_source', 'seeded')} noise")

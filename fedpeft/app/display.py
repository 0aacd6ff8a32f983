"""What the command line prints about a run: the per-round progress status, the closing table, the one-line result.

Every score is shown in the run's primary metric (accuracy for classification, Rouge-L for
causal-LM instruction tuning), named through `fedpeft.scores`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from fedpeft.round_outcome import describe_stop
from fedpeft.ledger import format_bytes
from fedpeft.scores import ACCURACY, metric_label, metric_short, primary_metric

NO_VALUE = "–"  # a metric not measured yet (causal-LM runs score only their generation rounds)
# Causal-LM extras of summary.json, shown when present: (key, row label, format).
SUMMARY_EXTRAS = (
    ("final_exact_match", "exact match (final)", "{:.4f}"),
    ("final_perplexity", "perplexity (final)", "{:.2f}"),
    ("generation_share", "generation share of round time", "{:.1%}"),
)


def _num(value: Any, digits: int = 3) -> str:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return f"{value:.{digits}f}" if ok else NO_VALUE


class ProgressLine:
    """The status text after each round: last known primary metric, loss, bytes sent so far and failed replies."""

    def __init__(self, metric: str = ACCURACY) -> None:
        """Start a run scored by `metric` ("accuracy", "rouge_l", …)."""
        self.metric = metric
        self.sent_bytes = 0
        self.bad = 0
        self.score: float | None = None

    def update(self, row: dict[str, Any]) -> str:
        """Take in one round's metrics row and return the status text to show."""
        from fedpeft.app.runlog import round_failures

        self.sent_bytes += int(row.get("bytes_down", 0)) + int(row.get("bytes_up", 0))
        # Rounds without generation carry no Rouge-L: the line keeps the last one measured.
        if self.metric in row:
            self.score = row[self.metric]
        status = (f"{metric_short(self.metric)} {_num(self.score)}  loss {_num(row.get('loss'))}  "
                  f"sent {format_bytes(self.sent_bytes, 2)}")
        failed, rejected = round_failures(row)
        self.bad += failed + rejected
        if self.bad:  # once a reply has failed or been rejected, every round shows its count
            status += f"  [yellow]failed/rejected {failed}/{rejected}[/yellow]"
            if self.bad != failed + rejected:
                status += f" ({self.bad} in the run)"
        return status


def score_text(s: dict[str, Any]) -> str:
    """A summary's primary metric, round 0 → final (best)."""
    m = primary_metric(s)
    return f"{s[f'initial_{m}']:.4f} → {s[f'final_{m}']:.4f} (best {s[f'best_{m}']:.4f})"


def summary_table(s: dict[str, Any]) -> Table:
    """The table printed when a simulation ends, from its summary."""
    table = Table(title=f"fedpeft run: {s['name']}", show_header=False)
    table.add_row("method / adapter", f"{s['method']} / {s['adapter']}")
    if s.get("stopped"):
        table.add_row("[yellow]stopped[/yellow]", escape(describe_stop(s["stopped"])))
    table.add_row(f"{metric_label(primary_metric(s))} (round 0 → final)", score_text(s))
    for key, label, fmt in SUMMARY_EXTRAS:
        if isinstance(s.get(key), (int, float)):
            table.add_row(label, fmt.format(s[key]))
    table.add_row("bytes down / up", f"{format_bytes(s['bytes_down'])} / {format_bytes(s['bytes_up'])}")
    table.add_row("client participations", str(s["participations"]))
    table.add_row("full-model FedAvg would send", f"{format_bytes(s['full_model_fedavg_bytes'], 1)} "
                  f"({s['full_model_fedavg_bytes'] / max(s['bytes_total'], 1):.0f}x more)")
    table.add_row("trainable / total params", f"{s['trainable_params']:,} / {s['total_params']:,}")
    table.add_row("rejected replies", rejections_text(s))
    if s.get("failed_rounds"):
        table.add_row("[yellow]failed rounds[/yellow]", f"{s['failed_rounds']} (fewer valid replies than sim.min_replies; "
                      "global model unchanged in each)")
    if s.get("injected_faults"):
        table.add_row("injected faults", ", ".join(f"{k} {v}" for k, v in s["injected_faults"].items()))
    if "epsilon_max" in s:
        table.add_row("sample-level ε (max / median)", f"{s['epsilon_max']:.3f} / {s['epsilon_median']:.3f}")
    if "user_epsilon" in s:
        table.add_row("user-level ε", f"{s['user_epsilon']:.3f} at δ = {s['user_delta']:.3g} "
                      f"({s['user_releases']} rounds, {s.get('user_sampling', 'poisson')} client sampling at "
                      f"q = {s['user_sample_rate']:.3g}, {s.get('user_noise_source', 'seeded')} noise)")
    table.add_row("wall time", f"{s['wall_s']:.1f} s")
    table.add_row("run directory", s["run_dir"])
    table.add_row("log (Flower, Ray)", str(Path(s["run_dir"]) / "run.log"))
    return table


def rejections_text(s: dict[str, Any]) -> str:
    """The run's rejected replies, counted by reason (the five most frequent)."""
    from fedpeft.rundir import RunDir
    from fedpeft.app.runlog import group_rejections

    total = int(s.get("rejected") or 0)
    if not total:
        return "0"
    groups = group_rejections(RunDir(Path(s["run_dir"])).metrics())
    lines = [str(total)]
    for reason, n, clients in groups[:5]:
        who = ", ".join(map(str, clients[:6])) + (", …" if len(clients) > 6 else "")
        lines.append(f"{n} × {reason} (client{'s' if len(clients) != 1 else ''} {who})")
    if len(groups) > 5:
        lines.append(f"{sum(n for _, n, _ in groups[5:])} × other reasons (see metrics.jsonl)")
    return escape("\n".join(lines))


def result_line(s: dict[str, Any]) -> str:
    """One line about a finished run of `fedpeft compare`: where it is, its final score and its bytes."""
    m = primary_metric(s)
    rejected = f", {s['rejected']} replies rejected" if s.get("rejected") else ""
    stopped = f"; {describe_stop(s['stopped'])}" if s.get("stopped") else ""
    return (f"  → {s['run_dir']}: final {metric_label(m)} {s[f'final_{m}']:.4f}, "
            f"{format_bytes(s['bytes_total'])}{rejected}{stopped}")


def privacy_header(cfg) -> str:
    """One line naming the run's DP guarantees: level, client sampling and adjacency, where the noise comes from."""
    from fedpeft.privacy.noise import noise_source

    parts = []
    if cfg.dp.enabled:
        parts.append("sample-level DP-SGD (Poisson batches, add/remove one example)")
    if cfg.dp.user.enabled:
        q = cfg.sim.clients_per_round / cfg.sim.num_clients
        where = ("the clients, which add their noise shares before secure aggregation"
                 if cfg.dp.user.side == "distributed" else cfg.dp.user.side)
        parts.append(f"user-level DP (Poisson client sampling at q = {q:.3g}, add/remove one user, "
                     f"{cfg.dp.user.clipping} clipping on the {where})")
    seeded = noise_source(cfg, simulated=True) == "seeded"
    return f"privacy: {'; '.join(parts)}; {'seeded noise (reproducible)' if seeded else 'noise from OS entropy'}"

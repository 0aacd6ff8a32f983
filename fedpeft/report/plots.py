"""Report plots: matplotlib figures rendered to PNG bytes with the Agg backend.

Figures are built with `matplotlib.figure.Figure` rather than pyplot, so no global figure state
or GUI backend is involved and reports can be made from any thread or a headless machine.
"""

from __future__ import annotations

import io
import math
from typing import NamedTuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedpeft.report.tables import MIB, RunStats, metric_labels, shared_metric, sort_runs

DOWN_COLOR, UP_COLOR = "#4C72B0", "#DD8452"
DPI = 110


class Plot(NamedTuple):
    """One rendered plot and its caption."""

    title: str
    png: bytes


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _figure(width: float = 9.0, height: float = 3.4, ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _capital(text: str) -> str:
    # Metric labels are lower case mid-sentence ("accuracy"); titles start with a capital.
    return text[:1].upper() + text[1:]


def _score_axis(ax, s: RunStats, x_of) -> str:
    """Plot the primary metric (and multiple-choice accuracy, when measured); returns the y-axis label."""
    # Only rounds that measured the primary metric are points; a causal-LM run generates every few rounds.
    pts = [(x_of(r), r.score) for r in s.scored_rounds]
    ax.plot(*zip(*pts), marker="o", color="C0", label=f"test {s.metric_label}")
    # causal-lm: multiple-choice accuracy, also in [0, 1], on the same axis
    for attr, label, style in (("mc_accuracy", "multiple-choice acc", "s--"),
                               ("mc_accuracy_norm", "MC acc norm", "^:")):
        mc = [(x_of(r), getattr(r, attr)) for r in s.rounds if getattr(r, attr) is not None]
        if mc:
            ax.plot(*zip(*mc), style, color="C4" if attr == "mc_accuracy" else "C5", label=label)
    ax.axhline(s.target_score, color="grey", ls="--", lw=1, label=f"target {s.target_score:.3f}")
    return "test score" if s.final_mc_accuracy is not None else f"test {s.metric_label}"


def progress_vs_round(s: RunStats) -> bytes:
    """The primary metric and loss of the global model after each round."""
    fig, (score, loss) = _figure(ncols=2)
    ylabel = _score_axis(score, s, lambda r: r.round)
    score.set(xlabel="round", ylabel=ylabel, title=f"{_capital(s.metric_label)} vs round")
    score.legend(loc="best", fontsize=8)
    x = [r.round for r in s.rounds]
    loss.plot(x, [r.loss for r in s.rounds], marker="o", color="C3", label="test loss")
    train = [(r.round, r.train_loss) for r in s.rounds if r.train_loss is not None]
    if train:
        loss.plot(*zip(*train), marker="s", ls=":", color="C2", label="train loss (clients)")
    loss.set(xlabel="round", ylabel="loss", title="Loss vs round")
    loss.legend(loc="best", fontsize=8)
    for ax in (score, loss):
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _png(fig)


def progress_vs_bytes(s: RunStats) -> bytes:
    """The primary metric and loss against cumulative MiB sent (down + up)."""
    fig, (score, loss) = _figure(ncols=2)
    ylabel = _score_axis(score, s, lambda r: r.cum_bytes / MIB)
    score.axvline(s.bytes_to_target / MIB, color="grey", ls=":", lw=1,
                  label=f"reached at {s.bytes_to_target / MIB:.3f} MiB")
    score.set(xlabel="cumulative MiB (down + up)", ylabel=ylabel,
              title=f"{_capital(s.metric_label)} vs bytes")
    score.legend(loc="best", fontsize=8)
    loss.plot([r.cum_bytes / MIB for r in s.rounds], [r.loss for r in s.rounds], marker="o", color="C3")
    loss.set(xlabel="cumulative MiB (down + up)", ylabel="test loss", title="Loss vs bytes")
    return _png(fig)


def bytes_per_round(s: RunStats) -> bytes:
    """Download and upload bytes of each round, stacked."""
    fig, (ax,) = _figure()
    rounds = [r for r in s.rounds if r.bytes_down or r.bytes_up] or s.rounds
    x = [r.round for r in rounds]
    down = [r.bytes_down / MIB for r in rounds]
    up = [r.bytes_up / MIB for r in rounds]
    ax.bar(x, down, color=DOWN_COLOR, label="download (server → clients)")
    ax.bar(x, up, bottom=down, color=UP_COLOR, label="upload (clients → server)")
    ax.set(xlabel="round", ylabel="MiB", title="Bytes per round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    _legend_above_bars(ax, [d + u for d, u in zip(down, up)])
    return _png(fig)


def _legend_above_bars(ax, heights: list[float]) -> None:
    # Stacked bars fill the axes; headroom keeps the legend from covering them.
    if heights and max(heights) > 0:
        ax.set_ylim(0, max(heights) * 1.28)
    ax.legend(fontsize=8, loc="upper left", ncol=3)


def bytes_per_client(s: RunStats, num_clients: int | None = None) -> bytes:
    """Total download and upload bytes of each client over the run, stacked."""
    fig, (ax,) = _figure()
    ids = [c.client_id for c in s.clients]
    down = [c.bytes_down / MIB for c in s.clients]
    up = [c.bytes_up / MIB for c in s.clients]
    # Positions, not ids, on the x axis: ids can be sparse and a bar per position stays readable.
    pos = list(range(len(ids)))
    ax.bar(pos, down, color=DOWN_COLOR, label="download")
    ax.bar(pos, up, bottom=down, color=UP_COLOR, label="upload")
    if s.clients:
        mean = sum(c.bytes_total for c in s.clients) / len(s.clients) / MIB
        ax.axhline(mean, color="black", ls="--", lw=1, label=f"mean {mean:.3f} MiB")
    step = max(1, math.ceil(len(ids) / 25))
    ax.set_xticks(pos[::step], [str(i) for i in ids[::step]])
    took_part = f"{len(ids)} of {num_clients} clients" if num_clients else f"{len(ids)} clients"
    ax.set(xlabel="client id", ylabel="MiB", title=f"Bytes per client ({took_part} took part)")
    _legend_above_bars(ax, [d + u for d, u in zip(down, up)])
    return _png(fig)


def epsilon_per_round(s: RunStats) -> bytes:
    """Privacy budget spent (ε) after each round: the maximum and median over clients."""
    fig, (ax,) = _figure()
    for attr, label, style in (("epsilon_max", "ε max over clients", "-o"), ("epsilon_median", "ε median", "--s")):
        pts = [(r.round, getattr(r, attr)) for r in s.rounds if getattr(r, attr) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.set(xlabel="round", ylabel="ε", title="Privacy budget vs round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    return _png(fig)


def comparison(stats: list[RunStats]) -> Plot:
    """Each run's primary metric against cumulative MiB, every run in one plot."""
    fig, (ax,) = _figure(width=9.0, height=4.2)
    totals = [s.bytes_total for s in stats if s.bytes_total > 0]
    # Runs that differ by orders of magnitude in bytes only fit on a log axis; a log axis
    # cannot show round 0 (0 bytes), so those points are dropped there.
    log_x = len(totals) > 1 and max(totals) / min(totals) > 20
    mixed = shared_metric(stats) is None
    for i, s in enumerate(sort_runs(stats)):
        pts = [(r.cum_bytes / MIB, r.score) for r in s.scored_rounds if not log_x or r.cum_bytes > 0]
        if pts:
            # Runs scored by different metrics share the y axis, so each legend entry names its own.
            scored_by = f" ({s.metric_label})" if mixed else ""
            ax.plot(*zip(*pts), marker="o", ms=4, color=f"C{i % 10}",
                    label=f"{s.method} / {s.adapter} — {s.label}{scored_by}")
    if log_x:
        ax.set_xscale("log")
    labels = metric_labels(stats)
    ax.set(xlabel="cumulative MiB (down + up)" + (", log scale" if log_x else ""), ylabel=f"test {labels}",
           title=f"{_capital(labels)} vs bytes, every run")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1, frameon=False)
    return Plot(f"{_capital(labels)} vs cumulative bytes, every run", _png(fig))


def comparison_stem(stats: list[RunStats]) -> str:
    """The comparison plot's file stem: named by the shared metric, or "score" when runs differ."""
    return f"comparison_{shared_metric(stats) or 'score'}_vs_bytes"


def run_plots(s: RunStats) -> dict[str, Plot]:
    """Every plot of one run, by file stem; ε only when the run reports it."""
    m, label = s.primary_metric, _capital(s.metric_label)
    plots = {
        f"{m}_loss_vs_round": Plot(f"{label} and loss vs round", progress_vs_round(s)),
        f"{m}_loss_vs_bytes": Plot(f"{label} and loss vs cumulative bytes", progress_vs_bytes(s)),
        "bytes_per_round": Plot("Bytes per round (download and upload stacked)", bytes_per_round(s)),
        "bytes_per_client": Plot("Bytes per client over the run", bytes_per_client(s, s.num_clients)),
    }
    if s.has_epsilon:
        plots["epsilon_vs_round"] = Plot("Privacy budget ε vs round", epsilon_per_round(s))
    return plots

"""Report writers: a self-contained HTML page, a Markdown page with PNG files, and CSV tables."""

from __future__ import annotations

import base64
import csv
import html
import time
from pathlib import Path
from typing import Any, Callable

from fedpeft.ledger import format_bytes
from fedpeft.report import plots
from fedpeft.report.plots import Plot
from fedpeft.report.tables import (
    CLIENT_COLUMNS, COMPARISON_COLUMNS, DASH, ROUND_COLUMNS, RunStats, client_rows, comparison_rows,
    fmt_bytes, fmt_mib, fmt_num, metric_labels, round_rows, shared_metric, sort_runs,
)
from fedpeft.scores import ROUGE_L, metric_label

Column = tuple[str, str, Callable[[Any], str]]  # (header, key of comparison_rows, formatter)


def _share(v: float | None) -> str:
    return DASH if v is None else f"{v:.1%}"


def display_columns(stats: list[RunStats]) -> list[Column]:
    """The comparison table's columns: a metric column for mixed metrics, causal-LM extras when present."""
    shared = shared_metric(stats)
    cols: list[Column] = [
        ("method", "method", str),
        ("adapter", "adapter", str),
        ("codecs", "codecs", lambda v: DASH if v is None else str(v)),
    ]
    if shared is None:
        cols.append(("metric", "metric", metric_label))
    cols.append((f"final {metric_label(shared)}" if shared else "final score", "final_score", lambda v: fmt_num(v, 4)))
    # Exact match, perplexity and generation share exist only for causal-LM runs.
    optional: list[tuple[Column, str]] = [
        (("exact match", "final_exact_match", lambda v: fmt_num(v, 4)), "final_exact_match"),
        (("MC acc", "final_mc_accuracy", lambda v: fmt_num(v, 4)), "final_mc_accuracy"),
        (("MC acc norm", "final_mc_accuracy_norm", lambda v: fmt_num(v, 4)), "final_mc_accuracy_norm"),
        (("perplexity", "final_perplexity", lambda v: fmt_num(v, 2)), "final_perplexity"),
        (("gen. share", "generation_share", _share), "generation_share"),
    ]
    cols += [col for col, attr in optional if any(getattr(s, attr) is not None for s in stats)]
    return cols + [
        ("total MiB", "total_mib", lambda v: f"{v:,.3f}"),
        ("MiB to target", "bytes_to_target", fmt_mib),
        ("at round", "target_round", str),
        ("full-model ×", "full_model_ratio", lambda v: DASH if v is None else f"{v:,.0f}×"),
        ("ε", "epsilon", lambda v: fmt_num(v, 2)),
        ("wall s", "wall_s", lambda v: fmt_num(v, 1)),
        # The run name goes last: it is long, and method/adapter are what runs are lined up by.
        ("run", "run", str),
    ]


def definitions(stats: list[RunStats]) -> list[tuple[str, str]]:
    """How each headline number is computed, shown in every report."""
    fraction, shared = stats[0].target_fraction, shared_metric(stats)
    reaching = (f"test {metric_label(shared)} ≥ {fraction:g} × the final {metric_label(shared)}" if shared else
                f"primary metric ({metric_labels(stats)}, per run) ≥ {fraction:g} × the run's final value")
    sparse = any(len(s.scored_rounds) < len(s.rounds) for s in stats)
    out = [
        ("bytes", "every figure is summed from the run's ledger, comm.csv (one row per record of every "
                  "message, as Flower serializes it); MiB = 2^20 bytes, as `fedpeft simulate` prints it"),
        ("participations", "upload messages in rounds ≥ 1 of comm.csv (each message has one `_envelope` row; "
                           "QUERY messages are node discovery, and `train.secagg_*` "
                           "messages the other stages of secure aggregation, not training)"),
        (f"bytes to {fraction:.0%} of final", f"cumulative bytes, download + upload, through the end of the "
         f"first round whose {reaching} (round 0 counts: it is 0 B in a simulation)"
         + ("; only rounds that measured it count (causal-LM runs generate every `eval.generate_every` rounds, "
            "round 0 and the last round always), and the final value is the last one measured" if sparse else "")),
        ("full-model FedAvg", "2 × participations × full_model_message_bytes (from summary.json, where it is "
                              "measured by serializing a message carrying every base-model weight): FedPara's "
                              "cost metric for the same participants and rounds"),
        ("ε", "the last round's `epsilon_max` in metrics.jsonl (maximum over clients); — when the run has no DP"),
    ]
    if any(s.primary_metric == ROUGE_L for s in stats):
        out += [
            ("Rouge-L, exact match", "scores of the global model's greedy generations against the reference "
                                     "responses of the held-out prompts (`rouge_l`, `exact_match` in metrics.jsonl, "
                                     "on generation rounds); perplexity from the held-out response loss per "
                                     "token (`perplexity`, every round)"),
            ("generation share", "the fraction of round time spent generating (`generation_share` in summary.json)"),
        ]
    if any(s.final_mc_accuracy is not None for s in stats):
        out.append(("multiple-choice accuracy", "on generation rounds, each question of `eval.multiple_choice` is "
                    "scored by the log-likelihood of each choice's text as the answer to it, without generating "
                    "(lm-evaluation-harness style): MC acc counts questions whose right choice is the most likely "
                    "(`mc_accuracy`), MC acc norm divides each log-likelihood by the choice's length in characters "
                    "first (`mc_accuracy_norm`, the harness's acc_norm)"))
    if any(s.samples for s in stats):
        out.append(("samples", "the first held-out prompts of `generations.jsonl` (the user's question, template "
                    "headers removed), their reference, and the global model's greedy answer on the first "
                    "generation round (round 0: the base model before any training) and on the last"))
    return out


def headline(s: RunStats) -> list[tuple[str, str]]:
    """The headline numbers of one run as (label, text) pairs."""
    ref = s.full_model_fedavg_bytes
    ratio = s.full_model_ratio
    label = s.metric_label
    status = [("status", f"the run {s.incomplete}: figures cover the rounds it recorded")] if s.incomplete else []
    extras = [(name, text) for name, value, text in (
        ("exact match (final)", s.final_exact_match, fmt_num(s.final_exact_match, 4)),
        ("perplexity (final)", s.final_perplexity, fmt_num(s.final_perplexity, 2)),
        ("generation share of round time", s.generation_share, _share(s.generation_share)),
        ("multiple-choice accuracy, first → final (norm)", s.final_mc_accuracy,
         f"{fmt_num(s.initial_mc_accuracy, 4)} → {fmt_num(s.final_mc_accuracy, 4)} "
         f"({fmt_num(s.final_mc_accuracy_norm, 4)})"),
    ) if value is not None]
    status += [("stopped", f"{s.stopped}; figures cover the rounds it sent")] if s.stopped else []
    return status + [
        ("method / adapter", f"{s.method} / {s.adapter}"),
        ("codecs", s.codecs or DASH),
        ("rounds / participations", f"{s.rounds[-1].round} / {s.participations}"),
        (f"{label} round 0 → final (best)", f"{s.initial_score:.4f} → {s.final_score:.4f} ({s.best_score:.4f})"),
        *extras,
        ("bytes down", f"{fmt_bytes(s.bytes_down)} in {s.messages_down:,} messages"),
        ("bytes up", f"{fmt_bytes(s.bytes_up)} in {s.messages_up:,} messages"),
        ("bytes total", fmt_bytes(s.bytes_total)),
        (f"bytes to {s.target_fraction:.0%} of final {label}",
         f"{fmt_bytes(s.bytes_to_target)}, reached at round {s.target_round} "
         f"({label} ≥ {s.target_score:.4f})"
         + (": the initial model already met it" if s.target_round == 0 else "")),
        ("full-model FedAvg reference",
         DASH + " (no summary.json)" if ref is None else
         f"{fmt_bytes(ref)} = 2 × {s.participations} × {s.full_model_message_bytes:,} B"),
        ("this run vs full-model FedAvg", DASH if ratio is None else f"{ratio:,.1f}× fewer bytes"),
        ("ε spent (max over clients)", fmt_num(s.epsilon, 3)),
        *([("user-level DP", s.user_privacy)] if s.user_privacy else []),
        ("wall time", DASH if s.wall_s is None else f"{s.wall_s:.1f} s"),
    ]


def write_report(stats: list[RunStats], out: Path, title: str | None = None) -> dict[str, Path]:
    """Write report.html, report.md, runs.csv, rounds.csv, clients.csv and PNG plots into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = sort_runs(stats)
    title = title or (f"fedpeft report: {stats[0].label}" if len(stats) == 1 else f"fedpeft comparison: {len(stats)} runs")
    figures: dict[str, dict[str, Plot]] = {s.label: plots.run_plots(s) for s in stats}
    comparison = plots.comparison(stats) if len(stats) > 1 else None

    files: dict[str, Path] = {}
    plot_dir = out / "plots"
    # Markdown links each plot by (caption, path relative to the report).
    plot_links: dict[str, list[tuple[str, str]]] = {}
    for label, figs in figures.items():
        (plot_dir / label).mkdir(parents=True, exist_ok=True)
        plot_links[label] = []
        for stem, fig in figs.items():
            p = plot_dir / label / f"{stem}.png"
            p.write_bytes(fig.png)
            plot_links[label].append((fig.title, p.relative_to(out).as_posix()))
            files[f"plot:{label}:{stem}"] = p
    comparison_link = None
    if comparison is not None:
        p = plot_dir / f"{plots.comparison_stem(stats)}.png"
        p.write_bytes(comparison.png)
        files["plot:comparison"] = p
        comparison_link = (comparison.title, p.relative_to(out).as_posix())

    files["runs.csv"] = _write_csv(out / "runs.csv", COMPARISON_COLUMNS, comparison_rows(stats))
    files["rounds.csv"] = _write_csv(out / "rounds.csv", ROUND_COLUMNS, round_rows(stats))
    files["clients.csv"] = _write_csv(out / "clients.csv", CLIENT_COLUMNS, client_rows(stats))
    files["report.md"] = out / "report.md"
    files["report.md"].write_text(markdown(stats, title, plot_links, comparison_link))
    files["report.html"] = out / "report.html"
    files["report.html"].write_text(html_page(stats, title, figures, comparison))
    return files


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> Path:
    # Absent figures are empty cells (not a dash) so the CSVs load as numbers anywhere.
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


# ----- Markdown ----------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(stats: list[RunStats], title: str, plot_links: dict[str, list[tuple[str, str]]],
             comparison_link: tuple[str, str] | None) -> str:
    """The report as Markdown, with plots linked (caption, relative path) as PNG files next to it."""
    lines = [f"# {title}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from {len(stats)} run director"
             f"{'y' if len(stats) == 1 else 'ies'}.", ""]
    if len(stats) > 1:
        columns = display_columns(stats)
        lines += ["## Comparison", ""]
        lines.append("| " + " | ".join(h for h, _, _ in columns) + " |")
        lines.append("|" + "|".join("---" for _ in columns) + "|")
        for row in comparison_rows(stats):
            lines.append("| " + " | ".join(_md_cell(f(row[k])) for _, k, f in columns) + " |")
        lines.append("")
        if comparison_link:
            lines += ["![{}]({})".format(*comparison_link), ""]
    for s in stats:
        lines += [f"## {s.label}", "", f"`{s.path}`", "", "| | |", "|---|---|"]
        lines += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in headline(s)]
        lines.append("")
        for caption, rel in plot_links[s.label]:
            lines += [f"![{caption}]({rel})", ""]
        lines += _md_samples(s)
    lines += ["## How the numbers are computed", ""]
    lines += [f"- **{k}**: {v}" for k, v in definitions(stats)]
    lines += ["", "Tables: `runs.csv` (one row per run), `rounds.csv` (per run and round), "
              "`clients.csv` (per run and client).", ""]
    return "\n".join(lines)


def samples_title(s: RunStats) -> str:
    """The heading of a run's side-by-side samples."""
    first, last = s.sample_rounds or (0, 0)
    return f"Held-out samples: round {first} vs round {last}"


def sample_columns(s: RunStats) -> list[str]:
    """Column headers of the samples table; one answer column when only one round generated."""
    first, last = s.sample_rounds or (0, 0)
    answers = [f"round {first}" + (" (zero-shot)" if first == 0 else "")]
    return ["prompt", "reference", *answers, *([f"round {last} (final)"] if last != first else [])]


def sample_cells(s: RunStats) -> list[list[str]]:
    """The samples table's rows (prompt, reference, first answer[, final answer])."""
    first, last = s.sample_rounds or (0, 0)
    return [[p.prompt, p.reference, p.first or "(empty)", *([p.final or "(empty)"] if last != first else [])]
            for p in s.samples]


def _md_samples(s: RunStats) -> list[str]:
    if not s.samples:
        return []
    cols = sample_columns(s)
    lines = [f"### {samples_title(s)}", "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_md_cell(" ".join(c.split())) for c in row) + " |" for row in sample_cells(s)]
    return lines + [""]


# ----- HTML --------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1200px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.6rem;margin:0 0 4px} h2{font-size:1.25rem;margin:32px 0 10px;border-bottom:1px solid #d8dce3;padding-bottom:4px}
h3{font-size:1.05rem;margin:18px 0 6px} .muted{color:#667085;font-size:.9rem} code{font-size:.85rem}
section,details{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:12px 18px;margin:14px 0}
summary{cursor:pointer;font-weight:600;font-size:1.05rem}
table{border-collapse:collapse;font-size:.9rem;margin:8px 0}
th,td{padding:5px 10px;border-bottom:1px solid #e6e8ec;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
table.kv th{font-weight:500;color:#475467;width:280px}
table.sortable{font-size:.85rem} table.sortable td{white-space:nowrap;padding:4px 8px}
section>h2:first-child{margin-top:4px} table.sortable td:last-child{white-space:normal;overflow-wrap:anywhere;min-width:140px}
table.sortable th{padding:4px 8px;cursor:pointer;background:#eef1f5;user-select:none;white-space:nowrap}
table.sortable th:after{content:' ↕';color:#98a2b3;font-size:.8em}
table.sortable th.asc:after{content:' ▲';color:#1d2330} table.sortable th.desc:after{content:' ▼';color:#1d2330}
.scroll{overflow-x:auto}
table.samples td{white-space:pre-wrap;max-width:360px} table.samples th{background:#eef1f5}
figure{margin:10px 0 18px} figure img{max-width:100%;height:auto;border:1px solid #eceef2;border-radius:4px}
figcaption{font-size:.85rem;color:#475467;margin-top:2px}
dl dt{font-weight:600;margin-top:6px} dl dd{margin:2px 0 0 16px;color:#344054;font-size:.9rem}
"""
# Sorts a table by the clicked column, numerically when every cell has a numeric data-v.
JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
    var asc=!th.classList.contains('asc'); t.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc')});
    th.classList.add(asc?'asc':'desc'); var b=t.tBodies[0], rows=Array.from(b.rows);
    var key=function(r){var c=r.cells[i], v=c.dataset.v; return v===''||v===undefined?null:(isNaN(+v)?v:+v)};
    rows.sort(function(x,y){var a=key(x),c=key(y); if(a===null)return 1; if(c===null)return -1;
      return (typeof a==='number'&&typeof c==='number'?a-c:String(a).localeCompare(String(c)))*(asc?1:-1)});
    rows.forEach(function(r){b.appendChild(r)});});});});
"""


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _img(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{_esc(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _kv_table(pairs: list[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in pairs)
    return f'<table class="kv">{rows}</table>'


def _comparison_table(stats: list[RunStats]) -> str:
    columns = display_columns(stats)
    head = "".join(f"<th>{_esc(h)}</th>" for h, _, _ in columns)
    body = []
    for row in comparison_rows(stats):
        cells = []
        for _, k, f in columns:
            v = row[k]
            cls = ' class="num"' if isinstance(v, (int, float)) else ""
            cells.append(f'<td{cls} data-v="{_esc("" if v is None else v)}">{_esc(f(v))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _run_section(s: RunStats, figs: dict[str, Plot], collapsible: bool) -> str:
    inner = (f'<p class="muted"><code>{_esc(s.path)}</code></p>{_kv_table(headline(s))}'
             + "".join(_img(fig.png, fig.title) for fig in figs.values()) + _html_samples(s))
    if collapsible:
        return (f"<details><summary>{_esc(s.label)} — {_esc(s.method)} / {_esc(s.adapter)}, "
                f"final {_esc(s.metric_label)} {s.final_score:.4f}, {format_bytes(s.bytes_total)}</summary>"
                f"{inner}</details>")
    return f"<section><h2>{_esc(s.label)}</h2>{inner}</section>"


def _html_samples(s: RunStats) -> str:
    if not s.samples:
        return ""
    head = "".join(f"<th>{_esc(c)}</th>" for c in sample_columns(s))
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in sample_cells(s))
    return (f"<h3>{_esc(samples_title(s))}</h3><div class=\"scroll\"><table class=\"samples\">"
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def html_page(stats: list[RunStats], title: str, figures: dict[str, dict[str, Plot]], comparison: Plot | None) -> str:
    """The report as one HTML file: inline CSS and JS, plots embedded as base64 PNG, no network needed."""
    parts = [f"<h1>{_esc(title)}</h1>",
             f'<p class="muted">Generated {_esc(time.strftime("%Y-%m-%d %H:%M:%S"))} from {len(stats)} run '
             f"director{'y' if len(stats) == 1 else 'ies'}. Tables: runs.csv, rounds.csv, clients.csv.</p>"]
    many = len(stats) > 1
    if many:
        parts.append("<section><h2>Comparison</h2>"
                     '<p class="muted">Click a column header to sort. "MiB to target": cumulative MiB through the first '
                     f"round reaching {stats[0].target_fraction:.0%} of that run's final {_esc(metric_labels(stats))}"
                     + ("" if shared_metric(stats) else " (the metric column names each run's)") + ". "
                     '"full-model ×": how many times more bytes full-model FedAvg would move for the same '
                     "participations.</p>"
                     + _comparison_table(stats)
                     + (_img(comparison.png, comparison.title) if comparison else "")
                     + "</section><h2>Runs</h2>")
    parts += [_run_section(s, figures[s.label], collapsible=many) for s in stats]
    defs = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in definitions(stats))
    parts.append(f"<section><h2>How the numbers are computed</h2><dl>{defs}</dl></section>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{_esc(title)}</title>"
            f"<style>{CSS}</style></head><body><main>{''.join(parts)}</main><script>{JS}</script></body></html>\n")

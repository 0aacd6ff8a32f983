"""Reports and CLI output follow each run's primary metric: Rouge-L for causal-LM runs, accuracy otherwise."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import pytest
from rich.console import Console
from run_fixtures import assert_real_png, ledger_sums, write_run

from fedpeft.app.display import ProgressLine, result_line, summary_table
from fedpeft.report import ReportError, load_run, make_report, run_stats
from fedpeft.rundir import RunDir
from fedpeft.scores import metric_label, primary_metric

# Seven rounds, generation every 3 (round 0 and the last always): Rouge-L exists on rounds 0, 3 and 6 only.
ROUGE = {0: 0.10, 3: 0.30, 6: 0.40}
EXACT = {0: 0.0, 3: 0.1, 6: 0.2}
LOSS = [3.0, 2.6, 2.4, 2.2, 2.1, 2.0, 1.9]
BUDGET_EVENT = {"event": "comm_budget_stop", "bytes_total": 12345, "budget_mb": 0.01}


def write_causal_run(path: Path, *, summary: bool = True, rouge: dict[int, float] = ROUGE, **run_kw) -> Path:
    """A causal-LM run directory: the ledger of `write_run`, causal metrics rows and summary, a budget event line."""
    write_run(path, accuracy=(0.0,) * len(LOSS), **run_kw)
    rows = []
    for rnd, loss in enumerate(LOSS):
        row = {"round": rnd, "loss": loss, "perplexity": math.exp(loss), "clients": 0 if rnd == 0 else 2,
               "rejected": 0}
        if rnd in rouge:
            row.update(rouge_l=rouge[rnd], exact_match=EXACT[rnd], generate_s=0.5)
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, BUDGET_EVENT]))
    scored = [rouge[r] for r in sorted(rouge)] or [0.0]
    doc = {**json.loads((path / "summary.json").read_text()), "primary_metric": "rouge_l",
           "initial_rouge_l": scored[0], "final_rouge_l": scored[-1], "best_rouge_l": max(scored),
           "final_exact_match": EXACT[6], "final_perplexity": math.exp(LOSS[-1]), "generation_share": 0.25}
    if summary:
        (path / "summary.json").write_text(json.dumps(doc))
    else:
        (path / "summary.json").unlink()
    with (path / "config.toml").open("a") as f:
        f.write('[model]\nkind = "causal-lm"\n')
    return path


def cum_bytes(run_dir: Path, through: int) -> int:
    """Cumulative ledger bytes, both directions, through the end of a round."""
    return sum(v["down"] + v["up"] for r, v in ledger_sums(run_dir)["per_round"].items() if r <= through)


# ----- numbers -----------------------------------------------------------------------------
def test_causal_run_is_scored_by_rouge_l_on_generation_rounds_only(tmp_path):
    run = write_causal_run(tmp_path / "causal")
    s = run_stats(load_run(run), 0.5)
    assert (s.primary_metric, s.metric_label) == ("rouge_l", "Rouge-L")
    assert len(s.rounds) == 7 and [r.round for r in s.scored_rounds] == [0, 3, 6]
    assert [r.loss for r in s.rounds] == LOSS  # loss is kept on every round, scored or not
    assert (s.initial_score, s.final_score, s.best_score) == (0.10, 0.40, 0.40)
    # 0.5 × 0.40 = 0.20: round 3 (0.30) is the first generation round reaching it
    assert (s.target_score, s.target_round, s.bytes_to_target) == (pytest.approx(0.2), 3, cum_bytes(run, 3))
    assert s.final_exact_match == 0.2 and s.final_perplexity == pytest.approx(math.exp(1.9))
    assert s.generation_share == 0.25
    s90 = run_stats(load_run(run), 0.9)
    assert (s90.target_round, s90.bytes_to_target) == (6, cum_bytes(run, 6))


def test_final_score_is_the_last_measured_one(tmp_path):
    # An interrupted run whose last recorded round did not generate: no summary, kind from config.toml.
    run = write_causal_run(tmp_path / "cut", summary=False, rouge={0: 0.1, 3: 0.5})
    s = run_stats(load_run(run), 0.9)
    assert s.primary_metric == "rouge_l" and (s.final_score, s.target_round) == (0.5, 3)
    assert s.generation_share is None and s.final_exact_match == 0.1


def test_old_summary_without_primary_metric_reads_as_accuracy(tmp_path):
    run = write_run(tmp_path / "old")
    assert "primary_metric" not in json.loads((run / "summary.json").read_text())
    s = run_stats(load_run(run), 0.9)
    assert (s.primary_metric, s.final_score, s.target_round) == ("accuracy", 0.9, 3)
    assert primary_metric({}) == "accuracy" and primary_metric({"primary_metric": "accuracy"}) == "accuracy"
    assert metric_label("exact_match") == "exact match" and metric_label("accuracy") == "accuracy"


def test_event_lines_are_skipped_by_every_reader(tmp_path):
    run = write_run(tmp_path / "stopped")
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(BUDGET_EVENT) + "\n")
    assert [m["round"] for m in load_run(run).metrics] == [0, 1, 2, 3]
    assert all("event" not in m for m in RunDir(run).metrics())
    RunDir(run).write_status("completed")  # the last round is read from the rows, not from the event line
    assert json.loads((run / "status.json").read_text())["last_round"] == 3


def test_bad_or_missing_primary_metric_is_named(tmp_path):
    run = write_causal_run(tmp_path / "bad")
    text = (run / "metrics.jsonl").read_text().replace('"rouge_l": 0.3,', '"rouge_l": "n/a",')
    (run / "metrics.jsonl").write_text(text)
    with pytest.raises(ReportError, match=r"metrics.jsonl: line 4 has a non-numeric 'rouge_l'"):
        load_run(run)
    none = write_causal_run(tmp_path / "none", rouge={})
    with pytest.raises(ReportError, match=r"no round has a 'rouge_l' value"):
        load_run(none)


# ----- report files ------------------------------------------------------------------------
def test_causal_report_shows_rouge_l(tmp_path):
    run = write_causal_run(tmp_path / "causal")
    files = make_report([run], tmp_path / "out", 0.5)
    for stem in ("rouge_l_loss_vs_round", "rouge_l_loss_vs_bytes"):
        assert_real_png(files[f"plot:causal:{stem}"].read_bytes())
    md = files["report.md"].read_text()
    assert "| Rouge-L round 0 → final (best) | 0.1000 → 0.4000 (0.4000) |" in md
    assert "| exact match (final) | 0.2000 |" in md and "| perplexity (final) | 6.69 |" in md
    assert "| generation share of round time | 25.0% |" in md
    assert "bytes to 50% of final Rouge-L" in md and "reached at round 3 (Rouge-L ≥ 0.2000)" in md
    assert "![Rouge-L and loss vs round](plots/causal/rouge_l_loss_vs_round.png)" in md
    assert "only rounds that measured it count" in md and "accuracy" not in md
    rounds = list(csv.DictReader(files["rounds.csv"].open()))
    assert [r["score"] for r in rounds] == ["0.1", "", "", "0.3", "", "", "0.4"]
    assert {r["metric"] for r in rounds} == {"rouge_l"} and all(r["perplexity"] for r in rounds)
    row = next(csv.DictReader(files["runs.csv"].open()))
    assert (row["metric"], row["final_score"], row["final_exact_match"], row["generation_share"]) == (
        "rouge_l", "0.4", "0.2", "0.25")
    assert (int(row["target_round"]), int(row["bytes_to_target"])) == (3, cum_bytes(run, 3))


def test_comparison_of_causal_runs_names_rouge_l(tmp_path):
    runs = [write_causal_run(tmp_path / "c1"), write_causal_run(tmp_path / "c2", adapter="loha")]
    files = make_report(runs, tmp_path / "out")
    assert_real_png(files["plot:comparison"].read_bytes())
    assert files["plot:comparison"].name == "comparison_rouge_l_vs_bytes.png"
    page = files["report.html"].read_text()
    header = page.split('<table class="sortable"><thead>')[1].split("</thead>")[0]
    assert "<th>final Rouge-L</th><th>exact match</th><th>perplexity</th><th>gen. share</th>" in header
    assert "<th>metric</th>" not in header and "final Rouge-L 0.4000" in page


def test_mixed_comparison_says_which_metric_each_run_uses(tmp_path):
    runs = [write_causal_run(tmp_path / "causal"), write_run(tmp_path / "cls", adapter="loha")]
    files = make_report(runs, tmp_path / "out", 0.5)
    by_run = {r["run"]: r for r in csv.DictReader(files["runs.csv"].open())}
    assert (by_run["causal"]["metric"], by_run["cls"]["metric"]) == ("rouge_l", "accuracy")
    assert (by_run["cls"]["final_score"], by_run["cls"]["final_exact_match"]) == ("0.9", "")
    assert files["plot:comparison"].name == "comparison_score_vs_bytes.png"
    page = files["report.html"].read_text()
    table = page.split('<table class="sortable">')[1].split("</table>")[0]
    assert "<th>metric</th>" in table and "<th>final score</th>" in table
    assert '>Rouge-L</td>' in table and '>accuracy</td>' in table
    assert "final accuracy 0.9000" in page and "final Rouge-L 0.4000" in page
    assert "final accuracy or Rouge-L" in page or "final Rouge-L or accuracy" in page
    md = files["report.md"].read_text()
    assert "| accuracy round 0 → final (best) | 0.1000 → 0.9000 (0.9000) |" in md
    assert re.search(r"!\[(Accuracy or Rouge-L|Rouge-L or accuracy) vs cumulative bytes, every run\]"
                     r"\(plots/comparison_score_vs_bytes.png\)", md)


# ----- CLI output --------------------------------------------------------------------------
def _summary(**extra) -> dict:
    """A classification summary as the simulation driver returns it (no primary_metric: an older run)."""
    return {"name": "x", "method": "fedavg", "adapter": "lora", "initial_accuracy": 0.1, "final_accuracy": 0.8,
            "best_accuracy": 0.85, "bytes_down": 2 * 2**20, "bytes_up": 2**20, "bytes_total": 3 * 2**20,
            "participations": 4, "full_model_fedavg_bytes": 300 * 2**20, "trainable_params": 10, "total_params": 100,
            "rejected": 0, "wall_s": 2.0, "run_dir": "runs/x", **extra}


def _causal_summary() -> dict:
    return _summary(primary_metric="rouge_l", initial_rouge_l=0.1, final_rouge_l=0.412, best_rouge_l=0.45,
                    final_exact_match=0.2, final_perplexity=6.69, generation_share=0.25)


def _text(table) -> str:
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(table)
    return out.getvalue()


def test_progress_line_shows_the_last_rouge_l():
    line = ProgressLine("rouge_l")
    mb = {"bytes_down": 2**20, "bytes_up": 2**20}
    assert line.update({"round": 1, "loss": 1.5, **mb}) == "rouge-L –  loss 1.500  sent 2.00 MiB"
    assert line.update({"round": 2, "loss": 1.234, "rouge_l": 0.412, **mb}) == "rouge-L 0.412  loss 1.234  sent 4.00 MiB"
    assert line.update({"round": 3, "loss": 1.2, **mb}).startswith("rouge-L 0.412  loss 1.200")
    classify = ProgressLine()
    row = {"round": 1, "accuracy": 0.512, "loss": 1.234, **mb}
    assert classify.update(row) == "acc 0.512  loss 1.234  sent 2.00 MiB"


def test_closing_table_and_result_line_follow_the_primary_metric():
    causal = _text(summary_table(_causal_summary()))
    assert re.search(r"Rouge-L \(round 0 → final\)\s+│?\s*0\.1000 → 0\.4120 \(best 0\.4500\)", causal)
    assert re.search(r"exact match \(final\)\s+│?\s*0\.2000", causal)
    assert re.search(r"perplexity \(final\)\s+│?\s*6\.69", causal)
    assert re.search(r"generation share of round time\s+│?\s*25.0%", causal) and "accuracy" not in causal
    classify = _text(summary_table(_summary()))
    assert re.search(r"accuracy \(round 0 → final\)\s+│?\s*0\.1000 → 0\.8000 \(best 0\.8500\)", classify)
    assert "exact match" not in classify and "Rouge-L" not in classify
    assert result_line(_causal_summary()) == "  → runs/x: final Rouge-L 0.4120, 3.000 MiB"
    assert result_line(_summary(rejected=2)) == "  → runs/x: final accuracy 0.8000, 3.000 MiB, 2 replies rejected"


def test_cli_report_takes_target_alias(tmp_path):
    from typer.testing import CliRunner

    from fedpeft.app.cli import app

    run = write_causal_run(tmp_path / "causal")
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "out"), "--target", "0.5"])
    assert result.exit_code == 0, result.output
    row = next(csv.DictReader((tmp_path / "out" / "runs.csv").open()))
    assert (row["metric"], row["target_round"]) == ("rouge_l", "3")
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "o2"), "--target-accuracy", "1.5"])
    assert result.exit_code == 2 and "final primary metric" in result.output

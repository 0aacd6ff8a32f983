"""`fedpeft report` / `fedpeft compare`: numbers equal ledger sums, plots are real images, bad run dirs are named."""

from __future__ import annotations

import base64
import csv
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from run_fixtures import assert_real_png, bytes_to_target, ledger_sums, write_run

from fedpeft.report import ReportError, load_run, make_report, run_stats

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"


# ----- run directories ---------------------------------------------------------------------
@pytest.fixture(scope="session")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real smoke simulations (LoRA and LoHa), made once per test session."""
    from fedpeft.app.recipe import validate
    from fedpeft.app.simulate import simulate

    out = tmp_path_factory.mktemp("report-runs")
    base = tomllib.loads(SMOKE.read_text())
    adapters = {
        "lora": {"type": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        "loha": {"type": "loha", "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
    }
    dirs = []
    for name, adapter in adapters.items():
        raw = {**base, "name": f"smoke-{name}", "adapter": adapter, "output": {**base["output"], "dir": str(out)}}
        dirs.append(Path(simulate(validate(raw))["run_dir"]))
    return dirs


def test_synthetic_numbers_equal_hand_computed_ledger_sums(tmp_path):
    run = write_run(tmp_path / "syn")
    s = run_stats(load_run(run), 0.9)
    # rounds 1..3, two clients each: down 100r+7+20 per client, up (90+cid)+5+21
    down = sum(2 * (100 * r + 27) for r in (1, 2, 3))
    up = sum(90 + cid + 26 for r in (1, 2, 3) for cid in (r % 3, (r + 1) % 3))
    assert (s.bytes_down, s.bytes_up, s.bytes_total) == (down, up, down + up)
    assert s.participations == 6 and s.messages_down == 6 and s.messages_up == 6
    # 0.9 × final 0.9 = 0.81: round 2 (0.8) misses, round 3 reaches it, so every byte counts
    assert (s.target_round, s.bytes_to_target) == (3, down + up)
    s50 = run_stats(load_run(run), 0.5)
    assert (s50.target_round, s50.bytes_to_target) == (1, 2 * 127 + (91 + 26) + (92 + 26))
    assert s.full_model_fedavg_bytes == 2 * 6 * 1000
    assert s.full_model_ratio == pytest.approx(12000 / (down + up))
    assert [r.cum_bytes for r in s.rounds][-1] == down + up
    assert {c.client_id: c.bytes_total for c in s.clients} == {
        cid: v["down"] + v["up"] for cid, v in ledger_sums(run)["per_client"].items()}
    assert s.epsilon is None and s.codecs is None


def test_real_runs_numbers_equal_ledger_sums(real_runs, tmp_path):
    files = make_report(real_runs, tmp_path / "out", 0.8)
    by_run = {r["run"]: r for r in csv.DictReader(files["runs.csv"].open())}
    rounds = list(csv.DictReader(files["rounds.csv"].open()))
    for run_dir in real_runs:
        sums = ledger_sums(run_dir)
        row = by_run[run_dir.name]
        assert int(row["bytes_down"]) == sums["down"] and int(row["bytes_up"]) == sums["up"]
        assert float(row["total_mib"]) == pytest.approx((sums["down"] + sums["up"]) / 2**20)
        target_round, target_bytes = bytes_to_target(run_dir, 0.8)
        assert (int(row["target_round"]), int(row["bytes_to_target"])) == (target_round, target_bytes)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert sums["participations"] == summary["participations"]
        ref = 2 * sums["participations"] * summary["full_model_message_bytes"]
        assert float(row["full_model_ratio"]) == pytest.approx(ref / (sums["down"] + sums["up"]))
        for r in (r for r in rounds if r["run"] == run_dir.name):
            per = sums["per_round"].get(int(r["round"]), {"down": 0, "up": 0})
            assert (int(r["bytes_down"]), int(r["bytes_up"])) == (per["down"], per["up"])
        # the headline in the HTML shows the same exact byte counts
        page = files["report.html"].read_text()
        assert f"({sums['down']:,} B)" in page and f"({sums['up']:,} B)" in page


def test_plots_are_real_images_and_html_is_self_contained(real_runs, tmp_path):
    files = make_report(real_runs, tmp_path / "out")
    pngs = [p for k, p in files.items() if k.startswith("plot:")]
    assert len(pngs) == 2 * 4 + 1  # four per run (no ε without DP) and the comparison
    for p in pngs:
        assert_real_png(p.read_bytes())
    page = files["report.html"].read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(pngs)
    for data in embedded:
        assert_real_png(base64.b64decode(data))
    assert not re.search(r'(src|href)="(https?:)?//', page) and "@import" not in page
    assert "<script>" in page and "sortable" in page
    md = files["report.md"].read_text()
    for p in pngs:
        assert f"]({p.relative_to(tmp_path / 'out').as_posix()})" in md


def test_runs_with_different_methods_line_up_in_one_table(real_runs, tmp_path):
    extra = [write_run(tmp_path / "b-prox", method="fedprox", adapter="lora", epsilon=0.5,
                       codecs={"up": "int8", "down": "topk"}),
             write_run(tmp_path / "a-prox", method="fedprox", adapter="ia3")]
    files = make_report([*real_runs, *extra], tmp_path / "out")
    rows = list(csv.DictReader(files["runs.csv"].open()))
    assert len(rows) == 4
    assert [(r["method"], r["adapter"]) for r in rows] == [
        ("fedavg", "loha"), ("fedavg", "lora"), ("fedprox", "ia3"), ("fedprox", "lora")]
    dp = next(r for r in rows if r["run"] == "b-prox")
    assert float(dp["epsilon"]) == pytest.approx(1.5) and dp["codecs"] == "up=int8, down=topk"
    page = files["report.html"].read_text()
    table = page.split('<table class="sortable">')[1].split("</table>")[0]
    assert table.count("<tr>") == 1 + 4
    for run_dir in [*real_runs, *extra]:
        assert f">{run_dir.name}</td>" in table
    # absent codecs and ε are dashes, present ones are shown
    assert table.count('data-v="">—</td>') >= 2 * 3 and ">up=int8, down=topk<" in table and ">1.50<" in table
    assert (files["report.html"].parent / "plots" / "b-prox" / "epsilon_vs_round.png").is_file()
    assert not (files["report.html"].parent / "plots" / "a-prox" / "epsilon_vs_round.png").exists()


# ----- errors ------------------------------------------------------------------------------
def test_missing_run_dir_is_named(tmp_path):
    with pytest.raises(ReportError, match=re.escape(str(tmp_path / "nope"))):
        make_report([tmp_path / "nope"], tmp_path / "out")


def test_missing_comm_csv_is_named(tmp_path):
    run = write_run(tmp_path / "run")
    (run / "comm.csv").unlink()
    with pytest.raises(ReportError, match=rf"{re.escape(str(run))}: missing comm.csv"):
        load_run(run)


def test_corrupted_metrics_line_is_named(tmp_path):
    run = write_run(tmp_path / "run")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"round": 4, "accur\n')
    with pytest.raises(ReportError, match=rf"{re.escape(str(run / 'metrics.jsonl'))}: line 5 is not valid JSON"):
        load_run(run)


def test_non_numeric_bytes_are_named(tmp_path):
    run = write_run(tmp_path / "run")
    text = (run / "comm.csv").read_text().replace(",arrays,100\n", ",arrays,lots\n", 1)
    (run / "comm.csv").write_text(text)
    with pytest.raises(ReportError, match=rf"{re.escape(str(run / 'comm.csv'))}: line 2 has a non-integer"):
        load_run(run)


def test_corrupted_summary_is_named(tmp_path):
    run = write_run(tmp_path / "run")
    (run / "summary.json").write_text("{not json")
    with pytest.raises(ReportError, match=re.escape(str(run / "summary.json"))):
        load_run(run)


# ----- CLI ---------------------------------------------------------------------------------
def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedpeft.app.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "COLUMNS": "200"})


def test_cli_report_writes_files_and_names_bad_dirs(tmp_path):
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b", adapter="loha")
    proc = _cli(["report", str(a), str(b), "--out", str(tmp_path / "out"), "--target-accuracy", "0.5"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("report.html", "report.md", "runs.csv", "rounds.csv", "clients.csv"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    (b / "comm.csv").unlink()
    proc = _cli(["report", str(a), str(b), "--out", str(tmp_path / "out2")], tmp_path)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and str(b) in proc.stderr and "comm.csv" in proc.stderr
    assert not (tmp_path / "out2").exists()


def test_cli_compare_shares_seed_and_overrides_then_reports(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import fedpeft.app.simulate
    from fedpeft.app.cli import app

    seen = []

    def fake_simulate(cfg, on_round=None, verbose=False, on_start=None):
        seen.append(cfg)
        run = write_run(tmp_path / "runs" / f"{cfg.name}-{len(seen)}", adapter=cfg.adapter.type)
        for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
            on_round({**m, "bytes_down": 0, "bytes_up": 0})
        summary = {"run_dir": str(run), "final_accuracy": 0.9, "bytes_total": 1}
        (run / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(fedpeft.app.simulate, "simulate", fake_simulate)
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", str(SMOKE), str(SMOKE), "--seed", "11", "--set", "sim.rounds=3",
                                      "--set", "train.lr=0.003", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [c.sim.seed for c in seen] == [11, 11] and all(c.train.lr == 0.003 for c in seen)
    assert len(list(csv.DictReader((out / "runs.csv").open()))) == 2


def test_cli_compare_checks_every_recipe_before_running(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(SMOKE.read_text().replace("lr = 0.01", "lrr = 0.01"))
    proc = _cli(["compare", str(SMOKE), str(bad), "--set", f'output.dir="{tmp_path}/runs"'], tmp_path)
    assert proc.returncode == 2 and "unknown key 'train.lrr'" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_interrupted_run_without_summary_is_reported_with_dashes(tmp_path):
    run = write_run(tmp_path / "run")
    (run / "summary.json").unlink()
    files = make_report([run], tmp_path / "out")
    row = next(csv.DictReader(files["runs.csv"].open()))
    assert row["full_model_ratio"] == "" and row["method"] == "fedavg"
    assert int(row["bytes_down"]) == ledger_sums(run)["down"]
    (run / "config.toml").unlink()
    with pytest.raises(ReportError, match=re.escape(str(run))):
        load_run(run)


def test_same_named_runs_from_different_folders_are_told_apart(tmp_path):
    a, b = write_run(tmp_path / "x" / "run"), write_run(tmp_path / "y" / "run", adapter="loha")
    files = make_report([a, b], tmp_path / "out")
    assert sorted(r["run"] for r in csv.DictReader(files["runs.csv"].open())) == ["x/run", "y/run"]
    with pytest.raises(ReportError, match="given twice"):
        make_report([a, a], tmp_path / "out2")

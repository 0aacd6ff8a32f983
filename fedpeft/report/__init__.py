"""Communication-cost reports of one run or a comparison of runs (HTML, Markdown, CSV, PNG)."""

from __future__ import annotations

from pathlib import Path

from fedpeft.report.load import ReportError, Run, load_run, load_runs
from fedpeft.report.tables import DEFAULT_TARGET, RunStats, run_stats

__all__ = ["DEFAULT_TARGET", "ReportError", "Run", "RunStats", "load_run", "load_runs", "make_report", "run_stats"]


def make_report(run_dirs: list[str | Path], out: str | Path, target_fraction: float = DEFAULT_TARGET) -> dict[str, Path]:
    """Load run directories, compute their numbers from the ledgers and write the report files into `out`."""
    from fedpeft.report.render import write_report

    if not 0 < target_fraction <= 1:
        raise ReportError(f"the target must be a fraction of each run's final primary metric (accuracy, Rouge-L) "
                          f"in (0, 1], got {target_fraction} (use 0.9 for 90 %)")
    stats = [run_stats(r, target_fraction) for r in load_runs(list(run_dirs))]
    return write_report(stats, Path(out))

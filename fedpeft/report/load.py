"""Read and validate a run directory for reporting: metrics, ledger, summary and config."""

from __future__ import annotations

import csv
import json
import math
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.ledger import COLUMNS
from fedpeft.ledger import LedgerRow as LedgerRecord  # the ledger's own row type, read back
from fedpeft.rundir import (
    COMM_FILE, CONFIG_FILE, EVENT_KEY, GENERATIONS_FILE, METRICS_FILE, SUMMARY_FILE, describe_status, read_status,
)
from fedpeft.scores import metric_label, primary_metric

DIRECTIONS = ("down", "up")


class ReportError(ValueError):
    """A run directory cannot be reported; the message names the directory and the bad or missing file."""


@dataclass
class Run:
    """Everything a report needs from one run directory."""

    path: Path
    metrics: list[dict[str, Any]]
    ledger: list[LedgerRecord]
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    status: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl lines keyed `event`
    # causal-lm: generations.jsonl by round (prompt, reference, generated), for the side-by-side samples
    generations: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def stopped(self) -> dict[str, Any] | None:
        """The record of an early stop (the communication budget) from summary.json or metrics.jsonl, or None."""
        if isinstance(self.summary.get("stopped"), dict):
            return self.summary["stopped"]
        return next((e for e in self.events if "reason" in e), None)

    @property
    def incomplete(self) -> str | None:
        """Why the run did not complete (failed, interrupted, …), or None."""
        return describe_status(self.status)

    @property
    def label(self) -> str:
        """The run's name in tables and legends: its directory name unless set to tell runs apart."""
        return self.name or self.path.name

    @property
    def method(self) -> str:
        """The federated method (from the config, else the summary)."""
        return str(self.config.get("method", {}).get("name") or self.summary.get("method") or "?")

    @property
    def adapter(self) -> str:
        """The peft adapter type (from the config, else the summary)."""
        return str(self.config.get("adapter", {}).get("type") or self.summary.get("adapter") or "?")

    @property
    def primary_metric(self) -> str:
        """The metric the run is scored by ("accuracy", "rouge_l", …); accuracy for runs that do not say."""
        return primary_metric(self.summary, self.config)


def load_run(path: str | Path) -> Run:
    """Load and validate one run directory, raising `ReportError` naming what is wrong."""
    p = Path(path)
    if not p.exists():
        raise ReportError(f"run directory not found: {p}")
    if not p.is_dir():
        raise ReportError(f"not a run directory (a file, not a folder): {p}")
    status = read_status(p)
    why = describe_status(status)
    if why and not _has_rounds(p / METRICS_FILE):
        raise ReportError(f"{p}: the run {why}; there is nothing to report.")
    # summary.json and config.toml are optional on their own: an interrupted run has no
    # summary, yet its rounds and ledger are still worth a report.
    summary = _read_json(p / SUMMARY_FILE) if (p / SUMMARY_FILE).is_file() else {}
    config = _read_toml(p / CONFIG_FILE) if (p / CONFIG_FILE).is_file() else {}
    metrics, events = _read_metrics(p / METRICS_FILE, primary_metric(summary, config))
    ledger = _read_ledger(p / COMM_FILE)
    if not summary and not config:
        raise ReportError(f"{p}: neither {SUMMARY_FILE} nor {CONFIG_FILE} is present, so the method and adapter are unknown")
    generations = _read_generations(p / GENERATIONS_FILE) if (p / GENERATIONS_FILE).is_file() else {}
    return Run(path=p, metrics=metrics, ledger=ledger, summary=summary, config=config, status=status,
               events=events, generations=generations)


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Load several run directories, in the order given."""
    if not paths:
        raise ReportError("no run directory given")
    runs = [load_run(p) for p in paths]
    seen: dict[Path, Path] = {}
    for run in runs:
        real = run.path.resolve()
        if real in seen:
            raise ReportError(f"run directory given twice: {seen[real]} and {run.path}")
        seen[real] = run.path
    # Runs from different folders may share a directory name; the parent folder tells them apart.
    names = [r.path.name for r in runs]
    for run in runs:
        if names.count(run.path.name) > 1:
            run.name = f"{run.path.resolve().parent.name}/{run.path.name}"
    if len({r.label for r in runs}) < len(runs):
        raise ReportError("run directories with the same name in same-named folders: " + ", ".join(map(str, paths)))
    return runs


def _has_rounds(path: Path) -> bool:
    try:
        return any(line.strip() for line in path.read_text().splitlines())
    except OSError:
        return False


def _missing(path: Path) -> ReportError:
    return ReportError(f"{path.parent}: missing {path.name} (is this a fedpeft run directory?)")


def _json_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSON Lines file; anything else is a ReportError."""
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReportError(f"{path}: line {n} is not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path}: line {n} is not a JSON object")
        yield n, row


def _read_metrics(path: Path, metric: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if not path.is_file():
        raise _missing(path)
    rows: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for n, row in _json_objects(path):
        if EVENT_KEY in row:  # a run-level note (e.g. a communication budget stop), not a round
            events.append(row)
            continue
        if not _is_number(row.get("round")):
            raise ReportError(f"{path}: line {n} has no numeric 'round'")
        if not _is_number(row.get("loss")):
            row["loss"] = math.nan
        # Causal-LM runs score only their generation rounds, so a round may lack the metric;
        # a value that is there must be a number.
        if metric in row and not _is_number(row[metric]):
            raise ReportError(f"{path}: line {n} has a non-numeric '{metric}' ({row[metric]!r})")
        rows.append(row)
    if not rows:
        raise ReportError(f"{path}: no rounds recorded")
    if not any(metric in row for row in rows):
        raise ReportError(f"{path}: no round has a '{metric}' value "
                          f"({metric_label(metric)} is the run's primary metric)")
    rounds = [r["round"] for r in rows]
    if rounds != sorted(set(rounds)):
        raise ReportError(f"{path}: rounds are not strictly increasing ({rounds})")
    return rows, events


def _read_generations(path: Path) -> dict[int, list[dict[str, Any]]]:
    """Each generation round's samples in file order.

    Every round generates from the same prompts, so a round with more rows than the shortest one was
    generated again (a run killed after writing it and resumed before it): its last rows are kept.
    """
    rounds: dict[int, list[dict[str, Any]]] = {}
    for n, row in _json_objects(path):
        if not _is_number(row.get("round")):
            raise ReportError(f"{path}: line {n} has no numeric 'round'")
        rounds.setdefault(int(row["round"]), []).append(row)
    size = min((len(rows) for rows in rounds.values()), default=0)
    return {rnd: rows[len(rows) - size:] for rnd, rows in rounds.items()}


def _read_ledger(path: Path) -> list[LedgerRecord]:
    if not path.is_file():
        raise _missing(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or any(c not in reader.fieldnames for c in COLUMNS):
            raise ReportError(f"{path}: header must contain {', '.join(COLUMNS)} (got {reader.fieldnames})")
        out: list[LedgerRecord] = []
        for n, row in enumerate(reader, start=2):
            try:
                rec = LedgerRecord(
                    round=int(row["round"]), client_id=int(row["client_id"]), node_id=int(row["node_id"]),
                    direction=row["direction"], message_type=row["message_type"], record=row["record"],
                    bytes=int(row["bytes"]),
                )
            except (TypeError, ValueError):
                raise ReportError(f"{path}: line {n} has a non-integer round, client_id, node_id or bytes: {row}") from None
            if rec.direction not in DIRECTIONS:
                raise ReportError(f"{path}: line {n} has direction {rec.direction!r} (expected down or up)")
            if rec.bytes < 0:
                raise ReportError(f"{path}: line {n} has negative bytes ({rec.bytes})")
            out.append(rec)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return data


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ReportError(f"{path}: not valid TOML ({err})") from None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)

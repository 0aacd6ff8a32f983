"""The run directory: resolved config, per-round metrics, ledger, checkpoints, final adapter, summary."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from fedpeft.config import Config

if TYPE_CHECKING:
    from peft import PeftModel

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
GENERATIONS_FILE = "generations.jsonl"  # causal-lm: what the global model generated on each scored round
COMM_FILE = "comm.csv"
PRIVACY_FILE = "privacy.csv"
SUMMARY_FILE = "summary.json"
STATUS_FILE = "status.json"
LOG_FILE = "run.log"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
TASK_DIR = "data"
# A metrics.jsonl line with this key records an event (e.g. a stop at the communication budget), not a round.
EVENT_KEY = "event"


class RunDir:
    """Files of one run under `runs/<name>-<timestamp>/`; every file is written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, cfg: Config) -> "RunDir":
        """Make a fresh, uniquely named run directory and write the resolved config into it."""
        root = Path(cfg.output.dir)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = root / f"{cfg.name}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = root / f"{cfg.name}-{stamp}-{n}"
        path.mkdir(parents=True)
        rd = cls(path)
        # exclude_none: TOML has no null (unset optional keys such as dp.delta stay unset)
        rd.write_text(CONFIG_FILE, tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)))
        rd.write_status("running", pid=os.getpid(), host=socket.gethostname())
        return rd

    # ----- paths ----------------------------------------------------------------------------
    @property
    def log_file(self) -> Path:
        """Flower's and Ray's log lines and the traceback of an error (`run.log`)."""
        return self.path / LOG_FILE

    @property
    def comm_csv(self) -> Path:
        """The communication ledger."""
        return self.path / COMM_FILE

    @property
    def privacy_csv(self) -> Path:
        """The privacy ledger (DP runs only)."""
        return self.path / PRIVACY_FILE

    @property
    def task_dir(self) -> Path:
        """The tokenized task shared with worker processes."""
        return self.path / TASK_DIR

    @property
    def adapter_dir(self) -> Path:
        """The final global adapter in peft format."""
        return self.path / ADAPTER_DIR

    # ----- writers --------------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> None:
        """Write a file atomically (a crash leaves the old file or the new one, never half of one)."""
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, self.path / name)

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one round's metrics (or an event, keyed `event`) as a JSON line."""
        with (self.path / METRICS_FILE).open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def write_generations(self, server_round: int, samples: list[dict[str, Any]]) -> None:
        """Append one generation round's held-out prompts, references and generated responses."""
        with (self.path / GENERATIONS_FILE).open("a") as f:
            for sample in samples:
                f.write(json.dumps({"round": server_round, **sample}) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write the run summary; the run is then complete (and says so if its budget stopped it early)."""
        self.write_text(SUMMARY_FILE, json.dumps(summary, indent=2))
        self.write_status("completed", **({"stopped": summary["stopped"]} if summary.get("stopped") else {}))

    def write_status(self, status: str, **fields: Any) -> None:
        """Record where the run stands in `status.json`: running, completed, failed or interrupted."""
        rounds = [r.get("round") for r in self.metrics()]
        doc = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "last_round": max(rounds) if rounds else None, **fields}
        self.write_text(STATUS_FILE, json.dumps(doc, indent=2))

    def mark_failed(self, error: str, where: str = "", expected: bool = False) -> None:
        """Record that the run stopped on an error (the traceback, if any, is in run.log)."""
        self.write_status("failed", error=error, where=where, expected=expected, log=LOG_FILE)

    def save_adapter(self, model: "PeftModel", dest: Path) -> None:
        """Save the model's adapter with peft (`PeftModel.from_pretrained` reloads it), atomically."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        model.save_pretrained(str(tmp), save_embedding_layers=False)  # frozen base weights stay out
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)

    def checkpoint(self, model: "PeftModel", server_round: int) -> Path:
        """Save the global adapter after `server_round` under checkpoints/."""
        dest = self.path / CHECKPOINT_DIR / f"round-{server_round:04d}"
        self.save_adapter(model, dest)
        return dest

    # ----- readers --------------------------------------------------------------------------
    def metrics(self) -> list[dict[str, Any]]:
        """Every round's metrics row written so far (event lines left out)."""
        return [r for r in self._metrics_lines() if EVENT_KEY not in r]

    def events(self) -> list[dict[str, Any]]:
        """The event lines of metrics.jsonl (e.g. the stop at the communication budget)."""
        return [r for r in self._metrics_lines() if EVENT_KEY in r]

    def _metrics_lines(self) -> list[dict[str, Any]]:
        path = self.path / METRICS_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def summary(self) -> dict[str, Any]:
        """The run summary."""
        return json.loads((self.path / SUMMARY_FILE).read_text())

    def status(self) -> dict[str, Any]:
        """The run's status record; for a run directory from before status.json, inferred from its files."""
        return read_status(self.path)


def read_status(path: Path) -> dict[str, Any]:
    """`status.json` of a run directory, or {"status": "completed"|"unknown"} when it has none.

    A run recorded as running whose process is gone (same host, no such pid) is reported as
    `status = "stopped"`: it ended without recording why (killed, or the machine went down).
    """
    path = Path(path)
    try:
        doc = json.loads((path / STATUS_FILE).read_text())
        if not isinstance(doc, dict) or "status" not in doc:
            raise ValueError
    except (OSError, ValueError):
        return {"status": "completed" if (path / SUMMARY_FILE).is_file() else "unknown"}
    doc = {**doc, "log": LOG_FILE if (path / LOG_FILE).is_file() else None}
    if doc["status"] == "running" and doc.get("host") == socket.gethostname() and isinstance(doc.get("pid"), int):
        if not _alive(doc["pid"]):
            doc["status"] = "stopped"
    return doc


def describe_status(doc: dict[str, Any]) -> str | None:
    """A sentence about a run that did not complete (None when it completed or nothing is known)."""
    status = doc.get("status")
    last = doc.get("last_round")
    upto = f" after round {last}" if last is not None else " before round 0 was recorded"
    see = f"; see its {doc['log']}" if doc.get("log") else ""
    if status == "failed":
        where = f" (raised at {doc['where']})" if doc.get("where") else ""
        return f"failed{upto}: {doc.get('error', 'unknown error')}{where}{see}"
    if status == "interrupted":
        return f"was interrupted (Ctrl-C){upto}"
    if status == "stopped":
        return f"stopped{upto} without recording why (its process {doc.get('pid')} is gone: killed?){see}"
    if status == "running":
        return f"is still running (process {doc.get('pid')} on {doc.get('host')}){upto}"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""The privacy ledger, next to comm.csv: each DP-SGD client's ε after every round it trained in
(level `sample`), and the run's user-level ε after every round (level `user`, client_id -1).

A client spends ε when it trains, whether or not the server uses its reply, so the ledger logs
every reply that carries ε with its `status`: `accepted`, `rejected` (failed validation) or
`round-failed` (valid, but the round had too few valid replies to aggregate). A reply that never
reaches the strategy (lost, timed out, refused as oversized) cannot be logged here; its ε is not
lost though: the client keeps its accountant history in its state store
(`sample_level.account_round`), so its next reply reports the cumulative ε, earlier lost rounds
included. `noise` says where a client's DP draws came from: `seeded` (reproducible from the run
seed, `fedpeft simulate`) or `os` (OS entropy, unknown to the server).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import RecordDict
from flwr.supercore import log

from fedpeft.privacy.sample_level import NOISE_SEEDED

COLUMNS = ["round", "client_id", "epsilon", "delta", "noise_multiplier", "steps", "sample_rate", "level", "status",
           "noise"]

# Set by the strategy on the metrics it hands to the ledger; a client cannot set it (metric values
# are numbers, statuses are strings), and anything else reads as accepted.
STATUS = "ledger-status"
ACCEPTED, REJECTED, ROUND_FAILED = "accepted", "rejected", "round-failed"
STATUSES = (ACCEPTED, REJECTED, ROUND_FAILED)


def spent(content: RecordDict, status: str) -> dict[str, Any] | None:
    """The metrics of a reply that carries ε, tagged with `status`; None if no metric record of it has ε."""
    for record in content.metric_records.values():
        if "epsilon" in record:
            return {**dict(record), STATUS: status}
    return None


def _number(m: dict[str, Any], key: str, default: float = 0.0) -> float | None:
    value = m.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


class PrivacyLedger:
    """Appends one row per (round, DP reply) and keeps each client's largest reported ε."""

    def __init__(self, path: Path) -> None:
        """A ledger appending to `path`; each client's ε is taken up from rows already there (a resumed run)."""
        self.path = Path(path)
        self.latest: dict[int, float] = {}
        self.noise: set[str] = set()
        for r in read_ledger(self.path):
            if r["level"] == "sample":
                self.latest[r["client_id"]] = max(r["epsilon"], self.latest.get(r["client_id"], 0.0))
                self.noise.update([r["noise"]] if r["noise"] else [])

    def record(self, server_round: int, client_metrics: Iterable[tuple[int, dict[str, Any]]]) -> list[float]:
        """Log the round's DP replies (those carrying `epsilon`, whatever their status); returns their ε values."""
        rows = []
        for cid, m in client_metrics:
            if "epsilon" not in m:
                continue
            eps = _number(m, "epsilon")
            fields = [_number(m, k) for k in ("delta", "noise-multiplier", "dp-steps", "sample-rate")]
            if eps is None or None in fields:  # a malformed reply: nothing trustworthy to log
                log(WARNING, "round %d: client %d reported a non-numeric ε or DP figure; not logged", server_round, cid)
                continue
            delta, nm, steps, q = fields
            status = m.get(STATUS) if m.get(STATUS) in STATUSES else ACCEPTED
            noise = "" if NOISE_SEEDED not in m else "seeded" if m[NOISE_SEEDED] == 1 else "os"
            rows.append([server_round, cid, eps, delta, nm, int(steps), q, "sample", status, noise])
        if not rows:
            return []
        self._append(rows)
        for r in rows:
            # ε is cumulative on the client, so the largest report is its latest honest one.
            self.latest[int(r[1])] = max(float(r[2]), self.latest.get(int(r[1]), 0.0))
            self.noise.update([r[9]] if r[9] else [])
        return [float(r[2]) for r in rows]

    def record_user(self, server_round: int, p: dict[str, float]) -> None:
        """Log the run's user-level ε after `server_round` (from `UserLevelDP.report()`)."""
        self._append([[server_round, -1, p["user_epsilon"], p["user_delta"], p["user_noise_multiplier"],
                       int(p["user_releases"]), p["user_sample_rate"], "user", ACCEPTED, ""]])

    def _append(self, rows: list[list[Any]]) -> None:
        header = _header(self.path)
        with self.path.open("a", newline="") as f:
            w = csv.writer(f)
            if header is None:
                w.writerow(COLUMNS)
                header = COLUMNS
            # A ledger begun before a column existed (a resumed older run) keeps its own columns.
            keep = [COLUMNS.index(c) for c in header if c in COLUMNS]
            w.writerows([[r[i] for i in keep] for r in rows])

    def summary(self) -> dict[str, Any]:
        """Max and median of every client's ε, and where its DP noise came from ({} when no client ran DP)."""
        out: dict[str, Any] = epsilon_stats(list(self.latest.values()))
        if out and self.noise:
            out["sample_noise_source"] = next(iter(self.noise)) if len(self.noise) == 1 else "mixed"
        return out


def _header(path: Path) -> list[str] | None:
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with path.open(newline="") as f:
        return next(csv.reader(f), None)


def epsilon_stats(values: list[float]) -> dict[str, float]:
    """`epsilon_max` / `epsilon_median` of `values` ({} when empty)."""
    if not values:
        return {}
    return {"epsilon_max": max(values), "epsilon_median": float(statistics.median(values))}


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """The ledger's rows with typed values (in ledgers older than a column: status `accepted`, noise "")."""
    if not Path(path).is_file():
        return []
    with Path(path).open() as f:
        return [{"round": int(r["round"]), "client_id": int(r["client_id"]), "epsilon": float(r["epsilon"]),
                 "delta": float(r["delta"]), "noise_multiplier": float(r["noise_multiplier"]),
                 "steps": int(r["steps"]), "sample_rate": float(r["sample_rate"]), "level": r.get("level", "sample"),
                 "status": r.get("status") or ACCEPTED, "noise": r.get("noise") or ""}
                for r in csv.DictReader(f)]

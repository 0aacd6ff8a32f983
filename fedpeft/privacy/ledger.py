"""The privacy ledger, next to comm.csv: each DP-SGD client's ε after every round it trained in
(level `sample`), and the run's user-level ε after every round (level `user`, client_id -1)."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

COLUMNS = ["round", "client_id", "epsilon", "delta", "noise_multiplier", "steps", "sample_rate", "level"]


class PrivacyLedger:
    """Appends one row per (round, DP client) and keeps each client's latest ε."""

    def __init__(self, path: Path) -> None:
        """A ledger appending to `path`; each client's latest ε is taken up from rows already there (a resumed run)."""
        self.path = Path(path)
        self.latest: dict[int, float] = {
            r["client_id"]: r["epsilon"] for r in read_ledger(self.path) if r["level"] == "sample"}

    def record(self, server_round: int, client_metrics: Iterable[tuple[int, dict[str, Any]]]) -> list[float]:
        """Log the round's DP replies (those carrying `epsilon`); returns their ε values."""
        rows = [
            [server_round, cid, float(m["epsilon"]), float(m.get("delta", 0.0)), float(m.get("noise-multiplier", 0.0)),
             int(m.get("dp-steps", 0)), float(m.get("sample-rate", 0.0)), "sample"]
            for cid, m in client_metrics if "epsilon" in m
        ]
        if not rows:
            return []
        self._append(rows)
        for r in rows:
            self.latest[int(r[1])] = float(r[2])
        return [float(r[2]) for r in rows]

    def record_user(self, server_round: int, p: dict[str, float]) -> None:
        """Log the run's user-level ε after `server_round` (from `UserDPStrategy.privacy()`)."""
        self._append([[server_round, -1, p["user_epsilon"], p["user_delta"], p["user_noise_multiplier"],
                       int(p["user_releases"]), p["user_sample_rate"], "user"]])

    def _append(self, rows: list[list[Any]]) -> None:
        new = not self.path.is_file()
        with self.path.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(COLUMNS)
            w.writerows(rows)

    def summary(self) -> dict[str, float]:
        """Max and median of every client's latest ε ({} when no client ran DP)."""
        return epsilon_stats(list(self.latest.values()))


def epsilon_stats(values: list[float]) -> dict[str, float]:
    """`epsilon_max` / `epsilon_median` of `values` ({} when empty)."""
    if not values:
        return {}
    return {"epsilon_max": max(values), "epsilon_median": float(statistics.median(values))}


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """The ledger's rows with typed values."""
    if not Path(path).is_file():
        return []
    with Path(path).open() as f:
        return [{"round": int(r["round"]), "client_id": int(r["client_id"]), "epsilon": float(r["epsilon"]),
                 "delta": float(r["delta"]), "noise_multiplier": float(r["noise_multiplier"]),
                 "steps": int(r["steps"]), "sample_rate": float(r["sample_rate"]), "level": r.get("level", "sample")}
                for r in csv.DictReader(f)]

"""What a tracker receives for a round: every number of the round's metrics row, grouped, with bytes in MiB.

Groups: `eval/` (held-out scores), `train/loss`, `comm/` (bytes as MiB: this round's and the run's
cumulative, down, up and total, computed from the row's raw byte counts), `privacy/` (ε, δ),
`clients/` (participation), `time/` (seconds), `secagg/`, and `method/` for whatever a method adds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpeft.ledger import MIB

EVAL = {"accuracy", "loss", "perplexity", "rouge_l", "exact_match", "mc_accuracy", "mc_accuracy_norm"}
CLIENTS = {"clients", "sampled", "accepted", "rejected", "workers_replaced", "client_retries"}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _name(key: str) -> str:
    """The grouped name of a row key (bytes keys are renamed `..._mib` by the caller)."""
    if key == "train_loss":
        return "train/loss"
    if key in EVAL:
        group = "eval"
    elif key.startswith("bytes"):
        group = "comm"
    elif key.startswith(("epsilon", "user_")) or key == "delta":
        group = "privacy"
    elif key.startswith("secagg_"):
        group = "secagg"
    elif key in CLIENTS:
        group = "clients"
    elif key.endswith("_s"):
        group = "time"
    else:
        group = "method"
    return f"{group}/{key}"


class RoundMetrics:
    """Turns metrics rows, fed in round order, into tracker metrics (keeping the cumulative byte counts)."""

    def __init__(self, privacy_csv: Path) -> None:
        self.privacy_csv = Path(privacy_csv)
        self.down = 0
        self.up = 0
        self.delta: float | None = None

    def __call__(self, row: dict[str, Any]) -> dict[str, float]:
        """The metrics of one round's row (rows must come in round order: bytes accumulate)."""
        out: dict[str, float] = {}
        down, up = int(row.get("bytes_down", 0)), int(row.get("bytes_up", 0))
        self.down += down
        self.up += up
        out.update({"comm/round_bytes_down_mib": down / MIB, "comm/round_bytes_up_mib": up / MIB,
                    "comm/round_bytes_total_mib": (down + up) / MIB, "comm/bytes_down_mib": self.down / MIB,
                    "comm/bytes_up_mib": self.up / MIB, "comm/bytes_total_mib": (self.down + self.up) / MIB})
        for key, value in row.items():
            if key in ("round", "bytes_down", "bytes_up"):
                continue
            for sub, number in self._numbers(key, value):
                out[sub] = number
        if "epsilon_max" in row and (delta := self._sample_delta()) is not None:
            out["privacy/delta"] = delta
        return out

    def _numbers(self, key: str, value: Any) -> list[tuple[str, float]]:
        """(name, value) for a number, or for each number of a flat mapping (e.g. per-tier bytes)."""
        scale, unit = (MIB, "_mib") if key.startswith("bytes") else (1.0, "")
        name = _name(key) + unit
        if isinstance(value, dict):
            pairs = [(f"{name}/{k}", _number(v)) for k, v in value.items()]
        else:
            pairs = [(name, _number(value))]
        return [(n, v / scale) for n, v in pairs if v is not None]

    def _sample_delta(self) -> float | None:
        """Sample-level DP's δ (one for every client), read once from the privacy ledger."""
        if self.delta is None:
            from fedpeft.privacy.ledger import read_ledger

            rows = [r for r in read_ledger(self.privacy_csv) if r["level"] == "sample"]
            self.delta = rows[0]["delta"] if rows else None
        return self.delta

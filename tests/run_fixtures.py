"""Hand-written run directories and checks on them, shared by the report tests."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from matplotlib.image import imread

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(path: Path, *, method: str = "fedavg", adapter: str = "lora", accuracy=(0.1, 0.5, 0.8, 0.9),
              epsilon=None, codecs=None, full_model_message_bytes: int = 1000) -> Path:
    """A hand-written run directory: 2 clients a round, known bytes per record."""
    path.mkdir(parents=True)
    rows = [["round", "client_id", "node_id", "direction", "message_type", "record", "bytes"]]
    metrics = []
    for rnd, acc in enumerate(accuracy):
        m = {"round": rnd, "accuracy": acc, "loss": 2.0 - acc, "clients": 0 if rnd == 0 else 2, "rejected": 0}
        if rnd:
            for cid in (rnd % 3, (rnd + 1) % 3):
                node = 100 + cid
                rows += [[rnd, cid, node, "down", "train", "arrays", 100 * rnd],
                         [rnd, cid, node, "down", "train", "config", 7],
                         [rnd, cid, node, "down", "train", "_envelope", 20],
                         [rnd, cid, node, "up", "train", "arrays", 90 + cid],
                         [rnd, cid, node, "up", "train", "metrics", 5],
                         [rnd, cid, node, "up", "train", "_envelope", 21]]
            m["train_loss"] = 1.0 / rnd
        if epsilon is not None:
            m["epsilon_max"] = epsilon * rnd
            m["epsilon_median"] = epsilon * rnd / 2
        metrics.append(m)
    with (path / "comm.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    summary = {"name": path.name, "method": method, "adapter": adapter, "rounds": len(accuracy) - 1,
               "full_model_message_bytes": full_model_message_bytes, "wall_s": 1.5,
               # deliberately wrong: the report must take bytes from the ledger, not from here
               "bytes_down": 1, "bytes_up": 1, "bytes_total": 2}
    (path / "summary.json").write_text(json.dumps(summary))
    cfg = f'name = "{path.name}"\n[method]\nname = "{method}"\n[adapter]\ntype = "{adapter}"\n'
    if codecs:
        cfg += "[codecs]\n" + "".join(f'{k} = "{v}"\n' for k, v in codecs.items())
    (path / "config.toml").write_text(cfg)
    return path


def ledger_sums(run_dir: Path) -> dict:
    """Figures computed straight from comm.csv, independently of fedpeft.report."""
    with (run_dir / "comm.csv").open() as f:
        rows = list(csv.DictReader(f))
    out = {"down": 0, "up": 0, "participations": 0, "per_round": {}, "per_client": {}}
    for r in rows:
        b, d, rnd, cid = int(r["bytes"]), r["direction"], int(r["round"]), int(r["client_id"])
        out[d] += b
        out["per_round"].setdefault(rnd, {"down": 0, "up": 0})[d] += b
        out["per_client"].setdefault(cid, {"down": 0, "up": 0})[d] += b
        if d == "up" and r["record"] == "_envelope" and rnd >= 1:
            out["participations"] += 1
    return out


def bytes_to_target(run_dir: Path, fraction: float) -> tuple[int, int]:
    """(round, cumulative bytes) at the first round reaching fraction × final accuracy, from the files."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sums = ledger_sums(run_dir)["per_round"]
    target = fraction * metrics[-1]["accuracy"]
    first = next(m["round"] for m in metrics if m["accuracy"] >= target)
    return first, sum(v["down"] + v["up"] for r, v in sums.items() if r <= first)


def assert_real_png(data: bytes) -> None:
    """A valid PNG of reasonable size that is not one flat colour."""
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 2000
    img = imread(io.BytesIO(data), format="png")
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 10


# ----- numbers -----------------------------------------------------------------------------

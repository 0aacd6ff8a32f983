"""Per-node data files written from a recipe: client k's simulation partition, as the node would hold it."""

from __future__ import annotations

import json
from pathlib import Path

from fedpeft.config import Config
from fedpeft.data.partitioning import partition_indices
from fedpeft.data.sources import load_raw


def write_shards(cfg: Config, out_dir: Path) -> list[Path]:
    """Write `client-<k>.jsonl` for every client of the recipe; returns the paths in client-id order.

    The rows are exactly the ones client k trains on in simulation (same loader, partitioner and
    seed), with the recipe's text/label column names and class names as labels, so a deployed
    node reading its shard through its node config sees the same examples.
    """
    raw = load_raw(cfg.data, cfg.sim.seed)
    parts = partition_indices(raw.train, cfg.partition, cfg.sim.num_clients, cfg.sim.seed)
    texts, labels = raw.train["text"], raw.train["label"]
    text_col, label_col = cfg.data.text_column, cfg.data.label_column
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for cid, rows in enumerate(parts):
        path = out_dir / f"client-{cid}.jsonl"
        with path.open("w") as f:
            for i in rows:
                f.write(json.dumps({text_col: texts[i], label_col: raw.label_names[labels[i]]}) + "\n")
        paths.append(path)
    return paths

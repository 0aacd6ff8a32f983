"""Per-node data files written from a recipe: client k's simulation partition, as the node would hold it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset

from fedpeft.config import Config
from fedpeft.data.instructions import load_instructions
from fedpeft.data.partitioning import partition_indices
from fedpeft.data.sources import load_raw


def write_shards(cfg: Config, out_dir: Path) -> list[Path]:
    """Write `client-<k>.jsonl` for every client of the recipe; returns the paths in client-id order.

    The rows are exactly the ones client k trains on in simulation (same loader, partitioner and
    seed), with the recipe's text/label column names and class names as labels (a causal LM's:
    instruction / input / output records), so a deployed node reading its shard through its node
    config sees the same examples.
    """
    records, train = _records(cfg)
    parts = partition_indices(train, cfg.partition, cfg.sim.num_clients, cfg.sim.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for cid, rows in enumerate(parts):
        path = out_dir / f"client-{cid}.jsonl"
        with path.open("w") as f:
            for i in rows:
                f.write(json.dumps(records(i)) + "\n")
        paths.append(path)
    return paths


def _records(cfg: Config) -> tuple[Callable[[int], dict], Dataset]:
    """Row i of the training split as a node's file holds it, and the split (partitioned as in simulation)."""
    if cfg.model.kind == "causal-lm":
        raw = load_instructions(cfg.data, cfg.sim.seed)
        cols = {"instruction": "instruction", "input": "input", "output": "output"}
        cols.update({k: v for k, v in (("instruction", cfg.data.instruction_column), ("input", cfg.data.input_column),
                                       ("output", cfg.data.output_column)) if v})
        table = {field: raw.train[field] for field in cols}
        return (lambda i: {cols[field]: table[field][i] for field in cols}), raw.train
    raw = load_raw(cfg.data, cfg.sim.seed)
    texts, labels = raw.train["text"], raw.train["label"]
    text_col, label_col = cfg.data.text_column, cfg.data.label_column
    return (lambda i: {text_col: texts[i], label_col: raw.label_names[labels[i]]}), raw.train

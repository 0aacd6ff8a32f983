"""The tokenized task, written once per run and memory-mapped by every worker process."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from datasets import Dataset, load_from_disk

from fedpeft.config import Config
from fedpeft.data.instruction_task import tokenize_instructions
from fedpeft.data.instructions import load_instructions
from fedpeft.data.partitioning import partition_indices
from fedpeft.data.prompts import IGNORE_INDEX, special_ids
from fedpeft.data.sources import DataError, load_raw
from fedpeft.seeding import rng

META_FILE = "task.json"
# Bumped when what `prepare` writes changes, so caches keyed by the config are not reused across it
# (2: labels are always int64 class indices, whatever the source column's type was; 3: causal-lm tasks).
TASK_FORMAT = 3


@dataclass
class PreparedTask:
    """Tokenized train/test splits, client partitions and class names."""

    train: Dataset
    test: Dataset
    partitions: list[list[int]]
    label_names: list[str]
    pad_token_id: int
    kind: str = "classifier"  # model.kind the task was prepared for
    eos_token_id: int | None = None  # causal-lm: where generation stops

    @property
    def num_labels(self) -> int:
        """Number of classes (0 for a causal-LM task)."""
        return len(self.label_names)

    def client_dataset(self, client_id: int) -> Dataset:
        """The training examples held by one client."""
        if not 0 <= client_id < len(self.partitions):
            raise DataError(f"client id {client_id} out of range (0..{len(self.partitions) - 1})")
        return self.train.select(self.partitions[client_id])

    def local_split(self, client_id: int, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
        """A client's partition split into (train, local test) by a seeded shuffle.

        The local test part is round(test_fraction * n) examples, at least one and leaving at least
        one for training; a client with a single example has an empty local test part.
        """
        rows = self.client_dataset(client_id)
        n = len(rows)
        n_test = min(max(round(test_fraction * n), 1), n - 1) if n >= 2 else 0
        order = rng(seed, client_id, "local-test-split").permutation(n)
        return rows.select(sorted(order[n_test:].tolist())), rows.select(sorted(order[:n_test].tolist()))


def tokenize(ds: Dataset, tokenizer, max_length: int) -> Dataset:
    """Tokenize the `text` column once (no padding: batches are padded to their own longest row)."""

    def encode(batch: dict) -> dict:
        out = tokenizer(batch["text"], truncation=True, max_length=max_length)
        return {"input_ids": out["input_ids"]}

    return ds.map(encode, batched=True, remove_columns=["text"])


def prepare(cfg: Config, out_dir: Path) -> PreparedTask:
    """Load, partition and tokenize the task once, and save it under `out_dir`."""
    from fedpeft.models import load_tokenizer

    tok = load_tokenizer(cfg.model)
    train, test, parts, meta = _PREPARERS[cfg.model.kind](cfg, tok)
    out_dir.mkdir(parents=True, exist_ok=True)
    train.save_to_disk(str(out_dir / "train"))
    test.save_to_disk(str(out_dir / "test"))
    meta.update(format=TASK_FORMAT, kind=cfg.model.kind, partitions=parts, pad_token_id=tok.pad_token_id or 0)
    (out_dir / META_FILE).write_text(json.dumps(meta))
    return open_prepared(str(out_dir))


def _classification(cfg: Config, tok) -> tuple[Dataset, Dataset, list[list[int]], dict]:
    raw = load_raw(cfg.data, cfg.sim.seed)
    parts = partition_indices(raw.train, cfg.partition, cfg.sim.num_clients, cfg.sim.seed)
    keep = ["input_ids", "label"]
    train = tokenize(raw.train, tok, cfg.model.max_length).select_columns(keep)
    test = tokenize(raw.test, tok, cfg.model.max_length).select_columns(keep)
    bad = sorted({int(v) for v in test["label"]} - set(range(len(raw.label_names))))
    if bad:
        raise DataError(f"test labels {bad} do not occur in the training label set {raw.label_names}")
    return train, test, parts, {"label_names": raw.label_names}


def _instructions(cfg: Config, tok) -> tuple[Dataset, Dataset, list[list[int]], dict]:
    raw = load_instructions(cfg.data, cfg.sim.seed)
    parts = partition_indices(raw.train, cfg.partition, cfg.sim.num_clients, cfg.sim.seed)
    train = tokenize_instructions(raw.train, tok, cfg)
    test = tokenize_instructions(raw.test, tok, cfg)
    return train, test, parts, {"label_names": [], "eos_token_id": special_ids(tok)[1]}


_PREPARERS = {"classifier": _classification, "causal-lm": _instructions}


@lru_cache(maxsize=2)
def open_prepared(path: str) -> PreparedTask:
    """Open a prepared task (memory-mapped; cached per process)."""
    root = Path(path)
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise DataError(f"prepared task not found at {root} (missing {META_FILE})")
    meta = json.loads(meta_path.read_text())
    return PreparedTask(
        train=load_from_disk(str(root / "train")),
        test=load_from_disk(str(root / "test")),
        partitions=meta["partitions"],
        label_names=meta["label_names"],
        pad_token_id=int(meta["pad_token_id"]),
        kind=meta.get("kind", "classifier"),
        eos_token_id=meta.get("eos_token_id"),
    )


def collate(rows_ids: list[list[int]], labels: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest row; token labels (causal-lm) are padded with -100."""
    width = max(len(r) for r in rows_ids)
    ids = np.full((len(rows_ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows_ids), width), dtype=np.int64)
    for i, r in enumerate(rows_ids):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    if labels and isinstance(labels[0], (list, tuple, np.ndarray)):  # causal-lm: one label per token
        tokens = np.full((len(rows_ids), width), IGNORE_INDEX, dtype=np.int64)
        for i, lab in enumerate(labels):
            tokens[i, : len(lab)] = lab
        label_tensor = torch.from_numpy(tokens)
    else:
        label_tensor = torch.tensor(labels, dtype=torch.long)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask), "labels": label_tensor}


def label_column(ds: Dataset) -> str:
    """The column holding the training target: `label` (class index) or `labels` (token labels)."""
    return "labels" if "labels" in ds.column_names else "label"


def train_batches(
    ds: Dataset, batch_size: int, rng: np.random.Generator, pad_id: int, steps: int = 0, epochs: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches: `epochs` full passes, or exactly `steps` batches (reshuffling each pass)."""
    ids, labels = list(ds["input_ids"]), list(ds[label_column(ds)])
    n = len(ids)
    total = steps if steps > 0 else epochs * -(-n // batch_size)
    done = 0
    while done < total:
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            if done == total:
                return
            sel = order[start : start + batch_size]
            yield collate([ids[i] for i in sel], [labels[i] for i in sel], pad_id)
            done += 1


def eval_batches(ds: Dataset, batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in length order (less padding), covering every row once."""
    ids, labels = list(ds["input_ids"]), list(ds[label_column(ds)])
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        sel = order[start : start + batch_size]
        yield collate([ids[i] for i in sel], [labels[i] for i in sel], pad_id)

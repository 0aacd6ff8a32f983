"""A deployed client's own training data: a file named in its SuperNode's node config.

In deployment a node trains on a local file (`--node-config "data-file=/data/shard.jsonl client-id=3"`)
instead of a simulation partition. The file uses the recipe's `data.text_column` / `data.label_column`;
labels are mapped with `data.label_map` when the recipe has one, else by class name (or class index)
of the run's task, so every node and the server agree on what label k means. For a causal LM
the file holds instruction records (columns as `data.instruction_column` etc. say, or auto-detected).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, Features, Value

from fedpeft.config import Config
from fedpeft.data.instruction_task import tokenize_instructions
from fedpeft.data.instructions import standardize
from fedpeft.data.prepared import PreparedTask, tokenize
from fedpeft.data.sources import DataError, first_split, label_key, load_path

DATA_FILE_KEY = "data-file"


def label_index(value: object, label_names: list[str], label_map: dict[str, int] | None, feature: Any = None) -> int:
    """The class index of a raw label value: through `label_map`, else by class name, else as an index.

    The value is read as `data.source = "file"` reads it (`label_key`): class names of a `ClassLabel`
    column, integers as digits, booleans as `false` / `true`.
    """
    key = label_key(value, feature)
    if label_map:
        for k in (key, str(value)):
            if k in label_map:
                return int(label_map[k])
    elif key in label_names:
        return label_names.index(key)
    elif key.isdigit() and int(key) < len(label_names):
        return int(key)
    raise DataError(f"label {value!r} is not one of the run's classes {label_names}")


def load_node_data(path: str, cfg: Config, label_names: list[str]) -> Dataset:
    """Read, label-map and tokenize a node's data file (any format `data.source = "file"` accepts).

    For a causal LM the file holds instruction records, read with the recipe's column mapping.
    """
    from fedpeft.models import load_tokenizer

    ds = first_split(load_path(path))
    if cfg.model.kind == "causal-lm":
        try:
            records = standardize(ds, cfg.data, "node data")
        except DataError as err:
            raise DataError(f"{path}: {err}") from None
        return tokenize_instructions(records, load_tokenizer(cfg.model), cfg)
    text_col, label_col = cfg.data.text_column, cfg.data.label_column
    missing = [c for c in (text_col, label_col) if c not in ds.column_names]
    if missing:
        raise DataError(f"{path}: column(s) {missing} not found (columns: {', '.join(ds.column_names)}); "
                        "the node's file must use the recipe's data.text_column and data.label_column")
    if len(ds) == 0:
        raise DataError(f"{path} has no examples")
    label_map = dict(cfg.data.label_map) if cfg.data.label_map else None
    texts = ds[text_col]
    if any(not isinstance(t, str) for t in texts):
        raise DataError(f"{path}: column '{text_col}' must hold strings")
    feature = ds.features[label_col]
    try:
        labels = [label_index(v, label_names, label_map, feature) for v in ds[label_col]]
    except DataError as err:
        raise DataError(f"{path}: column '{label_col}': {err}") from None
    plain = Dataset.from_dict({"text": texts, "label": labels}, features=Features({"text": Value("string"), "label": Value("int64")}))
    return tokenize(plain, load_tokenizer(cfg.model), cfg.model.max_length).select_columns(["input_ids", "label"])


@dataclass
class NodeTask(PreparedTask):
    """The run's task, except that this node's client trains on its own file."""

    client_id: int = -1
    own: Dataset | None = field(default=None, repr=False)

    def client_dataset(self, client_id: int) -> Dataset:
        """This node's examples; a node holds no other client's data."""
        if client_id != self.client_id or self.own is None:
            raise DataError(f"this node holds client {self.client_id}'s data, not client {client_id}'s")
        return self.own


def node_task(task: PreparedTask, cfg: Config, path: str, client_id: int) -> NodeTask:
    """`task` with client `client_id`'s training data read from the node's data file."""
    return NodeTask(task.train, task.test, task.partitions, task.label_names, task.pad_token_id, kind=task.kind,
                    eos_token_id=task.eos_token_id, client_id=client_id,
                    own=load_node_data(path, cfg, task.label_names))

"""Raw train/test splits from the built-in task, local files, or the dataset hub, with integer labels.

The file / hub loaders and the held-out split are shared with instruction data (`fedpeft.data.instructions`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk

from fedpeft.config import DataConfig
from fedpeft.data import builtin
from fedpeft.seeding import derive_seed

_INT = re.compile(r"-?\d+")
_FLOAT = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Data that cannot be loaded or used; the message names the file, column or value."""


@dataclass
class RawTask:
    """Train and test splits with a string `text` and an int64 `label` column (class index), plus the class names."""

    train: Dataset
    test: Dataset
    label_names: list[str]


def load_raw(cfg: DataConfig, seed: int) -> RawTask:
    """Load the configured data as text + integer label splits."""
    if cfg.source == "builtin":
        b = cfg.builtin
        train = builtin.generate(b.num_train, derive_seed(seed, "builtin-train"), b.num_domains, b.negation_rate)
        test = builtin.generate(b.num_test, derive_seed(seed, "builtin-test"), b.num_domains, b.negation_rate)
        train, test = (ds.cast_column("label", Value("int64")) for ds in (train, test))
        return RawTask(train, test, builtin.label_names(b.num_domains))
    return _standardize(load_splits(cfg), cfg, seed)


def load_splits(cfg: DataConfig) -> DatasetDict:
    """The splits of a file or hub source (`data.source` file / hub); `data.test_path` becomes the test split."""
    if cfg.source == "file":
        splits = load_path(cfg.path)
        if cfg.test_path:
            splits = DatasetDict({"train": first_split(splits), "test": first_split(load_path(cfg.test_path))})
        return splits
    return load_hub(cfg.path)


def load_path(path_str: str) -> DatasetDict:
    """A local data file (CSV, TSV, JSON, JSONL, Parquet) or save_to_disk folder as splits."""
    path = Path(path_str).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        try:
            loaded = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"'{path}' is not a datasets.save_to_disk folder: {err}") from None
        except Exception as err:  # e.g. IndexError for a saved dataset with no rows
            raise DataError(f"cannot read the save_to_disk folder {path}: {type(err).__name__}: {err}") from None
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"unsupported data file type '{path.suffix}' for {path} (use {', '.join(FILE_BUILDERS)})")
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        return DatasetDict({"train": load_dataset(builder, data_files=str(path), split="train", **kwargs)})
    except Exception as err:  # datasets raises many types for malformed files
        raise DataError(f"cannot read {path}: {type(err).__name__}: {err}") from None


def load_hub(name: str) -> DatasetDict:
    """A dataset from the hub as splits; offline, a DataError that says how to use a local copy."""
    try:
        loaded = load_dataset(name)
    except Exception as err:  # offline mode raises ConnectionError, OSError or ValueError
        raise DataError(
            f"cannot load dataset '{name}' from the hub ({type(err).__name__}). fedpeft runs offline by default "
            "(HF_HUB_OFFLINE=1): save it locally (datasets.save_to_disk, CSV, JSONL or Parquet) and set "
            "data.source = 'file' with data.path = <path>, or go online with HF_HUB_OFFLINE=0."
        ) from None
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})


def first_split(splits: DatasetDict) -> Dataset:
    """The training split: `train`, else the first one."""
    return splits["train"] if "train" in splits else next(iter(splits.values()))


def heldout_split(splits: DatasetDict) -> Dataset | None:
    """The held-out split (`test`, else `validation`), or None when there is none."""
    return next((splits[k] for k in ("test", "validation") if k in splits), None)


def holdout(train: Dataset, test: Dataset | None, cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset]:
    """(train, test): a seeded `data.test_fraction` split if `test` is None; test capped at `data.max_test_examples`."""
    if test is None:
        try:
            parts = train.train_test_split(test_size=cfg.test_fraction, seed=derive_seed(seed, "test-split") % 2**32)
        except ValueError as err:  # too few rows for both parts
            raise DataError(f"cannot split {len(train)} examples by data.test_fraction = {cfg.test_fraction}: "
                            f"{err}; add examples or give a test split (data.test_path)") from None
        train, test = parts["train"], parts["test"]
    if len(test) > cfg.max_test_examples:
        test = test.shuffle(seed=derive_seed(seed, "test-subset") % 2**32).select(range(cfg.max_test_examples))
    return train, test


def _standardize(splits: DatasetDict, cfg: DataConfig, seed: int) -> RawTask:
    train = first_split(splits)
    test = heldout_split(splits)
    for name, ds in (("train", train), ("test", test)):
        if ds is None:
            continue
        for col in (cfg.text_column, cfg.label_column):
            if col not in ds.column_names:
                raise DataError(f"column '{col}' not in the {name} split (columns: {', '.join(ds.column_names)})")
        _keys(ds, cfg, name)  # every label readable; row numbers are the file's, before any split
    split_off = test is None
    train, test = holdout(train, test, cfg, seed)
    train_keys = _keys(train, cfg, "train")
    names, mapping = _label_mapping(train, train_keys, cfg)
    train = _encode(train, train_keys, cfg, names, mapping, "train")
    test = _encode(test, _keys(test, cfg, "test"), cfg, names, mapping, "test", split_off)
    return RawTask(train, test, names)


def label_key(value: Any, feature: Any = None) -> str:
    """A raw label as the text a user writes for it: the key of `data.label_map` and of the class names.

    Class names of a `ClassLabel` column, integers (also integral floats such as 3.0, which CSV
    readers make of a column with gaps) as digits, booleans as `false` / `true`, other floats as
    written, strings as they are (surrounding spaces removed). A missing label is an error.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip()):
        raise DataError("a label is missing (empty or null)")
    if isinstance(feature, ClassLabel) and not isinstance(value, str):
        return feature.int2str(int(value))
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if isinstance(value, str):
        return value.strip()
    raise DataError(f"labels must be strings, numbers or booleans, got {type(value).__name__} ({value!r})")


def _keys(ds: Dataset, cfg: DataConfig, split: str) -> list[str]:
    feature = ds.features[cfg.label_column]
    out = []
    for row, value in enumerate(ds[cfg.label_column]):
        try:
            out.append(label_key(value, feature))
        except DataError as err:
            raise DataError(f"column '{cfg.label_column}', {split} split, data row {row + 1}: {err}") from None
    return out


def _label_mapping(train: Dataset, keys: list[str], cfg: DataConfig) -> tuple[list[str], dict[str, int]]:
    """Class names and raw label key -> class index, from data.label_map or the training labels."""
    if cfg.label_map:
        values = sorted(set(cfg.label_map.values()))
        if values != list(range(len(values))):
            raise DataError(f"data.label_map values must be 0..K-1, got {values}")
        names = [""] * len(values)
        for raw, idx in cfg.label_map.items():
            names[idx] = names[idx] or raw
        return names, {str(k).strip(): int(v) for k, v in cfg.label_map.items()}
    feature = train.features[cfg.label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names), {name: i for i, name in enumerate(feature.names)}
    raw = sorted(set(keys))
    if all(_INT.fullmatch(v) for v in raw):
        # Integer labels keep their value as the class index (names "0".."max").
        ints = sorted(int(v) for v in raw)
        if ints[0] < 0:
            raise DataError(f"integer labels must be >= 0 (found {ints[0]}); give data.label_map")
        return [str(i) for i in range(ints[-1] + 1)], {str(i): i for i in range(ints[-1] + 1)}
    if all(_FLOAT.fullmatch(v) for v in raw):
        raw.sort(key=float)
    return raw, {v: i for i, v in enumerate(raw)}


def _encode(ds: Dataset, keys: list[str], cfg: DataConfig, names: list[str], mapping: dict[str, int],
            split: str, split_off: bool = False) -> Dataset:
    """`ds` with a string `text` column, an int64 `label` column (class index) and its other columns."""
    text_col, label_col = cfg.text_column, cfg.label_column
    raw_values = ds[label_col]
    labels = []
    for key, value in zip(keys, raw_values):
        idx = mapping.get(key, mapping.get(str(value)))
        if idx is None:
            if cfg.label_map:
                raise DataError(f"label {key!r} (column '{label_col}', {split} split) is not in "
                                f"the label mapping data.label_map (keys: {', '.join(map(repr, cfg.label_map))})")
            fix = ("it is too rare to land in both parts of the seeded data.test_fraction split: add rows with it, "
                   "or map it with data.label_map") if split_off else (
                   "add training rows with it, drop it from the test data, or map it with data.label_map")
            raise DataError(f"label {key!r} occurs in the {split} split (column '{label_col}') but not in the "
                            f"training split, whose classes are {names}: {fix}")
        labels.append(idx)
    texts = ds[text_col]
    if any(not isinstance(t, str) for t in texts):
        bad = next(i for i, t in enumerate(texts) if not isinstance(t, str))
        raise DataError(f"column '{text_col}' must hold strings ({split} split: {texts[bad]!r})")
    keep = [c for c in ds.column_names if c not in (text_col, label_col, "text", "label")]
    # Built with explicit types: a map() whose output column has the input's name ("label" ->
    # "label") keeps the input's feature type, so string labels would stay strings.
    features = Features({"text": Value("string"), "label": Value("int64"), **{c: ds.features[c] for c in keep}})
    return Dataset.from_dict({"text": texts, "label": labels, **{c: ds[c] for c in keep}}, features=features)

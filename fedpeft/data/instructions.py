"""Raw instruction records (instruction, optional input, output) from the built-in task, local files or the hub.

Columns are found by name unless the recipe maps them (`data.instruction_column`, `data.input_column`,
`data.output_column`): the instruction from `instruction`, `prompt` or `question`, the optional input
from `input` or `context`, the output from `output`, `response`, `answer` or `completion`. So Alpaca
(instruction / input / output) and Dolly (instruction / context / response / category) files load as
they are. Other columns are kept, e.g. `category` for `partition.by`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from datasets import Dataset, Features, Value

from fedpeft.config import DataConfig
from fedpeft.data import builtin_instructions, builtin_skills
from fedpeft.data.sources import DataError, first_split, heldout_split, holdout, label_key, load_splits
from fedpeft.seeding import derive_seed

FIELDS = ("instruction", "input", "output")
# data.builtin.task -> its generator module (each with its own CATEGORIES and generate()).
BUILTIN_TASKS = {"skills": builtin_skills, "words": builtin_instructions}
# Column names tried in order when the recipe does not name the column.
CANDIDATES: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "prompt", "question"),
    "input": ("input", "context"),
    "output": ("output", "response", "answer", "completion"),
}


@dataclass
class RawInstructions:
    """Train and test splits: string `instruction`, `input` ('' when none), `output`, and the file's other columns."""

    train: Dataset
    test: Dataset


def load_instructions(cfg: DataConfig, seed: int) -> RawInstructions:
    """Load the configured data as instruction / input / output splits."""
    if cfg.source == "builtin":
        b = cfg.builtin
        cats = _builtin_categories(b.task, list(b.categories)) or None
        generate = BUILTIN_TASKS[b.task].generate
        train = generate(b.num_train, derive_seed(seed, "builtin-train"), cats, b.num_domains, b.negation_rate)
        test = generate(b.num_test, derive_seed(seed, "builtin-test"), cats, b.num_domains, b.negation_rate)
        return RawInstructions(train, test)
    splits = load_splits(cfg)
    # Checked before any split so that row numbers in errors are the file's.
    train = standardize(first_split(splits), cfg, "train")
    test = heldout_split(splits)
    train, test = holdout(train, None if test is None else standardize(test, cfg, "test"), cfg, seed)
    return RawInstructions(train, test)


def _builtin_categories(task: str, categories: list[str]) -> list[str]:
    """`categories` checked against the built-in task's own list; the error names the allowed ones."""
    allowed = BUILTIN_TASKS[task].CATEGORIES
    unknown = [c for c in categories if c not in allowed]
    if unknown:
        other = [t for t, m in BUILTIN_TASKS.items() if t != task and all(c in m.CATEGORIES for c in unknown)]
        hint = f"; those are categories of data.builtin.task = '{other[0]}'" if other else ""
        raise DataError(f"data.builtin.categories: unknown categories {unknown} for data.builtin.task = '{task}' "
                        f"(allowed: {', '.join(allowed)}){hint}")
    return categories


def resolve_columns(ds: Dataset, cfg: DataConfig, split: str = "train") -> dict[str, str | None]:
    """The column holding each of instruction / input / output (input None when there is none)."""
    explicit = {"instruction": cfg.instruction_column, "input": cfg.input_column, "output": cfg.output_column}
    columns = ", ".join(ds.column_names)
    out: dict[str, str | None] = {}
    for field in FIELDS:
        name = explicit[field]
        if name:
            if name not in ds.column_names:
                raise DataError(f"data.{field}_column = '{name}' is not a column of the {split} split "
                                f"(columns: {columns})")
            out[field] = name
            continue
        out[field] = next((c for c in CANDIDATES[field] if c in ds.column_names), None)
        if out[field] is None and field != "input":
            tried = ", ".join(f"'{c}'" for c in CANDIDATES[field])
            raise DataError(f"no {field} column in the {split} split: looked for {tried} (columns: {columns}); "
                            f"name it with data.{field}_column")
    return out


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(value: object, optional: bool) -> str:
    """One value as stripped text; numbers and booleans as `label_key` writes them (CSV readers type such columns)."""
    if _missing(value):
        if optional:
            return ""
        raise DataError("value is missing (null)")
    if isinstance(value, str):
        text = value.strip()
    elif isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating)):
        text = label_key(value)
    else:
        raise DataError(f"must be a string, got {type(value).__name__} ({value!r:.60})")
    if not text and not optional:
        raise DataError("value is empty")
    return text


def _texts(ds: Dataset, column: str | None, split: str, optional: bool) -> list[str]:
    """The column's values as stripped strings; a missing optional value is ''."""
    if column is None:
        return [""] * len(ds)
    out = []
    for row, value in enumerate(ds[column]):
        try:
            out.append(_text(value, optional))
        except DataError as err:
            raise DataError(f"column '{column}', {split} split, data row {row + 1}: {err}") from None
    return out


def standardize(ds: Dataset, cfg: DataConfig, split: str) -> Dataset:
    """`ds` as string `instruction` / `input` / `output` columns plus its other columns; DataError names bad rows."""
    if len(ds) == 0:
        raise DataError(f"the {split} split has no examples")
    cols = resolve_columns(ds, cfg, split)
    values = {field: _texts(ds, cols[field], split, optional=field == "input") for field in FIELDS}
    # Source columns are replaced by the standard ones; a column already named like a standard
    # one but not mapped to it (e.g. `input` when data.input_column = 'context') would clash.
    keep = [c for c in ds.column_names if c not in cols.values() and c not in FIELDS]
    features = Features({**{f: Value("string") for f in FIELDS}, **{c: ds.features[c] for c in keep}})
    return Dataset.from_dict({**values, **{c: ds[c] for c in keep}}, features=features)

"""User data files: every file type × column names × label type ends as int64 class indices with the file's names.

The full matrix (48 cells) runs through the data layer (`load_raw`, then the batch collation that
the server's evaluation uses). Five cells, covering every file type, every label type, both column
namings and both test-split cases, run `fedpeft simulate` (the typer app, in this process) to the
end and check the class names in summary.json; they share one Ray session.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from fedpeft.config import DataConfig
from fedpeft.data import DataError, load_raw
from fedpeft.data.prepared import collate

from conftest import TINY_RUN

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"

FILE_TYPES = ["csv", "tsv", "jsonl", "parquet", "disk"]
# What each label kind looks like in the file, and the class names fedpeft must report for it.
LABELS = {
    "string": (["food.negative", "tech.positive", "travel.neutral"], ["food.negative", "tech.positive", "travel.neutral"]),
    "int": ([0, 1, 2], ["0", "1", "2"]),
    # ClassLabel keeps its own order of names (not sorted) and exists only where the type survives
    # in the file: Parquet written by datasets and save_to_disk folders.
    "classlabel": ([0, 1, 2], ["pos", "neg", "neu"]),
}
NAMES = {"same": ("text", "label"), "other": ("review", "category")}


def _rows(n: int, kind: str, offset: int = 0) -> tuple[list[str], list]:
    values, names = LABELS[kind]
    labels = [values[(i + offset) % 3] for i in range(n)]
    # The text carries its class name, so every row's mapped label can be checked.
    texts = [f"row {i} is about {names[values.index(v)]}" for i, v in enumerate(labels)]
    return texts, labels


def _dataset(texts: list[str], labels: list, kind: str, text_col: str, label_col: str) -> Dataset:
    if kind == "classlabel":
        feats = Features({text_col: Value("string"), label_col: ClassLabel(names=LABELS[kind][1])})
        return Dataset.from_dict({text_col: texts, label_col: labels}, features=feats)
    return Dataset.from_dict({text_col: texts, label_col: labels})


def _write(path: Path, fmt: str, ds: Dataset, text_col: str, label_col: str) -> None:
    if fmt in ("csv", "tsv"):
        with path.open("w", newline="") as f:
            w = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
            w.writerow([text_col, label_col])
            w.writerows(zip(ds[text_col], ds[label_col]))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps({text_col: t, label_col: v}) for t, v in zip(ds[text_col], ds[label_col])))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    else:
        raise ValueError(fmt)


def make_data(tmp: Path, fmt: str, kind: str, naming: str, split: bool, n_train: int = 30, n_test: int = 9) -> dict:
    """Write a data set in one format; return the `[data]` keys that read it."""
    text_col, label_col = NAMES[naming]
    train = _dataset(*_rows(n_train, kind), kind, text_col, label_col)
    test = _dataset(*_rows(n_test, kind, offset=1), kind, text_col, label_col)
    keys = {"source": "file", "text_column": text_col, "label_column": label_col}
    if fmt == "disk":
        path = tmp / "data"
        (DatasetDict({"train": train, "test": test}) if split else train).save_to_disk(str(path))
        return {**keys, "path": str(path), "test_fraction": 0.2}
    suffix = "parquet" if fmt == "parquet" else fmt
    _write(tmp / f"train.{suffix}", fmt, train, text_col, label_col)
    keys.update(path=str(tmp / f"train.{suffix}"), test_fraction=0.2)
    if split:
        _write(tmp / f"test.{suffix}", fmt, test, text_col, label_col)
        keys["test_path"] = str(tmp / f"test.{suffix}")
    return keys


CELLS = [
    (fmt, kind, naming, split)
    for fmt in FILE_TYPES
    for kind in LABELS
    for naming in NAMES
    for split in (False, True)
    if kind != "classlabel" or fmt in ("parquet", "disk")
]


def _check_task(task, kind: str) -> None:
    names = LABELS[kind][1]
    assert task.label_names == names
    for ds in (task.train, task.test):
        assert ds.features["label"] == Value("int64") and ds.features["text"] == Value("string")
        for text, label in zip(ds["text"], ds["label"]):
            assert text.endswith(f"about {names[label]}"), (text, label)
    # The batch the server's evaluation builds (where string labels used to crash).
    batch = collate([[1, 2]] * len(task.test), list(task.test["label"]), pad_id=0)
    assert batch["labels"].dtype.is_floating_point is False and len(batch["labels"]) == len(task.test)


@pytest.mark.parametrize("fmt,kind,naming,split", CELLS, ids=["-".join(map(str, c)) for c in CELLS])
def test_every_file_type_and_label_type_gives_int64_labels_and_the_files_class_names(tmp_path, fmt, kind, naming, split):
    keys = make_data(tmp_path, fmt, kind, naming, split)
    task = load_raw(DataConfig(**keys), seed=0)
    _check_task(task, kind)
    assert len(task.test) == (9 if split else 6)


def test_boolean_and_float_labels(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"r{i}", "label": bool(i % 2)}) for i in range(20)))
    task = load_raw(DataConfig(source="file", path=str(p)), seed=0)
    assert task.label_names == ["false", "true"] and task.train.features["label"] == Value("int64")
    assert all((lab == 1) == (int(t[1:]) % 2 == 1) for t, lab in zip(task.train["text"], task.train["label"]))
    # A float column (what a CSV reader makes of 1.0 / 2.5 / 10) is indexed in numeric order.
    p = tmp_path / "f.csv"
    p.write_text("text,label\n" + "\n".join(f"r{i},{[1.0, 2.5, 10][i % 3]}" for i in range(30)))
    task = load_raw(DataConfig(source="file", path=str(p)), seed=0)
    assert task.label_names == ["1", "2.5", "10"] and task.train.features["label"] == Value("int64")
    # label_map keys are matched against the label as written.
    task = load_raw(DataConfig(source="file", path=str(p), label_map={"1": 0, "2.5": 0, "10": 1}), seed=0)
    assert task.label_names == ["1", "10"] and set(task.train["label"]) == {0, 1}


def test_a_label_only_in_the_test_split_is_named(tmp_path):
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("text,label\n" + "\n".join(f"r{i},{['food', 'tech'][i % 2]}" for i in range(10)))
    test.write_text("text,label\nr1,food\nr2,travel\n")
    with pytest.raises(DataError, match=r"label 'travel' occurs in the test split .* not in the training split"):
        load_raw(DataConfig(source="file", path=str(train), test_path=str(test)), seed=0)


def test_missing_label_is_named_with_its_row(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\na,x\nb,\nc,y\n")
    with pytest.raises(DataError, match=r"column 'label', train split, data row 2: a label is missing"):
        load_raw(DataConfig(source="file", path=str(p), test_fraction=0.5), seed=0)


# ----- through the CLI ------------------------------------------------------------------------
# Each file type once, each label type at least once, both column namings, with and without a
# test split; the first cell is the shape a new user has most often: `text,label` with string
# class names and no test file.
# Two cells in the default run (a CSV and a JSONL with string class names: the usual user files); the
# other formats run their whole CLI path under `-m slow` (each is also loaded in-process by CELLS above).
CLI_CELLS = [
    pytest.param(*c, id="-".join(map(str, c)), marks=[pytest.mark.slow] if slow else [])
    for *c, slow in [
        ("csv", "string", "same", False, False),
        ("tsv", "int", "other", True, True),
        ("jsonl", "string", "other", False, False),
        ("parquet", "classlabel", "same", True, True),
        ("disk", "classlabel", "other", False, True),
    ]
]


@pytest.mark.parametrize("fmt,kind,naming,split", CLI_CELLS)
def test_cli_runs_a_user_file_to_the_end(tmp_path, ray_session, fmt, kind, naming, split):
    from typer.testing import CliRunner

    from fedpeft.app.cli import app

    keys = make_data(tmp_path, fmt, kind, naming, split)
    args = ["simulate", str(SMOKE), "--set", f'output.dir="{tmp_path / "runs"}"']
    for k, v in keys.items():
        args += ["--set", f"data.{k}={json.dumps(v)}"]
    for s in TINY_RUN:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["label_names"] == LABELS[kind][1]
    assert summary["rounds"] == 1 and summary["participations"] == 2 and summary["rejected"] == 0
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"

"""Data: the built-in task, user files, partitioners, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from fedpeft.config import DataConfig, PartitionConfig
from fedpeft.data import DataError, load_raw
from fedpeft.data import builtin
from fedpeft.data.partitioning import partition_indices


def test_builtin_is_deterministic_and_balanced():
    a, b = builtin.generate(600, seed=3), builtin.generate(600, seed=3)
    assert list(a["text"]) == list(b["text"]) and list(a["label"]) == list(b["label"])
    assert list(builtin.generate(600, seed=4)["text"]) != list(a["text"])
    counts = [list(a["label"]).count(k) for k in range(6)]
    assert min(counts) > 60
    # Negation flips polarity: the same adjective appears under both labels of a domain.
    neg = [t for t, lab in zip(a["text"], a["label"]) if " not great" in t]
    pos = [t for t, lab in zip(a["text"], a["label"]) if " great" in t and " not " not in t and " never " not in t]
    assert neg and pos


def test_dirichlet_partition_skews_labels_and_covers_data():
    train = builtin.generate(2000, seed=0)
    parts = partition_indices(train, PartitionConfig(type="dirichlet", alpha=0.3, by="label"), 20, seed=0)
    assert len(parts) == 20 and all(parts)
    flat = sorted(i for p in parts for i in p)
    assert flat == sorted(set(flat)) and len(flat) == 2000
    labels = list(train["label"])
    top_share = [max(sum(labels[i] == k for i in p) for k in range(6)) / len(p) for p in parts]
    assert sum(top_share) / len(top_share) > 0.35  # IID would give about 1/6


def test_iid_and_shards_partition():
    train = builtin.generate(600, seed=0)
    iid = partition_indices(train, PartitionConfig(type="iid"), 6, seed=0)
    assert sorted(len(p) for p in iid) == [100] * 6
    shards = partition_indices(train, PartitionConfig(type="shards", by="label", shards_per_client=2), 6, seed=0)
    assert all(shards)


def test_partition_errors_are_clear():
    train = builtin.generate(50, seed=0)
    with pytest.raises(DataError, match="partition.by = 'colour'"):
        partition_indices(train, PartitionConfig(type="dirichlet", by="colour"), 5, seed=0)
    with pytest.raises(DataError, match="cannot be split over 100 clients"):
        partition_indices(train, PartitionConfig(type="iid"), 100, seed=0)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet", "disk"])
def test_local_files_with_custom_columns_and_label_names(tmp_path, fmt):
    rows = {"review": [f"text number {i}" for i in range(40)], "stars": ["good" if i % 2 else "bad" for i in range(40)]}
    ds = Dataset.from_dict(rows)
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        ds.to_csv(str(path))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"review": r, "stars": s}) for r, s in zip(rows["review"], rows["stars"])))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    cfg = DataConfig(source="file", path=str(path), text_column="review", label_column="stars", test_fraction=0.25)
    task = load_raw(cfg, seed=0)
    assert task.label_names == ["bad", "good"]
    assert len(task.train) == 30 and len(task.test) == 10
    assert set(task.train["label"]) == {0, 1}
    mapped = load_raw(cfg.model_copy(update={"label_map": {"good": 1, "bad": 0}}), seed=0)
    assert mapped.label_names == ["bad", "good"]


def test_missing_file_and_column_and_unmapped_label(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*missing.csv"):
        load_raw(DataConfig(source="file", path=str(tmp_path / "missing.csv")), seed=0)
    p = tmp_path / "d.csv"
    p.write_text("sentence,label\nhello,0\nworld,1\n")
    with pytest.raises(DataError, match="column 'text' not in the train split"):
        load_raw(DataConfig(source="file", path=str(p)), seed=0)
    with pytest.raises(DataError, match="not in the label mapping"):
        load_raw(DataConfig(source="file", path=str(p), text_column="sentence", label_map={"0": 0}), seed=0)
    with pytest.raises(DataError, match="unsupported data file type"):
        (tmp_path / "d.xlsx").write_text("x")
        load_raw(DataConfig(source="file", path=str(tmp_path / "d.xlsx")), seed=0)


def test_offline_hub_dataset_gives_instructions():
    with pytest.raises(DataError, match="data.source = 'file'"):
        load_raw(DataConfig(source="hub", path="stanfordnlp/imdb"), seed=0)


def test_a_list_of_columns_skews_on_the_first_the_data_has():
    train = Dataset.from_dict({"text": [f"t{i}" for i in range(60)], "label": [i % 3 for i in range(60)]})
    cfg = PartitionConfig(type="dirichlet", by=["group", "label"], alpha=0.3)
    parts = partition_indices(train, cfg, 4, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(60))
    with pytest.raises(DataError, match=r"partition.by = \['group', 'colour'\]: none is a column"):
        partition_indices(train, PartitionConfig(type="dirichlet", by=["group", "colour"]), 4, seed=0)


def test_the_default_recipe_runs_on_a_users_csv_without_editing_it(tmp_path):
    """`--set data.path=reviews.csv` on the default recipe: text and label columns, string class names."""
    from pathlib import Path

    from fedpeft.app.recipe import load
    from fedpeft.data import prepare

    csv = tmp_path / "reviews.csv"
    names = ["negative", "neutral", "positive"]
    csv.write_text("text,label\n" + "".join(f"review number {i} was {names[i % 3]},{names[i % 3]}\n"
                                              for i in range(300)))
    recipe = Path(__file__).resolve().parents[2] / "simulations" / "default.toml"
    cfg = load(recipe, [f'data.path="{csv}"', "sim.num_clients=10", "sim.clients_per_round=5"])
    assert cfg.data.source == "file"
    task = prepare(cfg, tmp_path / "task")
    assert len(task.partitions) == 10
    # The CSV's rows and class names, not the built-in task's 8,000 reviews.
    assert sum(len(p) for p in task.partitions) + len(task.test) == 300
    assert list(task.label_names) == names

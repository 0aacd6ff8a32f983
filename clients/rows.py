"""A client's training rows without a per-client `datasets` selection.

Every round a client's partition used to be taken with `Dataset.select` and turned back into
Python lists by the batcher; this view reads the two columns the batchers use from lists built
once per process. Anything else a method asks of it goes to the real selected `Dataset`
(built on first use), so it behaves as the partition's `Dataset`.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from fedpeft.data import PreparedTask

_COLUMNS = ("input_ids", "label", "labels")  # what the batchers read: ids and class or token labels
_cache: dict[int, tuple[PreparedTask, dict[str, list]]] = {}


def _column(task: PreparedTask, name: str) -> list:
    hit = _cache.get(id(task))
    if hit is None or hit[0] is not task:
        if len(_cache) >= 2:
            _cache.clear()
        hit = _cache[id(task)] = (task, {})
    cols = hit[1]
    if name not in cols:
        cols[name] = list(task.train[name])
    return cols[name]


class ClientRows:
    """Client `cid`'s partition of `task.train`: `len`, `rows["input_ids"]` and the label column cheaply, the rest lazily."""

    def __init__(self, task: PreparedTask, cid: int) -> None:
        if not 0 <= cid < len(task.partitions):
            task.client_dataset(cid)  # raises the task's own out-of-range error
        self._task, self._cid, self._idx = task, cid, task.partitions[cid]

    def __len__(self) -> int:
        return len(self._idx)

    def __getitem__(self, key: Any):
        if isinstance(key, str) and key in _COLUMNS and key in self._task.train.column_names:
            col = _column(self._task, key)
            return [col[i] for i in self._idx]
        return self.dataset[key]

    @property
    def column_names(self) -> list[str]:
        """The columns of the task's training split."""
        return self._task.train.column_names

    @cached_property
    def dataset(self):
        """The partition as a `datasets.Dataset`."""
        return self._task.client_dataset(self._cid)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class FlippedLabels:
    """A client's rows with every class label y replaced by (C − 1 − y): the label-flipping attack's data."""

    def __init__(self, rows, num_labels: int) -> None:
        self._rows, self._c = rows, num_labels

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, key: Any):
        if key == "label":
            return [self._c - 1 - int(y) for y in self._rows["label"]]
        return self._rows[key]

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._rows, name)

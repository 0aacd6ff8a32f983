"""Ways a reply's content can be malformed, by name: used to inject faults and to test the server's checks.

Each kind turns a well-formed reply's RecordDict into a malformed one. `payload` says which uploads
it applies to: dense adapter tensors (`DENSE`, the `arrays` record), any reply ("any", e.g. its
metrics), or a method's own upload form, named as the method declares it (`Capabilities.uploads`):
a method with its own form registers its kinds from its shared module (`register_malformed`). Malformed coded uploads are made
by the codec tests, and malformed messages (another round's reply, a duplicate, an unsolicited one)
by `fedpeft.reply_screen`'s tests: neither can be produced by rewriting a reply's content.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpeft.records import ARRAYS, NUM_EXAMPLES

DENSE = "adapter tensors"  # the upload form of most methods (Capabilities.uploads)
ANY = "any"


@dataclass(frozen=True)
class Kind:
    """One way to malform a reply: the upload form it applies to, how, and whether a reply has that form."""

    payload: str
    corrupt: Callable[[RecordDict], RecordDict]
    present: Callable[[RecordDict], bool] | None = None  # default: dense needs `arrays`, "any" always


def _arrays(content: RecordDict) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in content[ARRAYS].items()}


def _with_arrays(content: RecordDict, arrays: dict) -> RecordDict:
    out = RecordDict({k: v for k, v in content.items() if k != ARRAYS})
    out[ARRAYS] = ArrayRecord({k: v if isinstance(v, Array) else Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return out


def _first(content: RecordDict) -> str:
    return sorted(content[ARRAYS].keys())[0]


def _set_first(fn: Callable[[np.ndarray], object]) -> Callable[[RecordDict], RecordDict]:
    def corrupt(content: RecordDict) -> RecordDict:
        arrays = _arrays(content)
        key = _first(content)
        arrays[key] = fn(arrays[key])
        return _with_arrays(content, arrays)
    return corrupt


def _fill(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def fill(a: np.ndarray) -> np.ndarray:
        out = a.copy()
        out.flat[0] = value
        return out
    return fill


def _without(record: str) -> Callable[[RecordDict], RecordDict]:
    return lambda c: RecordDict({k: v for k, v in c.items() if k != record})


def _metrics(c: RecordDict) -> str:
    return next(iter(c.metric_records))


def _set_metric(name: str, value) -> Callable[[RecordDict], RecordDict]:
    def corrupt(c: RecordDict) -> RecordDict:
        out = RecordDict(dict(c.items()))
        key = _metrics(c)
        out[key] = MetricRecord({**dict(c[key]), name: value})
        return out
    return corrupt


def _add(name: str, record) -> Callable[[RecordDict], RecordDict]:
    return lambda c: RecordDict({**dict(c.items()), name: record})


def _truncated_buffer(a: np.ndarray) -> Array:
    good = Array(np.ascontiguousarray(a))
    return Array(dtype=good.dtype, shape=tuple(good.shape), stype=good.stype, data=good.data[: len(good.data) // 2])


KINDS: dict[str, Kind] = {
    # dense adapter tensors
    "nan": Kind(DENSE, _set_first(_fill(float("nan")))),
    "inf": Kind(DENSE, _set_first(_fill(float("inf")))),
    "wrong_shape": Kind(DENSE, _set_first(lambda a: np.zeros(a.size + 1, a.dtype))),
    "wrong_dtype": Kind(DENSE, _set_first(lambda a: a.astype(np.float64))),
    "corrupt_buffer": Kind(DENSE, _set_first(_truncated_buffer)),
    "missing_key": Kind(DENSE, lambda c: _with_arrays(c, {k: v for k, v in _arrays(c).items() if k != _first(c)})),
    "extra_key": Kind(DENSE, lambda c: _with_arrays(c, {**_arrays(c), "injected.weight": np.zeros(4, np.float32)})),
    "missing_arrays": Kind(DENSE, _without(ARRAYS)),
    "extra_record": Kind(DENSE, _add("injected", ArrayRecord({"x": Array(np.zeros(4, np.float32))}))),
    "arrays_as_config": Kind(DENSE, lambda c: _add(ARRAYS, ConfigRecord({"x": 1}))(_without(ARRAYS)(c))),
    "oversized": Kind(DENSE, _add("padding", ArrayRecord({"x": Array(np.zeros(1 << 22, np.float32))}))),
    # any reply: its metrics
    "empty": Kind(ANY, lambda c: RecordDict()),
    "no_metrics": Kind(ANY, lambda c: _without(_metrics(c))(c)),
    "two_metric_records": Kind(ANY, _add("more-metrics", MetricRecord({NUM_EXAMPLES: 1}))),
    "zero_examples": Kind(ANY, _set_metric(NUM_EXAMPLES, 0)),
    "negative_examples": Kind(ANY, _set_metric(NUM_EXAMPLES, -5)),
    "nan_examples": Kind(ANY, _set_metric(NUM_EXAMPLES, float("nan"))),
    "absurd_examples": Kind(ANY, _set_metric(NUM_EXAMPLES, 10**12)),
    "nan_loss": Kind(ANY, _set_metric("train-loss", float("nan"))),
}


def corrupt(kind: str, content: RecordDict) -> RecordDict:
    """`content` malformed the way `kind` names (ValueError for an unknown kind)."""
    if kind not in KINDS:
        raise ValueError(f"unknown malformed kind '{kind}' (known: {', '.join(sorted(KINDS))})")
    return KINDS[kind].corrupt(content)


def register_malformed(name: str, kind: Kind) -> None:
    """Add a malformed-reply kind (a method with its own upload form registers its own)."""
    if name in KINDS and KINDS[name] != kind:
        raise ValueError(f"malformed kind '{name}' is already registered")
    KINDS[name] = kind


def applies(kind: str, content: RecordDict) -> bool:
    """Whether `kind` can malform this reply (it has the upload form the kind rewrites)."""
    k = KINDS[kind]
    if k.present is not None:
        return k.present(content)
    return k.payload == ANY or (k.payload == DENSE and ARRAYS in content.array_records)

"""Helpers every strategy shares: reply checks, adapter-type checks, reply weights, stacked tensors."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedpeft.config import Config, ConfigError
from fedpeft.records import ARRAYS, NUM_EXAMPLES, num_examples, reply_metrics

Template = dict[str, tuple[tuple[int, ...], str]]


def require_adapter(method: str, cfg: Config, adapter_type: str) -> None:
    """ConfigError unless the recipe's adapter is `adapter_type` (e.g. LoRA for FFA-LoRA)."""
    if cfg.adapter.type.lower() != adapter_type:
        raise ConfigError(f"method '{method}' needs adapter.type = '{adapter_type}' (got '{cfg.adapter.type}')")


MAX_EXAMPLES = 10**9  # no client holds more: a larger count is a forged aggregation weight


def check_metrics(content: RecordDict, max_examples: int | None = None) -> str | None:
    """Why a reply's metrics are unusable (missing, invalid or implausible example count, non-finite values), or None.

    `max_examples` is the client's own example count where the server knows it (simulation).
    """
    if len(content.metric_records) != 1:
        return f"expected one metric record, got {len(content.metric_records)}"
    metrics = reply_metrics(content)
    n = metrics.get(NUM_EXAMPLES)
    if not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
        return f"'{NUM_EXAMPLES}' must be a positive finite number, got {n!r}"
    limit = MAX_EXAMPLES if max_examples is None else max_examples
    if n > limit:
        return f"'{NUM_EXAMPLES}' = {n:g} exceeds the client's {limit:,} examples"
    for name, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            return f"metric '{name}' is not finite"
    return None


def required_replies(min_replies: float, sampled: int) -> int:
    """Valid replies a round of `sampled` clients needs: `sim.min_replies` as a count (>= 1) or a fraction (< 1)."""
    return math.ceil(min_replies * sampled - 1e-9) if min_replies < 1 else int(min_replies)


def check_arrays(record: ArrayRecord, template: Template) -> str | None:
    """Why an adapter record does not match the expected keys/shapes/dtypes or is not finite, or None."""
    missing = sorted(set(template) - set(record))
    extra = sorted(set(record) - set(template))
    if missing or extra:
        return f"adapter keys differ: missing {missing[:3]}, unexpected {extra[:3]}"
    for key, (shape, dtype) in template.items():
        arr = record[key]
        if tuple(arr.shape) != shape or arr.dtype != dtype:
            return f"'{key}' is {arr.dtype}{list(arr.shape)}, expected {dtype}{list(shape)}"
        try:
            values = arr.numpy()
        except Exception as err:  # a corrupt buffer fails to deserialize
            return f"'{key}' cannot be decoded: {err}"
        if not np.isfinite(values).all():
            return f"'{key}' has non-finite values"
    return None


def example_weights(valid: list[Message]) -> np.ndarray:
    """Each reply's share of the examples (sums to 1)."""
    w = np.array([num_examples(m.content) for m in valid], dtype=np.float64)
    return w / w.sum()


def stacked(valid: list[Message], key: str, record: str = "arrays") -> np.ndarray:
    """Tensor `key` of every reply, stacked along a new first axis (float64 for exact reductions)."""
    return np.stack([m.content[record][key].numpy().astype(np.float64) for m in valid])



def clip_updates(valid: list[Message], reference: Callable[[int], ArrayRecord], bound: float) -> list[float]:
    """Scale each reply's update (its tensors minus what its node was sent) to L2 norm ≤ `bound`, in place.

    Returns the norms before clipping.
    """
    norms = []
    for msg in valid:
        ref, arrays = reference(msg.metadata.src_node_id), msg.content[ARRAYS]
        update = {k: arrays[k].numpy().astype(np.float64) - ref[k].numpy() for k in arrays}
        norm = math.sqrt(sum(float((u * u).sum()) for u in update.values()))
        norms.append(norm)
        if norm > bound:
            scale = bound / norm
            msg.content[ARRAYS] = ArrayRecord({
                k: Array((ref[k].numpy() + scale * u).astype(arrays[k].numpy().dtype)) for k, u in update.items()
            })
    return norms

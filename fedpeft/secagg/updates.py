"""From a run's `[secagg]` table to one round's options, and from adapter tensors to the vector a client masks.

A client aggregates its UPDATE (trained adapter − the global it was sent), each value clipped to
[-clip_range, clip_range], scaled by its weight ratio r = w / max_weight (`weights.with_weight`),
tensors in sorted key order, then the weight channel. The server's decoded sum gives the weighted
mean update Σ r·clip(Δ) / Σ r, and nothing about any one client.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from fedpeft.config import SecAggConfig
from fedpeft.secagg.options import SecAggOptions
from fedpeft.secagg.weights import weighted_mean, with_weight

_FIELDS = re.compile(r"\b(threshold|num_shares|clip_range|quantization_bits)\b")


def resolve_threshold(cfg: SecAggConfig, num_clients: int) -> int:
    """t: `secagg.threshold` as a count (a fraction of the round's clients is rounded up)."""
    v = cfg.threshold
    return math.ceil(v * num_clients) if v < 1 else int(v)


def resolve_shares(cfg: SecAggConfig, num_clients: int) -> int | None:
    """k: `secagg.num_shares` as a count, or None for every client (classic SecAgg)."""
    v = cfg.num_shares
    if v == "all":
        return None
    if v >= 1:
        return int(v)
    k = math.ceil(float(v) * num_clients)
    # the ring graph needs an odd neighbourhood below n: round up to the next odd count
    return min(num_clients, k + 1 if k < num_clients and k % 2 == 0 else k)


def round_options(cfg: SecAggConfig, num_clients: int) -> SecAggOptions:
    """One round's SecAggOptions for `num_clients` sampled clients; ValueError naming the `secagg.` keys."""
    t, k = resolve_threshold(cfg, num_clients), resolve_shares(cfg, num_clients)
    try:
        return SecAggOptions(num_clients=num_clients, threshold=t, num_shares=k, clip_range=cfg.clip_range,
                             quantization_bits=cfg.quantization_bits)
    except ValueError as err:
        text = _FIELDS.sub(r"secagg.\1", str(err)).replace("num_clients", "clients in the round")
        text = text.replace(" or raise mod_bits", "")  # the ring is fixed at 2**32: uint32 on the wire
        raise ValueError(f"{text} (with {num_clients} clients a round: threshold {t}, "
                         f"num_shares {k if k is not None else num_clients})") from None


def vector_shapes(template: Mapping[str, tuple[tuple[int, ...], str]]) -> list[tuple[int, ...]]:
    """Shapes of the vector a client masks: each uploaded tensor in sorted key order, then the weight channel."""
    return [tuple(template[k][0]) for k in sorted(template)] + [(1,)]


def upload_vector(trained: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], weight: float,
                  max_weight: float, options: SecAggOptions) -> list[np.ndarray]:
    """r·clip(trained − sent) per tensor (sorted keys; `sent` names them), then [r·c] (ValueError: bad weight)."""
    # float64 before subtracting: the difference of two float32 tensors is then exact
    update = {k: np.asarray(trained[k], dtype=np.float64) - np.asarray(sent[k], dtype=np.float64) for k in sent}
    return update_vector(update, weight, max_weight, options)


def update_vector(update: Mapping[str, np.ndarray], weight: float, max_weight: float,
                  options: SecAggOptions) -> list[np.ndarray]:
    """r·clip(update) per tensor (sorted keys), then [r·c] (ValueError: bad weight)."""
    c = options.clip_range
    return with_weight([np.clip(np.asarray(update[k], dtype=np.float64), -c, c) for k in sorted(update)],
                       weight, max_weight, options)


def mean_update(total: Sequence[np.ndarray], keys: Sequence[str], options: SecAggOptions,
                max_weight: float) -> tuple[dict[str, np.ndarray], float]:
    """(key -> the weighted mean update, float64; Σ weights) from the decoded sum of `upload_vector`s."""
    means, total_weight = weighted_mean(total, options, max_weight)
    return dict(zip(sorted(keys), means, strict=True)), total_weight

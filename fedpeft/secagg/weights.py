"""Weighted means under secure aggregation: the server learns only Σr and Σ r·x, never one client's weight.

A client's weight w (its example count, say) is private like its update. Each client scales its
vector by r = w / max_weight (in [0, 1], so a vector within [-c, c] stays within it) and appends
r·c as one extra scalar; the secure sum then carries Σ r·x and Σ r·c, and the mean is their ratio.
`max_weight` must be public (in the round's config), and a w above it is refused, not clipped,
so the mean is never silently biased.

r is snapped to the quantization grid (r·c a whole number of steps) so the weight channel
survives quantization exactly: Σr comes back without rounding error and only Σ r·x carries
the usual error_bound.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedpeft.secagg.options import SecAggOptions
from fedpeft.secagg.quant import error_bound


def weight_ratio(weight: float, max_weight: float, options: SecAggOptions) -> float:
    """r = weight / max_weight, rounded so r·c lies on the quantization grid."""
    if not (np.isfinite(weight) and 0 <= weight <= max_weight) or not max_weight > 0:
        raise ValueError(f"weight = {weight}: must lie in [0, max_weight = {max_weight}] (max_weight > 0)")
    half = options.target_range // 2  # r·c = m·step  <=>  r = m / half
    return round(weight / max_weight * half) / half


def with_weight(arrays: Sequence[np.ndarray], weight: float, max_weight: float,
                options: SecAggOptions) -> list[np.ndarray]:
    """The client's vector to aggregate: r·x for each array, then [r·c] as one more array of shape (1,).

    r differs from weight / max_weight by at most 1 / target_range (the snap to the grid).
    """
    r = weight_ratio(weight, max_weight, options)
    return [np.asarray(a, dtype=np.float64) * r for a in arrays] + [np.array([r * options.clip_range])]


def weighted_mean(total: Sequence[np.ndarray], options: SecAggOptions,
                  max_weight: float) -> tuple[list[np.ndarray], float]:
    """From the secure sum of `with_weight` vectors: (Σ r·x / Σ r per array, Σw = max_weight·Σr)."""
    *sums, channel = total
    # the channel is a whole number of steps: snap away the float round-off of decoding
    ratio_sum = round(float(np.asarray(channel).reshape(-1)[0]) / options.step) * options.step / options.clip_range
    if ratio_sum <= 0:
        raise ValueError("the weights sum to 0: no weighted mean")
    return [np.asarray(s, dtype=np.float64) / ratio_sum for s in sums], ratio_sum * max_weight


def weighted_mean_error_bound(options: SecAggOptions, count: int, total_weight: float, max_weight: float) -> float:
    """Largest |secure weighted mean - Σ clip(r·x) / Σr| per coordinate, given Σw from `weighted_mean`."""
    return error_bound(options, count) / (total_weight / max_weight)

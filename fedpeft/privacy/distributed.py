"""Distributed DP over secure aggregation: each client clips its update and adds its share of the noise.

With `dp.user.side = "distributed"` and `[secagg]`, the user-level mechanism (`user_level`) runs
without the server ever holding a clean update:

1. Clients are Poisson-sampled as for user-level DP; each one's update Δ_i is clipped on the client
   to L2 norm C.
2. Client i adds N(0, σ²C²/t) to its clipped update, t the round's SecAgg+ threshold: the fewest
   clients any sum the protocol completes can cover. Every completed sum thus carries at least
   N(0, σ²C²), the noise of the central mechanism, whichever clients drop out.
3. Each client masks its noised update with weight 1; the server decodes the sum and divides it by
   the expected count m = qN (the fixed denominator), as the central mechanism does.

ε is accounted as for user-level DP (the Poisson-subsampled Gaussian mechanism at σ, q). The
accounting is that of the real-valued mechanism: each client's per-value clamp to
[-clip_range, clip_range] and its stochastic rounding onto the 2**bits grid happen after its noise
and are not in it. `check_config` sizes the clamp so that no value is clamped unless its noise
exceeds 4 standard deviations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedpeft.config import Config, ConfigError

DISTRIBUTED = "distributed"
CLAMP_SIGMAS = 4.0  # the clamp sits this many noise-share standard deviations beyond the clipping bound


def is_distributed(cfg: Config) -> bool:
    """Whether the run's user-level DP noise is added by the clients before secure aggregation."""
    return cfg.dp.user.enabled and cfg.dp.user.side == DISTRIBUTED


def share_std(noise_multiplier: float, clipping_norm: float, threshold: int) -> float:
    """One client's noise standard deviation: σC/√t, so any t or more shares sum to at least N(0, σ²C²)."""
    return noise_multiplier * clipping_norm / math.sqrt(threshold)


def least_clip_range(noise_multiplier: float, clipping_norm: float, threshold: int) -> float:
    """The smallest secagg.clip_range that clamps no value whose noise stays within CLAMP_SIGMAS deviations."""
    # a clipped update has no coordinate above C in magnitude
    return clipping_norm + CLAMP_SIGMAS * share_std(noise_multiplier, clipping_norm, threshold)


def noised_update(trained: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], clipping_norm: float,
                  std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """clip_C(trained − sent) + N(0, std²) per value (float64, keys of `sent`)."""
    update = {k: np.asarray(trained[k], dtype=np.float64) - np.asarray(sent[k], dtype=np.float64) for k in sent}
    norm = math.sqrt(sum(float(np.square(u).sum()) for u in update.values()))
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    return {k: u * scale + rng.normal(0.0, std, size=u.shape) for k, u in update.items()}


def check_config(cfg: Config, noise_multiplier: float, threshold: int) -> None:
    """Refuse distributed DP without secure aggregation, with adaptive clipping, or with too small a clamp."""
    u = cfg.dp.user
    if not cfg.secagg.enabled:
        raise ConfigError("dp.user.side = 'distributed' adds the noise on the clients and needs secure aggregation "
                          "to hide each noised update: set secagg.enabled = true (or dp.user.side = 'server')")
    if u.clipping != "fixed":
        raise ConfigError("dp.user.side = 'distributed' needs dp.user.clipping = 'fixed': adaptive clipping counts "
                          "each client's unclipped update, which secure aggregation hides")
    need = least_clip_range(noise_multiplier, u.clipping_norm, threshold)
    if cfg.secagg.clip_range < need:
        raise ConfigError(
            f"secagg.clip_range = {cfg.secagg.clip_range:g} would clamp noised values: with clipping norm "
            f"C = {u.clipping_norm:g}, noise multiplier {noise_multiplier:.4g} and threshold {threshold}, each "
            f"client's noise has std {share_std(noise_multiplier, u.clipping_norm, threshold):.4g}; set "
            f"secagg.clip_range >= C + {CLAMP_SIGMAS:g} std = {need:.4g}")

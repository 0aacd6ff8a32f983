"""Quantization and masks in the ring Z_mod, on Flower's primitives, and the error they cost.

Flower's `quantize` rounds stochastically with numpy's *global* generator. `quantize_vector` runs it
under a temporarily seeded global state and puts the caller's state back, so secure aggregation
neither consumes nor perturbs the random stream of the code around it (and a seed makes the
rounding reproducible in simulation).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    generate_shared_key,
)
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_mod
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
)

from fedpeft.secagg.options import SecAggOptions

Shapes = list[tuple[int, ...]]


@contextmanager
def _global_rng(seed: int | None) -> Iterator[None]:
    """Seed numpy's global generator for the block (OS entropy when `seed` is None), then restore it."""
    saved = np.random.get_state()
    np.random.seed(seed % (1 << 32) if seed is not None else int.from_bytes(os.urandom(4), "little"))
    try:
        yield
    finally:
        np.random.set_state(saved)


def quantize_vector(arrays: Sequence[np.ndarray], options: SecAggOptions,
                    rounding_seed: int | None = None) -> list[np.ndarray]:
    """Clip to [-c, c] and quantize stochastically to int64 levels in [0, target_range] (Flower's quantize)."""
    # float64 first: in float32, levels near 2**22 are only 0.5 apart and the rounding would be biased
    floats = [np.asarray(a, dtype=np.float64) for a in arrays]
    with _global_rng(rounding_seed):
        levels = quantize(floats, options.clip_range, options.target_range)
    return [q.astype(np.int64) for q in levels]


def dequantize_sum(levels: Sequence[np.ndarray], count: int, options: SecAggOptions) -> list[np.ndarray]:
    """The float64 sum of `count` clients' clipped vectors from the sum of their quantized levels."""
    # Flower's dequantize maps one client's levels back (shift -c); a sum of `count` carries count shifts
    out = dequantize(list(levels), options.clip_range, options.target_range)
    offset = -(count - 1) * options.clip_range
    return [np.asarray(a, dtype=np.float64) + offset for a in out]


def prg_mask(seed: bytes, shapes: Shapes, options: SecAggOptions) -> list[np.ndarray]:
    """int64 arrays of `shapes`, uniform in [0, mod_range) from all the bits of `seed` (Philox counter PRG)."""
    # Not Flower's `pseudo_rand_gen`: it keeps 32 bits of the seed (a server holding one client's
    # pairwise key could search the 2^32 self-mask seeds) and never draws mod_range - 1.
    if len(seed) < 16:
        raise ValueError(f"a mask seed needs at least 128 bits, got {8 * len(seed)}")
    words = np.frombuffer(seed[: len(seed) // 4 * 4], dtype="<u4")
    gen = np.random.Generator(np.random.Philox(np.random.SeedSequence(words.tolist())))
    return [gen.integers(0, options.mod_range, size=shape, dtype=np.int64) for shape in shapes]


def pairwise_seed(own_sk1: bytes, other_pk1: bytes) -> bytes:
    """The seed two nodes share (ECDH on their first key pairs + HKDF, as Flower's mod does)."""
    return generate_shared_key(bytes_to_private_key(own_sk1), bytes_to_public_key(other_pk1))


def add_mod(acc: list[np.ndarray], other: Sequence[np.ndarray], sign: int, options: SecAggOptions) -> list[np.ndarray]:
    """acc + sign * other, reduced modulo mod_range after every step (so int64 never overflows)."""
    if sign > 0:
        return parameters_mod([a + b for a, b in zip(acc, other, strict=True)], options.mod_range)
    return parameters_mod([a - b for a, b in zip(acc, other, strict=True)], options.mod_range)


def error_bound(options: SecAggOptions, count: int) -> float:
    """Largest possible |decoded sum - float sum of clipped vectors| per coordinate, for `count` clients."""
    # stochastic rounding moves each value by less than one level, so a sum of `count` by less than
    # count levels; the second term covers float64 round-off in quantize/dequantize (values up to count*c)
    eps = float(np.finfo(np.float64).eps)
    return count * options.step + 8.0 * count * options.clip_range * eps


def measure_error(vectors: Sequence[Sequence[np.ndarray]], options: SecAggOptions,
                  rounding_seeds: Sequence[int | None] | None = None) -> float:
    """Max |decoded sum - float sum of clipped vectors| over all coordinates, for these clients' vectors."""
    # masks cancel exactly in Z_mod, so the protocol's sum equals this plain sum of quantized levels
    seeds = list(rounding_seeds) if rounding_seeds is not None else [None] * len(vectors)
    levels = [quantize_vector(v, options, s) for v, s in zip(vectors, seeds, strict=True)]
    total = [np.sum(parts, axis=0) for parts in zip(*levels, strict=True)]
    decoded = dequantize_sum(total, len(vectors), options)
    exact = clipped_sum(vectors, options)
    return max((float(np.max(np.abs(d - e), initial=0.0)) for d, e in zip(decoded, exact, strict=True)),
               default=0.0)


def clipped_sum(vectors: Sequence[Sequence[np.ndarray]], options: SecAggOptions) -> list[np.ndarray]:
    """The float64 sum of the clients' vectors, each value clipped to [-c, c]: what SecAgg+ approximates."""
    c = options.clip_range
    clipped = [[np.clip(np.asarray(a, dtype=np.float64), -c, c) for a in v] for v in vectors]
    return [np.sum(parts, axis=0) for parts in zip(*clipped, strict=True)]

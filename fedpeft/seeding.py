"""Deterministic seeds: every random draw derives from (run seed, round, client id, purpose)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(run_seed: int, *parts: object) -> int:
    """A 63-bit seed that depends only on the run seed and the given parts (e.g. round, client, purpose)."""
    text = "|".join([str(run_seed), *map(str, parts)]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def rng(run_seed: int, *parts: object) -> np.random.Generator:
    """A numpy generator seeded from `derive_seed`."""
    return np.random.default_rng(derive_seed(run_seed, *parts))


def torch_generator(run_seed: int, *parts: object) -> torch.Generator:
    """A CPU torch generator seeded from `derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(run_seed, *parts))


def fixed_width_id(run_seed: int, *parts: object) -> int:
    """A seeded 64-bit id in [2**62, 2**63): one varint width, so ids never change a message's size."""
    return (1 << 62) | (derive_seed(run_seed, *parts) & ((1 << 62) - 1))

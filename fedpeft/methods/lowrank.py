"""Heterogeneous LoRA ranks: a rank tier per client, and moving LoRA factors between ranks.

A rank-r LoRA is stored inside a rank-r_max one as its first r rows of A and first r columns of
B, the rest zero. Zero rows of A and zero columns of B get exactly zero gradient (each one's
gradient is a product with the other), so a client trains a true rank-r LoRA in the r_max-shaped
model that every process caches, and only the rank-r slices travel. Shared by the HetLoRA/FlexLoRA
server half (`strategies.hetero_rank`) and client half (`clients.hetero_rank`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedpeft.methods.contract import TrainerKind
from fedpeft.seeding import rng

HETERO_RANK = TrainerKind("hetero_rank", "first-order steps on a rank-r slice of the r_max-shaped LoRA")
RANK_KEY = "lora-rank"  # the client's rank, in the config record sent down


def is_lora_a(key: str) -> bool:
    """Whether `key` names a LoRA A matrix (rank x in)."""
    return "lora_A" in key


def is_lora_b(key: str) -> bool:
    """Whether `key` names a LoRA B matrix (out x rank)."""
    return "lora_B" in key


def assign_ranks(num_clients: int, tiers: Mapping[int, float], seed: int) -> list[int]:
    """The LoRA rank of every client (list position = client id).

    Tier sizes follow the shares exactly up to rounding (largest remainder); which client lands
    in which tier is a seeded permutation, so the same run seed gives the same assignment.
    """
    ranks = sorted(tiers)
    quotas = [tiers[r] * num_clients for r in ranks]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(ranks)), key=lambda i: (counts[i] - quotas[i], ranks[i]))
    for i in by_remainder[: num_clients - sum(counts)]:
        counts[i] += 1
    order = rng(seed, "rank-tiers").permutation(num_clients)
    out = [0] * num_clients
    start = 0
    for rank, count in zip(ranks, counts):
        for cid in order[start : start + count]:
            out[int(cid)] = rank
        start += count
    return out


def truncate_lora(state: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The rank-`rank` slices of every LoRA factor in `state` (other tensors unchanged)."""
    out = {}
    for key, value in state.items():
        if is_lora_a(key):
            value = value[:rank]
        elif is_lora_b(key):
            value = value[:, :rank]
        out[key] = np.ascontiguousarray(value)
    return out


def pad_lora(state: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """LoRA factors of a lower rank zero-padded to `shapes` (the largest rank); other tensors unchanged."""
    out = {}
    for key, value in state.items():
        shape = tuple(shapes[key])
        if tuple(value.shape) == shape:
            out[key] = value
            continue
        if not (is_lora_a(key) or is_lora_b(key)) or len(value.shape) != len(shape) or any(
            a > b for a, b in zip(value.shape, shape)
        ):
            raise ValueError(f"'{key}' has shape {list(value.shape)}, which does not fit in {list(shape)}")
        padded = np.zeros(shape, dtype=value.dtype)
        padded[tuple(slice(0, n) for n in value.shape)] = value
        out[key] = padded
    return out


def truncated_shapes(shapes: Mapping[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
    """The shapes `truncate_lora` gives for tensors of `shapes`."""
    out = {}
    for key, shape in shapes.items():
        if is_lora_a(key):
            shape = (min(rank, shape[0]), *shape[1:])
        elif is_lora_b(key):
            shape = (shape[0], min(rank, shape[1]), *shape[2:])
        out[key] = tuple(shape)
    return out

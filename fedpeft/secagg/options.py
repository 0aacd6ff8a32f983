"""SecAgg+ options, the neighbour graph, and the two errors the protocol raises.

The numbers follow Flower's SecAgg+ (`flwr.server.workflow.secure_aggregation`): a client's values
are clipped to [-clip_range, clip_range], mapped onto the integers [0, target_range] with
target_range = 2**quantization_bits, masked modulo mod_range = 2**mod_bits. Flower's defaults are
clip 8.0, target 2**22, modulus 2**32; they are ours too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class SecAggError(RuntimeError):
    """The protocol cannot go on: too few parties are left, or a party saw a request it must refuse."""

    def __init__(self, stage: str, message: str, *, alive: int | None = None, needed: int | None = None,
                 node_id: int | None = None) -> None:
        self.stage, self.alive, self.needed, self.node_id = stage, alive, needed, node_id
        super().__init__(f"secure aggregation aborted at stage '{stage}': {message}")


class SecAggReplyError(ValueError):
    """One reply is malformed; the server did not record it, so the node counts as dropped at this stage."""


@dataclass(frozen=True)
class SecAggOptions:
    """One round's SecAgg+ parameters; invalid combinations raise ValueError naming the field."""

    num_clients: int  # n: nodes sampled for the round (the server's setup request goes to all of them)
    threshold: int  # t: shares needed to rebuild a secret; also the fewest clients a sum may cover
    num_shares: int | None = None  # k: neighbourhood size, the node itself included; None: n (classic SecAgg)
    clip_range: float = 8.0  # c: each value is clipped to [-c, c] before quantization
    quantization_bits: int = 22  # target_range = 2**bits quantization levels over [-c, c]
    mod_bits: int = 32  # mod_range = 2**bits, the ring the masks live in

    def __post_init__(self) -> None:
        n, t, k = self.num_clients, self.threshold, self.neighbourhood_size
        if not isinstance(n, int) or n < 3:
            # with two clients the sum minus one's own vector is the other's vector
            raise ValueError(f"num_clients = {n}: secure aggregation needs at least 3 clients in the round")
        if not isinstance(k, int) or not 3 <= k <= n:
            raise ValueError(f"num_shares = {k}: must lie in [3, num_clients = {n}]")
        if k < n and k % 2 == 0:
            # the ring graph gives a node itself plus (k-1)/2 neighbours on each side: k must be odd
            raise ValueError(f"num_shares = {k}: must be odd when below num_clients = {n} (or equal to it)")
        if not isinstance(t, int) or t < 2:
            raise ValueError(f"threshold = {t}: must be at least 2 (one share alone would reveal a secret)")
        if t > k:
            raise ValueError(f"threshold = {t} > num_shares = {k}: a secret could never be rebuilt")
        if 2 * t <= k:
            # two disjoint groups of t neighbours could then hand a server both the mask seed and the
            # mask key of one client, unmasking its vector
            raise ValueError(f"threshold = {t}: must exceed num_shares / 2 = {k / 2:g} so no server can "
                             "collect both secrets of one client")
        if not (isinstance(self.clip_range, (int, float)) and math.isfinite(self.clip_range)
                and self.clip_range > 0):
            raise ValueError(f"clip_range = {self.clip_range}: must be a finite number > 0")
        if not isinstance(self.quantization_bits, int) or not 1 <= self.quantization_bits <= 30:
            # Flower's quantize returns int32, so target_range (the largest level) stays below 2**31
            raise ValueError(f"quantization_bits = {self.quantization_bits}: must lie in [1, 30]")
        if not isinstance(self.mod_bits, int) or not self.quantization_bits < self.mod_bits <= 62:
            raise ValueError(f"mod_bits = {self.mod_bits}: must lie in (quantization_bits = "
                             f"{self.quantization_bits}, 62]")
        if n * self.target_range >= self.mod_range:
            # the sum of n quantized vectors must not wrap around the modulus, or it cannot be decoded
            raise ValueError(f"num_clients * 2**quantization_bits = {n} * 2**{self.quantization_bits} >= "
                             f"2**mod_bits = 2**{self.mod_bits}: the sum would overflow; lower "
                             "quantization_bits or raise mod_bits")

    @property
    def neighbourhood_size(self) -> int:
        """k: each node's neighbourhood size, itself included (num_shares, or n when unset)."""
        return self.num_clients if self.num_shares is None else self.num_shares

    @property
    def target_range(self) -> int:
        """Flower's `target_range`: [-c, c] maps onto the integers [0, target_range]."""
        return 1 << self.quantization_bits

    @property
    def mod_range(self) -> int:
        """Flower's `mod_range`: masks and masked vectors live in the integers modulo this."""
        return 1 << self.mod_bits

    @property
    def step(self) -> float:
        """The quantization step: one integer level is this much in float units."""
        return 2.0 * self.clip_range / self.target_range

    @property
    def wire_dtype(self) -> str:
        """The unsigned dtype of a masked vector on the wire (every value is below mod_range)."""
        return "uint32" if self.mod_bits <= 32 else "uint64"


def neighbourhoods(node_ids: Iterable[int], num_shares: int,
                   seed: int | None = None) -> dict[int, frozenset[int]]:
    """SecAgg+'s neighbour graph, built as Flower builds it: a shuffled ring, each node with ±(k-1)/2 others."""
    # Flower's workflow does this inline (setup_stage), so it cannot be imported; the seed makes it reproducible
    ids = sorted(set(node_ids))
    random.Random(seed).shuffle(ids)
    n, half = len(ids), num_shares // 2
    if num_shares >= n:
        everyone = frozenset(ids)
        return dict.fromkeys(ids, everyone)
    return {nid: frozenset(ids[(i + off) % n] for off in range(-half, half + 1)) for i, nid in enumerate(ids)}


def prune(members: set[int], graph: dict[int, frozenset[int]], threshold: int) -> set[int]:
    """Drop, until none is left, members with fewer than `threshold` members in their neighbourhood."""
    # such a node could never have its secrets rebuilt should it drop later; its neighbours just leave it out
    kept = set(members)
    while True:
        weak = {u for u in kept if len(graph[u] & kept) < threshold}
        if not weak:
            return kept
        kept -= weak


def sorted_ids(ids: Sequence[int] | set[int] | frozenset[int]) -> list[int]:
    """Node ids in ascending order (every list on the wire is sorted, so messages are reproducible)."""
    return sorted(ids)

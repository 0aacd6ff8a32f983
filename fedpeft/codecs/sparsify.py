"""Sparsifiers: top-k (positions travel), seeded rand-k and DARE (positions derive from the shared seed)."""

from __future__ import annotations

import numpy as np

from fedpeft.codecs.registry import (
    CodecSpecError,
    Draw,
    Sparsifier,
    amount,
    how_many,
    register_codec,
)


@register_codec("topk")
class TopK(Sparsifier):
    """Keep the largest-magnitude entries: `topk:0.05` (fraction) or `topk:500` (count), per tensor or `:global`."""

    def __init__(self, amount_: float, scope: str = "tensor") -> None:
        self.amount, self.scope = amount_, scope

    @classmethod
    def from_args(cls, args: list[str]) -> TopK:
        """`topk:<fraction or count>[:tensor|global]`."""
        if not args or len(args) > 2:
            raise CodecSpecError("'topk' needs an amount, e.g. topk:0.05 or topk:0.05:global")
        scope = args[1] if len(args) == 2 else "tensor"
        if scope not in ("tensor", "global"):
            raise CodecSpecError(f"topk scope must be 'tensor' or 'global', got '{scope}'")
        return cls(amount(args[0], "topk amount"), scope)

    def select(self, flat: dict[str, np.ndarray], keys: list[str], draw: Draw) -> dict[str, np.ndarray]:
        """Positions of the top entries by magnitude (ties broken by position, so it is deterministic)."""
        if self.scope == "tensor":
            return {k: _top(np.abs(flat[k]), how_many(self.amount, len(flat[k]))) for k in keys}
        mags = np.concatenate([np.abs(flat[k]) for k in keys])
        keep = np.zeros(len(mags), dtype=bool)
        keep[_top(mags, how_many(self.amount, len(mags)))] = True
        out, start = {}, 0
        for k in keys:
            out[k] = np.flatnonzero(keep[start:start + len(flat[k])])
            start += len(flat[k])
        return out


def _top(mags: np.ndarray, k: int) -> np.ndarray:
    # argpartition finds the k largest in O(n); a stable sort on the candidates fixes ties.
    if k >= len(mags):
        return np.arange(len(mags))
    cand = np.argpartition(-mags, k - 1)[:k]
    return np.sort(cand)


@register_codec("randk")
class RandK(Sparsifier):
    """Keep a random subset drawn from (run seed, round, client, tensor): `randk:0.1`; no indices travel."""

    explicit = False

    def __init__(self, amount_: float) -> None:
        self.amount = amount_

    @classmethod
    def from_args(cls, args: list[str]) -> RandK:
        """`randk:<fraction or count>`."""
        if len(args) != 1:
            raise CodecSpecError("'randk' needs one amount, e.g. randk:0.1")
        return cls(amount(args[0], "randk amount"))

    def seeded_positions(self, index: int, n: int, draw: Draw) -> np.ndarray:
        """A uniform k-subset of range(n), sorted."""
        return np.sort(draw.rng("randk", index).choice(n, size=how_many(self.amount, n), replace=False))


@register_codec("dare")
class Dare(Sparsifier):
    """DARE: drop each entry with probability p and rescale the kept ones by 1/(1-p): `dare:0.9`; mask seeded."""

    explicit = False

    def __init__(self, p: float) -> None:
        self.p = p
        self.scale = 1.0 / (1.0 - p)

    @classmethod
    def from_args(cls, args: list[str]) -> Dare:
        """`dare:<drop probability>`."""
        if len(args) != 1:
            raise CodecSpecError("'dare' needs a drop probability, e.g. dare:0.9")
        try:
            p = float(args[0])
        except ValueError:
            raise CodecSpecError(f"dare drop probability '{args[0]}' is not a number") from None
        if not 0 < p < 1:
            raise CodecSpecError(f"dare drop probability must be in (0, 1), got {p}")
        return cls(p)

    def seeded_positions(self, index: int, n: int, draw: Draw) -> np.ndarray:
        """Each position kept with probability 1-p."""
        return np.flatnonzero(draw.rng("dare", index).random(n) >= self.p)

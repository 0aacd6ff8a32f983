"""Codec stages by name: each stage module registers its classes here, parsed from `name[:arg[:arg]]`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedpeft.codecs.wire import Reader, Writer
from fedpeft.seeding import rng


class CodecSpecError(ValueError):
    """A codec chain in a recipe that cannot be built; the message says which stage and why."""


@dataclass(frozen=True)
class Draw:
    """Where a payload's random draws come from: (run seed, round, client id); the server knows all three."""

    seed: int
    round: int
    client: int

    def rng(self, *parts: object) -> np.random.Generator:
        """A generator for one purpose (e.g. the rand-k mask of tensor 3)."""
        return rng(self.seed, self.round, self.client, "codec", *parts)


class Stage:
    """One named step of a chain; `kind` says where in the chain it may stand."""

    name = ""
    kind = ""  # "delta" | "sparsifier" | "values"

    @classmethod
    def from_args(cls, args: list[str]) -> Stage:
        """Build the stage from the text after its name (default: no arguments allowed)."""
        if args:
            raise CodecSpecError(f"'{cls.name}' takes no arguments, got {':'.join(args)!r}")
        return cls()


class Sparsifier(Stage):
    """Chooses which entries of each tensor travel."""

    kind = "sparsifier"
    explicit = True  # positions travel in the payload; else they derive from the shared seed
    scale = 1.0  # factor applied to kept values (DARE rescales)

    def select(self, flat: dict[str, np.ndarray], keys: list[str], draw: Draw) -> dict[str, np.ndarray]:
        """Sorted positions to keep, per tensor."""
        return {k: self.seeded_positions(i, len(flat[k]), draw) for i, k in enumerate(keys)}

    def seeded_positions(self, index: int, n: int, draw: Draw) -> np.ndarray:
        """Positions of tensor number `index` drawn from the shared seed (non-explicit sparsifiers)."""
        raise NotImplementedError


class ValueCoder(Stage):
    """Writes the travelling values of one tensor and reads them back."""

    kind = "values"
    lossless = False

    def encode(self, w: Writer, values: np.ndarray, gen: np.random.Generator) -> None:
        """Append `values` (float32) to the payload."""
        raise NotImplementedError

    def decode(self, r: Reader, count: int, what: str) -> np.ndarray:
        """Read `count` values (float32)."""
        raise NotImplementedError

    def max_bytes(self, count: int) -> int:
        """The most bytes `count` values may take (bounds the payload size)."""
        return 4 * count + 8


class Delta(Stage):
    """Send the update (local − received), not the weights."""

    name = "delta"
    kind = "delta"


_CODECS: dict[str, type[Stage]] = {"delta": Delta}


def register_codec(name: str):
    """Class decorator: register a codec stage under `name`."""

    def deco(cls: type[Stage]) -> type[Stage]:
        if name in _CODECS and _CODECS[name] is not cls:
            raise ValueError(f"codec '{name}' is already registered by {_CODECS[name].__qualname__}")
        cls.name = name
        _CODECS[name] = cls
        return cls

    return deco


def available_codecs() -> list[str]:
    """Names of every registered codec stage."""
    return sorted(_CODECS)


def parse_stage(text: str) -> Stage:
    """The stage described by `name[:arg[:arg]]`."""
    name, *args = [p.strip() for p in str(text).split(":")]
    if name not in _CODECS:
        raise CodecSpecError(f"unknown codec '{name}' (known: {', '.join(available_codecs())})")
    return _CODECS[name].from_args(args)


def amount(text: str, what: str) -> float:
    """A fraction in (0, 1) or a whole count >= 1."""
    try:
        v = float(text)
    except ValueError:
        raise CodecSpecError(f"{what}: '{text}' is not a number (a fraction like 0.05 or a count like 500)") from None
    if not (0 < v < 1 or (v >= 1 and v.is_integer())):
        raise CodecSpecError(f"{what}: {text} must be a fraction in (0, 1) or a whole count >= 1")
    return v


def how_many(amount_: float, n: int) -> int:
    """Entries kept out of `n` for a fraction or count."""
    return min(n, max(1, round(amount_ * n)) if amount_ < 1 else int(amount_))

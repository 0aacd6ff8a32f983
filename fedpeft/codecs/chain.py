"""A codec chain: `[delta] [sparsifier] [value coder]`, turned into one packed payload and back.

Payload layout (little-endian): b"FP", version, the chain text (so a mismatch or an unknown codec
is caught before decoding), the tensor count, then per tensor in sorted-key order: positions (top-k
only; indices, gaps or bitmap, whichever is smallest) and the values as the value coder writes them.
The tensor names, shapes and order are known to both sides, so none of that travels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from fedpeft.codecs.registry import (
    CodecSpecError,
    Delta,
    Draw,
    Sparsifier,
    ValueCoder,
    parse_stage,
)
from fedpeft.codecs.wire import (
    PayloadError,
    Reader,
    Writer,
    read_positions,
    write_positions,
)

MAGIC = b"FP"
VERSION = 1
_ORDER = {"delta": 0, "sparsifier": 1, "values": 2}


class Chain:
    """A parsed chain; `encode` packs a set of tensors, `decode` checks and unpacks a payload."""

    def __init__(self, stages: Iterable[str], direction: str = "up") -> None:
        texts = [str(s).strip() for s in stages]
        parsed = [parse_stage(t) for t in texts]
        for prev, cur in zip(parsed, parsed[1:]):
            if _ORDER[cur.kind] <= _ORDER[prev.kind]:
                raise CodecSpecError(
                    f"'{cur.name}' cannot follow '{prev.name}': a chain is [delta] [one sparsifier] [one value coder]"
                )
        self.text = ",".join(texts)
        self.delta = any(isinstance(s, Delta) for s in parsed)
        self.sparsifier: Sparsifier | None = next((s for s in parsed if s.kind == "sparsifier"), None)
        coder = next((s for s in parsed if s.kind == "values"), None)
        self.coder: ValueCoder = coder if coder is not None else parse_stage("fp32")
        if self.sparsifier is not None and not self.delta:
            raise CodecSpecError(
                f"'{self.sparsifier.name}' needs 'delta' before it: sparsifying weights instead of updates "
                "would zero most of the adapter"
            )
        if direction == "down" and (self.delta or self.sparsifier is not None or self.coder.name == "ternary"):
            raise CodecSpecError("download chains may only cast or quantize: fp32, fp16, bf16, int8, int4")

    @property
    def lossless(self) -> bool:
        """Whether decode(encode(x)) == x exactly."""
        return self.sparsifier is None and self.coder.lossless

    def encode(self, tensors: Mapping[str, np.ndarray], draw: Draw) -> bytes:
        """Pack `tensors` (float32, any shapes) into one payload."""
        keys = sorted(tensors)
        flat = {k: np.asarray(tensors[k], dtype=np.float32).ravel() for k in keys}
        chosen = self.sparsifier.select(flat, keys, draw) if self.sparsifier else None
        w = Writer()
        w.array(np.frombuffer(MAGIC, dtype=np.uint8))
        w.u8(VERSION)
        text = self.text.encode()
        w.u8(len(text))
        w.array(np.frombuffer(text, dtype=np.uint8))
        w.u16(len(keys))
        for i, k in enumerate(keys):
            values = flat[k]
            if chosen is not None:
                if self.sparsifier.explicit:
                    write_positions(w, chosen[k], len(values))
                values = values[chosen[k]] * np.float32(self.sparsifier.scale)
            self.coder.encode(w, values, draw.rng("values", i))
        return w.getvalue()

    def max_bytes(self, template: Mapping[str, tuple[int, ...]]) -> int:
        """The largest payload this chain can produce for `template` (larger ones are rejected)."""
        total = len(MAGIC) + 4 + len(self.text.encode())
        for shape in template.values():
            n = math.prod(shape)
            total += 10 + self.coder.max_bytes(n) + (4 * n if self.sparsifier and self.sparsifier.explicit else 0)
        return total

    def decode(
        self, payload: bytes, template: Mapping[str, tuple[int, ...]], draw: Draw
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray | None]]:
        """(dense tensors, positions that travelled or None when all did) from a payload; PayloadError if malformed."""
        if not isinstance(payload, (bytes, bytearray)):
            raise PayloadError(f"wrong dtype: payload must be bytes, got {type(payload).__name__}")
        bound = self.max_bytes(template)
        if len(payload) > bound:
            raise PayloadError(f"oversized payload: {len(payload)} bytes > {bound} possible for this chain")
        r = Reader(bytes(payload))
        if bytes(r.take(2, "magic")) != MAGIC:
            raise PayloadError("not a fedpeft codec payload (bad magic bytes)")
        version = r.u8("version")
        if version != VERSION:
            raise PayloadError(f"payload version {version}, expected {VERSION}")
        text = bytes(r.take(r.u8("chain length"), "chain")).decode("ascii", errors="replace")
        if text != self.text:
            try:
                Chain(text.split(","))
            except CodecSpecError as err:
                raise PayloadError(f"payload chain '{text}': {err}") from None
            raise PayloadError(f"payload chain '{text}' differs from this run's chain '{self.text}'")
        keys = sorted(template)
        count = r.u16("tensor count")
        if count != len(keys):
            raise PayloadError(f"length mismatch: payload has {count} tensors, expected {len(keys)}")
        dense, support = {}, {}
        for i, k in enumerate(keys):
            n = math.prod(template[k])
            idx = None
            if self.sparsifier is not None:
                idx = read_positions(r, n, k) if self.sparsifier.explicit else self.sparsifier.seeded_positions(i, n, draw)
            values = self.coder.decode(r, n if idx is None else len(idx), k)
            if not np.isfinite(values).all():
                raise PayloadError(f"{k}: non-finite values")
            if idx is None:
                out = values
            else:
                out = np.zeros(n, dtype=np.float32)
                out[idx] = values
            dense[k] = out.reshape(template[k])
            support[k] = idx
        r.done()
        return dense, support

"""Value coders: fp32 (lossless), fp16 / bf16 casts, ternary (sign × scale), int8 / int4 with stochastic rounding."""

from __future__ import annotations

import numpy as np

from fedpeft.codecs.registry import CodecSpecError, ValueCoder, register_codec
from fedpeft.codecs.wire import PayloadError, Reader, Writer, finite_scales


@register_codec("fp32")
class Float32(ValueCoder):
    """Values as they are (lossless)."""

    lossless = True

    def encode(self, w: Writer, values: np.ndarray, gen: np.random.Generator) -> None:
        """4 bytes per value."""
        w.array(values.astype("<f4"))

    def decode(self, r: Reader, count: int, what: str) -> np.ndarray:
        """Read float32 values."""
        return r.array("<f4", count, f"{what} values").astype(np.float32)


@register_codec("fp16")
class Float16(ValueCoder):
    """IEEE half precision, 2 bytes per value (round to nearest)."""

    def encode(self, w: Writer, values: np.ndarray, gen: np.random.Generator) -> None:
        """2 bytes per value; values beyond ±65504 saturate rather than becoming Inf."""
        w.array(np.clip(values, -65504, 65504).astype("<f2"))

    def decode(self, r: Reader, count: int, what: str) -> np.ndarray:
        """Read float16 values."""
        return r.array("<f2", count, f"{what} values").astype(np.float32)

    def max_bytes(self, count: int) -> int:
        """2 bytes per value."""
        return 2 * count


@register_codec("bf16")
class BFloat16(ValueCoder):
    """bfloat16 (float32's range, 8 bits of mantissa), 2 bytes per value, round to nearest even."""

    def encode(self, w: Writer, values: np.ndarray, gen: np.random.Generator) -> None:
        """The upper 16 bits of each float32, rounded."""
        bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        w.array(rounded.astype("<u2"))

    def decode(self, r: Reader, count: int, what: str) -> np.ndarray:
        """Widen back to float32."""
        upper = r.array("<u2", count, f"{what} values").astype(np.uint32)
        return (upper << 16).view(np.float32)

    def max_bytes(self, count: int) -> int:
        """2 bytes per value."""
        return 2 * count


@register_codec("ternary")
class Ternary(ValueCoder):
    """ComPEFT-style: each value becomes sign × one scale per tensor (the mean magnitude); 1 bit per value.

    After top-k the zeros are implied by the positions, so only signs travel (<= 2 bits per entry).
    """

    def encode(self, w: Writer, values: np.ndarray, gen: np.random.Generator) -> None:
        """A float32 scale, then one sign bit per value."""
        w.f32(float(np.abs(values).mean()) if len(values) else 0.0)
        w.array(np.packbits(values < 0))

    def decode(self, r: Reader, count: int, what: str) -> np.ndarray:
        """±scale per value."""
        scale = finite_scales([r.f32(f"{what} scale")], what)[0]
        negative = np.unpackbits(r.array("<u1", (count + 7) // 8, f"{what} signs"))[:count].astype(bool)
        return np.where(negative, -scale, scale).astype(np.float32)

    def max_bytes(self, count: int) -> int:
        """A scale and a bit per value."""
        return 4 + (count + 7) // 8


class _Integer(ValueCoder):
    """Symmetric integer quantization with one float32 scale per block and stochastic rounding.

    Stochastic rounding makes the quantized value unbiased: E[q·s] = v.
    """

    bits = 8

    def __init__(self, block: int = 0) -> None:
        self.block = block
        self.qmax = 2 ** (self.bits - 1) - 1

    @classmethod
    def from_args(cls, args: list[str]) -> _Integer:
        """`int8` (one scale per tensor) or `int8:64` (one scale per block of 64 values)."""
        if len(args) > 1:
            raise CodecSpecError(f"'{cls.name}' takes at most a block size, e.g. {cls.name}:64")
        if not args:
            return cls()
        if not args[0].isdigit() or int(args[0]) < 1:
            raise CodecSpecError(f"{cls.name} block size must be a whole number >= 1, got '{args[0]}'")
        return cls(int(args[0]))

    def _blocks(self, count: int) -> int:
        size = self.block or max(count, 1)
        return (count + size - 1) // size

    def encode(self, w: Writer, values: np.ndarray, gen: np.random.Generator) -> None:
        """Scales (float32), then codes."""
        count = len(values)
        nb = self._blocks(count)
        size = self.block or max(count, 1)
        padded = np.zeros(nb * size, dtype=np.float64)
        padded[:count] = values
        blocks = padded.reshape(nb, size)
        scales = np.abs(blocks).max(axis=1) / self.qmax
        safe = np.where(scales > 0, scales, 1.0)
        q = np.floor(blocks / safe[:, None] + gen.random(blocks.shape))
        q = np.clip(q, -self.qmax, self.qmax).astype(np.int64).ravel()[:count]
        w.array(scales.astype("<f4"))
        w.array(self._pack(q))

    def decode(self, r: Reader, count: int, what: str) -> np.ndarray:
        """Codes × their block's scale."""
        nb = self._blocks(count)
        scales = finite_scales(r.array("<f4", nb, f"{what} scales"), what)
        q = self._unpack(r, count, what)
        if count and np.abs(q).max() > self.qmax:
            raise PayloadError(f"{what}: {self.name} code out of range")
        size = self.block or max(count, 1)
        return (q * np.repeat(scales, size)[:count]).astype(np.float32)

    def _pack(self, q: np.ndarray) -> np.ndarray:
        return q.astype("<i1")

    def _unpack(self, r: Reader, count: int, what: str) -> np.ndarray:
        return r.array("<i1", count, f"{what} codes").astype(np.int64)

    def max_bytes(self, count: int) -> int:
        """Scales plus codes."""
        return 4 * self._blocks(count) + count


@register_codec("int8")
class Int8(_Integer):
    """8-bit codes in [-127, 127]."""

    bits = 8


@register_codec("int4")
class Int4(_Integer):
    """4-bit codes in [-7, 7], two per byte."""

    bits = 4

    def _pack(self, q: np.ndarray) -> np.ndarray:
        nib = (q + 8).astype(np.uint8)  # 1..15; 0 never appears, so it can mark padding
        if len(nib) % 2:
            nib = np.append(nib, np.uint8(0))
        return (nib[0::2] | (nib[1::2] << 4)).astype("<u1")

    def _unpack(self, r: Reader, count: int, what: str) -> np.ndarray:
        packed = r.array("<u1", (count + 1) // 2, f"{what} codes")
        nib = np.empty(2 * len(packed), dtype=np.int64)
        nib[0::2], nib[1::2] = packed & 0x0F, packed >> 4
        nib = nib[:count]
        if count and (nib == 0).any():
            raise PayloadError(f"{what}: int4 code out of range")
        return nib - 8

    def max_bytes(self, count: int) -> int:
        """Scales plus half a byte per code."""
        return 4 * self._blocks(count) + (count + 1) // 2

"""Byte-level parts of a packed update payload: a bounds-checked reader and writer, position sets, bit packing.

Every read is checked, so a truncated, padded or inconsistent payload raises `PayloadError` with
the reason instead of decoding into garbage.
"""

from __future__ import annotations

import struct

import numpy as np


class PayloadError(ValueError):
    """A compressed payload that cannot be decoded; the message says why."""


class Writer:
    """Appends little-endian fields and arrays to one byte string."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, v: int) -> None:
        """One unsigned byte."""
        self.parts.append(struct.pack("<B", v))

    def u16(self, v: int) -> None:
        """One unsigned 16-bit integer."""
        self.parts.append(struct.pack("<H", v))

    def u32(self, v: int) -> None:
        """One unsigned 32-bit integer."""
        self.parts.append(struct.pack("<I", v))

    def f32(self, v: float) -> None:
        """One float32."""
        self.parts.append(struct.pack("<f", v))

    def array(self, a: np.ndarray) -> None:
        """The raw bytes of `a` (the caller picks a little-endian dtype)."""
        self.parts.append(np.ascontiguousarray(a).tobytes())

    def getvalue(self) -> bytes:
        """Everything written so far."""
        return b"".join(self.parts)


class Reader:
    """Reads what `Writer` wrote; every read names what it reads, for the error message."""

    def __init__(self, data: bytes) -> None:
        self.buf = memoryview(data)
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        """The next `n` bytes."""
        if n < 0 or self.pos + n > len(self.buf):
            raise PayloadError(f"payload truncated: {what} needs {n} bytes, {len(self.buf) - self.pos} left")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        """One unsigned byte."""
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        """One unsigned 16-bit integer."""
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        """One unsigned 32-bit integer."""
        return struct.unpack("<I", self.take(4, what))[0]

    def f32(self, what: str) -> float:
        """One float32."""
        return struct.unpack("<f", self.take(4, what))[0]

    def array(self, dtype: str | np.dtype, count: int, what: str) -> np.ndarray:
        """`count` elements of `dtype`."""
        dt = np.dtype(dtype)
        return np.frombuffer(self.take(count * dt.itemsize, what), dtype=dt, count=count)

    def done(self) -> None:
        """Fail if bytes are left over (a length mismatch)."""
        if self.pos != len(self.buf):
            raise PayloadError(f"length mismatch: {len(self.buf) - self.pos} bytes left after the last tensor")


def finite_scales(scales: np.ndarray, what: str) -> np.ndarray:
    """`scales` as float32 if all are finite and >= 0, else PayloadError."""
    scales = np.asarray(scales, dtype=np.float32)
    if not np.isfinite(scales).all():
        raise PayloadError(f"{what}: NaN or Inf scale")
    if (scales < 0).any():
        raise PayloadError(f"{what}: negative scale")
    return scales


# ----- position sets --------------------------------------------------------------------
# Explicit positions (top-k) travel in whichever of three forms is smallest for this tensor:
# sorted indices in the narrowest unsigned type, gaps between them (first index, then
# differences; small when positions are dense), or a bitmap of n bits.
POS_INDEX, POS_GAPS, POS_BITMAP = 1, 2, 3
_UINTS = (np.dtype("<u1"), np.dtype("<u2"), np.dtype("<u4"))


def uint_for(max_value: int) -> np.dtype:
    """The narrowest unsigned dtype holding `max_value`."""
    for dt in _UINTS:
        if max_value <= np.iinfo(dt).max:
            return dt
    raise ValueError(f"{max_value} does not fit in 32 bits")


def position_sizes(idx: np.ndarray, n: int) -> dict[int, int]:
    """Bytes each position form would take for sorted unique indices `idx` into a tensor of `n`."""
    k = len(idx)
    gaps = np.diff(idx, prepend=0) if k else idx
    return {
        POS_INDEX: k * uint_for(max(n - 1, 0)).itemsize,
        POS_GAPS: k * uint_for(int(gaps.max()) if k else 0).itemsize,
        POS_BITMAP: (n + 7) // 8,
    }


def write_positions(w: Writer, idx: np.ndarray, n: int) -> None:
    """Write sorted unique positions `idx` (< n) in their smallest form."""
    sizes = position_sizes(idx, n)
    form = min(sizes, key=lambda f: (sizes[f], f))
    w.u8(form)
    w.u32(len(idx))
    if form == POS_BITMAP:
        bits = np.zeros(n, dtype=bool)
        bits[idx] = True
        w.array(np.packbits(bits))
        return
    values = idx if form == POS_INDEX else np.diff(idx, prepend=0)
    dt = uint_for(max(n - 1, 0)) if form == POS_INDEX else uint_for(int(values.max()) if len(values) else 0)
    w.u8(dt.itemsize)
    w.array(values.astype(dt))


def read_positions(r: Reader, n: int, what: str) -> np.ndarray:
    """Read positions written by `write_positions`, checking range, order and count."""
    form = r.u8(f"{what} position form")
    count = r.u32(f"{what} position count")
    if count > n:
        raise PayloadError(f"{what}: {count} positions for a tensor of {n} elements")
    if form == POS_BITMAP:
        bits = np.unpackbits(r.array("<u1", (n + 7) // 8, f"{what} bitmap"))
        if bits[n:].any():
            raise PayloadError(f"{what}: index out of range (bitmap bit beyond {n})")
        idx = np.flatnonzero(bits[:n])
        if len(idx) != count:
            raise PayloadError(f"{what}: length mismatch, bitmap has {len(idx)} positions, header says {count}")
        return idx
    if form not in (POS_INDEX, POS_GAPS):
        raise PayloadError(f"{what}: unknown position form {form}")
    width = r.u8(f"{what} index width")
    if width not in (1, 2, 4):
        raise PayloadError(f"{what}: index width {width} is not 1, 2 or 4 bytes")
    raw = r.array(np.dtype(f"<u{width}"), count, f"{what} positions").astype(np.int64)
    if form == POS_GAPS:
        if count > 1 and (raw[1:] == 0).any():
            raise PayloadError(f"{what}: duplicate indices (zero gap)")
        idx = np.cumsum(raw)
    else:
        idx = raw
        if count > 1 and (np.diff(idx) <= 0).any():
            raise PayloadError(f"{what}: duplicate or unsorted indices")
    if count and idx[-1] >= n:
        raise PayloadError(f"{what}: index out of range ({int(idx[-1])} >= {n})")
    return idx

"""Zeroth-order primitives shared by FedKSeed's server and clients: seeded directions, replay, packing.

A direction z for a step seed is regenerated, never stored. The tuned tensors are seen as one
flat vector cut into fixed-size chunks (a chunk may span several small tensors); every chunk
draws from its own generator seeded by (step seed, chunk index). Chunks are independent, so they
are generated on several threads at once, yet the values do not depend on thread count or
timing: every process gets bit-identical directions.

A client's local steps (`ZOStepper`) generate each step's z once into a buffer the size of the
tuned weights and reuse it for the step's three in-place adds; replay makes every seed's add to a
chunk while that chunk is in cache. Both leave the same bits as one `perturb` per add.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch

from fedpeft.seeding import derive_seed

CHUNK = 1 << 20  # elements per independently seeded chunk
DIRECTIONS = ("gaussian", "rademacher")


@lru_cache(maxsize=1)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fedpeft-zo")


def seed_pool(run_seed: int, k: int) -> np.ndarray:
    """The K candidate step seeds shared by server and clients."""
    return np.array([derive_seed(run_seed, "fedkseed-pool", i) for i in range(k)], dtype=np.int64)


def tuned_parameters(model: torch.nn.Module, scope: str) -> list[torch.Tensor]:
    """The tensors ZO tunes, in a fixed order: the adapter's trainable ones, or every parameter."""
    named = sorted(model.named_parameters(), key=lambda kv: kv[0])
    if scope == "adapter":
        return [p.data for _, p in named if p.requires_grad]
    return [p.data for _, p in named]


Piece = tuple[torch.Tensor, int]  # (a flat slice of one tensor, its offset inside the chunk)


def _chunks(params: Sequence[torch.Tensor]) -> list[tuple[int, int, list[Piece]]]:
    """(chunk index, chunk length, pieces) over the concatenation of `params`."""
    out: list[tuple[int, int, list[Piece]]] = []
    pieces: list[Piece] = []
    fill = 0
    for p in params:
        flat, start = p.view(-1), 0
        while start < flat.numel():
            take = min(CHUNK - fill, flat.numel() - start)
            pieces.append((flat[start : start + take], fill))
            fill += take
            start += take
            if fill == CHUNK:
                out.append((len(out), fill, pieces))
                pieces, fill = [], 0
    if fill:
        out.append((len(out), fill, pieces))
    return out


_local = threading.local()


def default_threads() -> int:
    """Threads that generate directions: torch's intra-op thread count (a client worker pins it to its CPUs)."""
    return max(1, torch.get_num_threads())


def _scratch(n: int, dtype: torch.dtype) -> torch.Tensor:
    # One reusable buffer per thread: freshly allocated pages cost more than generating into them.
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < n or buf.dtype != dtype:
        with torch.inference_mode(False):  # a normal tensor, usable inside and outside inference mode
            buf = _local.buf = torch.empty(max(n, CHUNK), dtype=dtype)
    return buf[:n]


def _gaussian(seed: int, chunk: int, out: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(derive_seed(seed, chunk))
    return torch.randn(out.numel(), generator=gen, dtype=out.dtype, out=out)


# Row x holds the eight +-1 signs encoded by the bits of byte x (most significant bit first).
_SIGNS = torch.from_numpy(np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.float32) * 2 - 1)


@lru_cache(maxsize=4)
def _signs(dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False):
        return _SIGNS.to(dtype)


def _rademacher(seed: int, chunk: int, out: torch.Tensor) -> torch.Tensor:
    # One random bit per element, expanded eight at a time through a 256-row table: 8x less
    # generation than a float per element, and a single gather instead of per-bit arithmetic.
    n = out.numel()
    raw = np.random.Generator(np.random.PCG64(derive_seed(seed, chunk))).bytes((n + 7) // 8)
    idx = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    table, full = _signs(out.dtype), n // 8
    if full:
        torch.index_select(table, 0, idx[:full], out=out[: full * 8].view(full, 8))
    if n > full * 8:
        out[full * 8 :] = table[int(idx[full])][: n - full * 8]
    return out


_GENERATORS = {"gaussian": _gaussian, "rademacher": _rademacher}


def _map_chunks(fn, work: list, threads: int) -> None:
    """fn(chunk) for every chunk, on `threads` threads (inline for one)."""
    if threads <= 1 or len(work) == 1:
        for chunk in work:
            fn(chunk)
        return
    # Inference mode is thread-local: carry the caller's into the workers so inference tensors
    # can be updated there too.
    mode = torch.is_inference_mode_enabled()

    def run_in_mode(chunk) -> None:
        with torch.inference_mode(mode):
            fn(chunk)

    list(_pool(threads).map(run_in_mode, work))


def perturb(
    params: Sequence[torch.Tensor], seed: int, coef: float, direction: str = "gaussian", threads: int | None = None
) -> None:
    """In place: params += coef * z(seed), z Gaussian or Rademacher over all tensors.

    `threads` (default: torch's intra-op thread count) changes the speed only, never the values.
    """
    gen = _GENERATORS[direction]
    threads = default_threads() if threads is None else threads
    if direction == "rademacher":
        threads = 1  # its table gather already runs on torch's own intra-op threads
    dtype = params[0].dtype if params else torch.float32

    def run(chunk: tuple[int, int, list[Piece]]) -> None:
        index, n, pieces = chunk
        z = gen(seed, index, _scratch(n, dtype))
        for view, offset in pieces:
            view.add_(z[offset : offset + view.numel()], alpha=coef)

    _map_chunks(run, _chunks(params), threads)


class ZOStepper:
    """FedKSeed's local two-point steps over `params`, each along the direction of its step seed.

    One step: theta += eps z; L+ = loss(); theta -= 2 eps z; L- = loss(); g = (L+ - L-) / (2 eps);
    theta += (eps - lr g) z (restore and update at once). These are the same three in-place adds,
    on the same values in the same order, as three `perturb` calls, so the weights are
    bit-identical to them; only the cost differs:

    - z is generated once per step, into `buffer` (one value per tuned weight, reused across
      steps), instead of once per add: generation is the most expensive part of a step;
    - the last add of a step is deferred and done in the same pass as the first add of the next
      step, chunk by chunk while the chunk is in cache (one pass over the weights instead of two).
      `flush` applies a deferred add; `discard` forgets it (when the weights are restored anyway).
    """

    def __init__(
        self, params: Sequence[torch.Tensor], direction: str = "gaussian", threads: int | None = None,
        buffer: torch.Tensor | None = None,
    ) -> None:
        self.params = list(params)
        self.gen = _GENERATORS[direction]
        self.threads = default_threads() if threads is None else max(1, threads)
        self.work = _chunks(self.params)
        dtype = self.params[0].dtype if self.params else torch.float32
        n = sum(p.numel() for p in self.params)
        if buffer is None or buffer.numel() < n or buffer.dtype != dtype:
            buffer = self.new_buffer(self.params)
        self.buffer = buffer
        self.pending: float | None = None  # coefficient of the deferred add of the direction in `buffer`

    @staticmethod
    def new_buffer(params: Sequence[torch.Tensor]) -> torch.Tensor:
        """A direction buffer for `params` (keep it to reuse across steppers: allocating it costs page faults)."""
        dtype = params[0].dtype if params else torch.float32
        with torch.inference_mode(False):
            return torch.empty(sum(p.numel() for p in params), dtype=dtype)

    def _z(self, index: int, n: int) -> torch.Tensor:
        return self.buffer[index * CHUNK : index * CHUNK + n]

    def _advance(self, seed: int, coef: float) -> None:
        """Apply the deferred add, then params += coef * z(seed) with z(seed) generated into the buffer."""
        pending, gen = self.pending, self.gen

        def run(chunk: tuple[int, int, list[Piece]]) -> None:
            index, n, pieces = chunk
            z = self._z(index, n)
            if pending is not None:
                for view, offset in pieces:
                    view.add_(z[offset : offset + view.numel()], alpha=pending)
            gen(seed, index, z)
            for view, offset in pieces:
                view.add_(z[offset : offset + view.numel()], alpha=coef)

        _map_chunks(run, self.work, self.threads)
        self.pending = None

    def _add(self, coef: float) -> None:
        """params += coef * z, z the direction in the buffer."""
        def run(chunk: tuple[int, int, list[Piece]]) -> None:
            index, n, pieces = chunk
            z = self._z(index, n)
            for view, offset in pieces:
                view.add_(z[offset : offset + view.numel()], alpha=coef)

        _map_chunks(run, self.work, self.threads)

    def step(self, seed: int, eps: float, lr: float, loss: Callable[[], float]) -> tuple[float, float, float]:
        """One two-point step along z(seed); returns (L+, L-, g). Its update is deferred to the next step or `flush`."""
        self._advance(seed, eps)
        plus = float(loss())
        self._add(-2 * eps)
        minus = float(loss())
        g = (plus - minus) / (2 * eps)
        self.pending = eps - lr * g
        return plus, minus, g

    def flush(self) -> None:
        """Apply the deferred restore-and-update of the last step."""
        if self.pending is not None:
            self._add(self.pending)
        self.pending = None

    def discard(self) -> None:
        """Forget the deferred add (the caller restores the weights itself)."""
        self.pending = None


def direction_vector(params: Sequence[torch.Tensor], seed: int, direction: str = "gaussian") -> torch.Tensor:
    """z(seed) materialized as one flat vector (for tests and analysis, not for training)."""
    zeros = [torch.zeros_like(p) for p in params]
    perturb(zeros, seed, 1.0, direction)
    return torch.cat([z.view(-1) for z in zeros])


def replay(
    params: Sequence[torch.Tensor], pool: np.ndarray, entries: Iterable[tuple[int, float]], lr: float, direction: str
) -> None:
    """Apply theta -= lr * g * z(seed) for each (seed index, g), in the given order.

    Chunk by chunk: every seed's add to a chunk is made while the chunk is in cache, in the order
    given, so each weight sees the same adds in the same order as one `perturb` per seed (same bits).
    """
    steps = [(int(pool[idx]), -lr * float(g)) for idx, g in entries]
    if not steps:
        return
    gen = _GENERATORS[direction]
    dtype = params[0].dtype if params else torch.float32

    def run(chunk: tuple[int, int, list[Piece]]) -> None:
        index, n, pieces = chunk
        z = _scratch(n, dtype)
        for seed, coef in steps:
            gen(seed, index, z)
            for view, offset in pieces:
                view.add_(z[offset : offset + view.numel()], alpha=coef)

    _map_chunks(run, _chunks(params), 1 if direction == "rademacher" else default_threads())


def pro_probabilities(history: Sequence[Sequence[float]], clip: float) -> np.ndarray:
    """FedKSeed-Pro seed probabilities: softmax of min-max-normalised mean |clip(g)| per seed."""
    amp = np.array([np.abs(np.clip(np.asarray(h, dtype=np.float64), -clip, clip)).mean() for h in history])
    spread = amp.max() - amp.min()
    norm = (amp - amp.min()) / (spread + 1e-10)
    e = np.exp(norm - norm.max())
    return e / e.sum()


# ----- wire format: per-seed scalars ---------------------------------------------------------------
# One packed blob per set of scalars: b"S" + count + uint16/uint32 indices + float32 values, or
# b"D" + float32[K] dense; whichever is smaller. Kept as bytes in a ConfigRecord (no array framing).

class PackError(ValueError):
    """A scalar blob that cannot be decoded for this seed pool."""


def pack_scalars(idx: np.ndarray, val: np.ndarray, k: int) -> bytes:
    """Pack (seed index, scalar) pairs as the cheaper of sparse pairs and a dense K-vector."""
    idx = np.asarray(idx, dtype=np.int64)
    val = np.asarray(val, dtype=np.float32)
    itype = np.uint16 if k <= 1 << 16 else np.uint32
    sparse_len = 5 + idx.size * (np.dtype(itype).itemsize + 4)
    if sparse_len <= 1 + 4 * k:
        return b"S" + struct.pack("<I", idx.size) + idx.astype(itype).tobytes() + val.tobytes()
    dense = np.zeros(k, dtype=np.float32)
    np.add.at(dense, idx, val)
    return b"D" + dense.tobytes()


def unpack_scalars(blob: bytes, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode a blob into sorted unique seed indices and float32 scalars; raises PackError if malformed."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) < 1:
        raise PackError("empty or non-bytes scalar payload")
    kind, body = blob[:1], memoryview(blob)[1:]
    if kind == b"D":
        if len(body) != 4 * k:
            raise PackError(f"dense vector has {len(body) // 4} values, expected {k}")
        dense = np.frombuffer(body, dtype=np.float32)
        idx = np.flatnonzero(dense)
        val = dense[idx]
    elif kind == b"S":
        if len(body) < 4:
            raise PackError("truncated sparse header")
        (n,) = struct.unpack("<I", body[:4])
        isize = 2 if k <= 1 << 16 else 4
        if len(body) != 4 + n * (isize + 4):
            raise PackError(f"sparse payload length {len(body) + 1} does not match {n} pairs")
        idx = np.frombuffer(body[4 : 4 + n * isize], dtype=np.uint16 if isize == 2 else np.uint32).astype(np.int64)
        val = np.frombuffer(body[4 + n * isize :], dtype=np.float32)
        if n and idx.max() >= k:
            raise PackError(f"seed index {int(idx.max())} outside the pool of {k}")
        if np.unique(idx).size != idx.size:
            raise PackError("duplicate seed indices")
        order = np.argsort(idx)
        idx, val = idx[order], val[order]
    else:
        raise PackError(f"unknown scalar payload kind {bytes(kind)!r}")
    if not np.isfinite(val).all():
        raise PackError("non-finite scalar")
    return idx, val.astype(np.float32)

"""FedKSeed's messages, shared by its server half (`strategies.fedkseed`) and client half (`clients.zeroth_order`).

Down, record `config`: `server-round` t, `from-round` F and `history`, the per-round aggregates of
rounds F..t-1 (each a packed scalar blob, `fedpeft.methods.zo.pack_scalars`, prefixed by its length). F is
one past the last round the client *confirmed*: the server counts round t-1 as confirmed once it
has accepted the client's round-t reply, which was computed from the global model of round t-1.

Up, record `zo`: `scalars`, the client's per-seed sums, beside one metrics record. A client that
cannot rebuild the global model of round t-1 from the history it holds and the message (its local
state was lost or rolled back to before round F-1) trains nothing and answers `holds-round` L
instead: the server then sends it rounds L+1.. next time.
"""

from __future__ import annotations

import struct

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedpeft.faults.malformed import Kind, register_malformed
from fedpeft.methods.contract import TrainerKind
from fedpeft.methods.zo import PackError, pack_scalars, unpack_scalars

ZEROTH_ORDER = TrainerKind("zeroth_order", "seeded zeroth-order steps; uploads one scalar per seed used")
SCALAR_UPLOADS = "FedKSeed seeds and scalars"  # what its replies carry (Capabilities.uploads)
SCALARS_RECORD = "zo"  # the reply's record
SCALARS = "scalars"
FROM_ROUND = "from-round"
HISTORY = "history"
HOLDS_ROUND = "holds-round"  # a refusal: the last round of the history the client holds

Round = tuple[np.ndarray, np.ndarray]  # one round's aggregate: sorted seed indices, float32 scalars


def pack_history(rounds: list[Round], k: int) -> bytes:
    """Concatenate per-round scalar blobs, each prefixed by its length."""
    parts = []
    for idx, val in rounds:
        blob = pack_scalars(idx, val, k)
        parts.append(struct.pack("<I", len(blob)) + blob)
    return b"".join(parts)


def unpack_history(blob: bytes, k: int) -> list[Round]:
    """Inverse of `pack_history`; raises PackError if malformed."""
    out, pos, view = [], 0, memoryview(blob)
    while pos < len(view):
        if pos + 4 > len(view):
            raise PackError("truncated history")
        (n,) = struct.unpack("<I", view[pos : pos + 4])
        if pos + 4 + n > len(view):
            raise PackError("truncated history")
        out.append(unpack_scalars(bytes(view[pos + 4 : pos + 4 + n]), k))
        pos += 4 + n
    return out


def held_round(content: RecordDict) -> int | None:
    """The round a refusing client says its history reaches, or None if `content` is no well-formed refusal."""
    if SCALARS_RECORD not in content.config_records or HOLDS_ROUND not in content[SCALARS_RECORD]:
        return None
    value = content[SCALARS_RECORD][HOLDS_ROUND]
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


# Malformed replies of this upload form, for fault injection and the server's checks (`faults.malformed_kind`).
def _has_scalars(content: RecordDict) -> bool:
    return SCALARS_RECORD in content.config_records


def _scalars(blob: bytes):
    def corrupt(c: RecordDict) -> RecordDict:
        out = RecordDict(dict(c.items()))
        out[SCALARS_RECORD] = ConfigRecord({SCALARS: blob})
        return out
    return corrupt


_ONE = (1).to_bytes(4, "little")
register_malformed("scalars_missing", Kind(SCALAR_UPLOADS, lambda c: RecordDict(
    {k: v for k, v in c.items() if k != SCALARS_RECORD}), _has_scalars))
register_malformed("scalars_wrong_seeds", Kind(SCALAR_UPLOADS, _scalars(
    b"S" + _ONE + (65535).to_bytes(2, "little") + np.float32(1.0).tobytes()), _has_scalars))
register_malformed("scalars_non_finite", Kind(SCALAR_UPLOADS, _scalars(
    b"S" + _ONE + (0).to_bytes(2, "little") + np.float32("nan").tobytes()), _has_scalars))
register_malformed("scalars_truncated", Kind(SCALAR_UPLOADS, _scalars(b"S\x05\x00"), _has_scalars))

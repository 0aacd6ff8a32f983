"""The codec chains at both ends of a round: Flower records in and out, error feedback, delta references.

A coded message carries one ConfigRecord `codec` holding the payload as bytes: measured with
Flower 1.41, that frames a payload in ~175 B where an ArrayRecord costs ~600 B plus ~515 B per
extra array, so packing a whole adapter into one payload also saves the per-tensor framing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedpeft.codecs.chain import Chain
from fedpeft.codecs.registry import Draw
from fedpeft.codecs.wire import PayloadError
from fedpeft.config import CodecsConfig
from fedpeft.records import ARRAYS
from fedpeft.state import ClientStateStore

CODEC_RECORD = "codec"
PAYLOAD = "payload"
DOWNLOAD_CLIENT = -1  # the download is the same for every client: its draws use this client id
RESIDUAL = "residual"

Template = Mapping[str, tuple[int, ...]]


@dataclass
class DecodedUpdate:
    """An upload after decoding: the client's new weights, its update, and which entries it sent."""

    arrays: ArrayRecord
    update: dict[str, np.ndarray]
    support: dict[str, np.ndarray | None]


def payload_record(payload: bytes) -> ConfigRecord:
    """The record a payload travels in."""
    return ConfigRecord({PAYLOAD: payload})


def payload_of(content: RecordDict) -> bytes:
    """The payload of a coded message; PayloadError if the message is not shaped like one."""
    # A method's own records (e.g. SCAFFOLD's control variate) travel beside the payload; the dense
    # adapter record never does (the server's reply check then refuses any record it does not expect).
    if ARRAYS in content.array_records:
        raise PayloadError(f"a coded message carries its adapter in the payload, not in an '{ARRAYS}' array record")
    if CODEC_RECORD not in content.config_records:
        raise PayloadError(f"no '{CODEC_RECORD}' config record in a coded message")
    record = content.config_records[CODEC_RECORD]
    if set(record) != {PAYLOAD}:
        raise PayloadError(f"'{CODEC_RECORD}' record must hold only '{PAYLOAD}', got {sorted(record)}")
    payload = record[PAYLOAD]
    if not isinstance(payload, bytes):
        raise PayloadError(f"wrong dtype: '{PAYLOAD}' must be bytes, got {type(payload).__name__}")
    return payload


def numpy_state(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Tensors of a record as numpy arrays."""
    return {k: arrays[k].numpy() for k in arrays}


def to_record(tensors: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of `tensors`, each in the dtype of the same tensor in `like`."""
    return ArrayRecord({k: Array(np.ascontiguousarray(tensors[k], dtype=like[k].dtype)) for k in sorted(tensors)})


class Codecs:
    """The run's chains (from `[codecs]`) and how a message is encoded and decoded with them."""

    def __init__(self, cfg: CodecsConfig, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed
        self.up = Chain(cfg.up, "up") if cfg.up else None
        self.down = Chain(cfg.down, "down") if cfg.down else None
        self.error_feedback = (
            cfg.error_feedback if cfg.error_feedback is not None
            else bool(self.up and self.up.sparsifier is not None and self.up.sparsifier.name == "topk")
        )

    # ----- downloads -------------------------------------------------------------------------
    def encode_download(self, arrays: ArrayRecord, server_round: int) -> tuple[ConfigRecord, ArrayRecord]:
        """(the record sent, the dense tensors the clients will decode from it)."""
        state = numpy_state(arrays)
        draw = Draw(self.seed, server_round, DOWNLOAD_CLIENT)
        payload = self.down.encode(state, draw)
        dense, _ = self.down.decode(payload, {k: v.shape for k, v in state.items()}, draw)
        return payload_record(payload), to_record(dense, state)

    def decode_download(self, content: RecordDict, template: Template, dtypes: Mapping[str, np.dtype],
                        server_round: int) -> ArrayRecord:
        """The dense global tensors from a coded download."""
        dense, _ = self.down.decode(payload_of(content), template, Draw(self.seed, server_round, DOWNLOAD_CLIENT))
        return ArrayRecord({k: Array(dense[k].astype(dtypes[k])) for k in sorted(dense)})

    # ----- uploads ---------------------------------------------------------------------------
    def encode_upload(
        self, local: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], client: int,
        server_round: int, store: ClientStateStore | None,
    ) -> ConfigRecord:
        """The client's coded upload; with error feedback, what was not sent is kept for next time."""
        x = {k: local[k].astype(np.float32) - (reference[k].astype(np.float32) if self.up.delta else 0.0)
             for k in local}
        residual = store.load_arrays(client, RESIDUAL) if (self.error_feedback and store) else {}
        if residual:
            if {k: v.shape for k, v in residual.items()} != {k: v.shape for k, v in x.items()}:
                raise ValueError(f"client {client}: saved error-feedback residual does not match the adapter")
            x = {k: x[k] + residual[k] for k in x}
        draw = Draw(self.seed, server_round, client)
        payload = self.up.encode(x, draw)
        if self.error_feedback and store is not None:
            sent, _ = self.up.decode(payload, {k: v.shape for k, v in x.items()}, draw)
            store.save_arrays(client, RESIDUAL, {k: x[k] - sent[k] for k in x})
        return payload_record(payload)

    def decode_upload(
        self, content: RecordDict, reference: ArrayRecord, client: int, server_round: int
    ) -> DecodedUpdate:
        """The client's weights and update from a coded reply; PayloadError if the payload is malformed."""
        ref = numpy_state(reference)
        update, support = self.up.decode(
            payload_of(content), {k: v.shape for k, v in ref.items()}, Draw(self.seed, server_round, client)
        )
        weights = {k: ref[k] + update[k] for k in ref} if self.up.delta else update
        return DecodedUpdate(to_record(weights, ref), update, support)

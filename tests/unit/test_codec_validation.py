"""Malformed compressed uploads are rejected with a reason and leave the global adapter bit-identical."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.codecs.endpoints import CODEC_RECORD, numpy_state, payload_record
from fedpeft.codecs.wire import POS_INDEX, Writer, write_positions
from fedpeft.app.recipe import validate
from fedpeft.ledger import message_bytes
from fedpeft.models import build_model
from fedpeft.nodes import NodeDirectory
from strategies import get_strategy_class

CHAIN = ["delta", "topk:0.25", "ternary"]
CFG = validate({
    "model": {"source": "tiny", "tiny": {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                                         "intermediate_size": 8}},
    "adapter": {"type": "lora", "r": 2, "target_modules": ["query"]},
    "sim": {"num_clients": 2, "clients_per_round": 2},
    "codecs": {"up": CHAIN},
})
MODEL = build_model(CFG, num_labels=2)
NODES = {101: 0, 102: 1}


class _Nodes:
    """The part of a Flower grid that sampling reads: which nodes are online."""

    def get_node_ids(self) -> list[int]:
        return list(NODES)


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _strategy():
    s = get_strategy_class("fedavg")(CFG, NodeDirectory(dict(NODES)), MODEL)
    s.configure_train(1, s.initial_arrays(), ConfigRecord(), _Nodes())  # records what each node was sent
    return s


def _reply(node: int, content: dict) -> Message:
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(RecordDict({**content, "metrics": MetricRecord({"num-examples": 10})}), reply_to=instruction)


def _good(s) -> Message:
    ref = numpy_state(s.reference(101))
    rng = np.random.default_rng(1)
    local = {k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for k, v in ref.items()}
    return _reply(101, {CODEC_RECORD: s.codecs.encode_upload(local, ref, 0, 1, store=None)})


def _payload(s, *, text: str = ",".join(CHAIN), count: int | None = None, first=None, scale: float = 0.5,
             pad: bytes = b"", cut: int = 0) -> bytes:
    """A hand-packed upload for node 102; `first(w, n)` writes the first tensor's positions instead of the packer."""
    template = {k: v.shape for k, v in numpy_state(s.reference(102)).items()}
    w = Writer()
    w.array(np.frombuffer(b"FP", np.uint8))
    w.u8(1)
    w.u8(len(text))
    w.array(np.frombuffer(text.encode(), np.uint8))
    w.u16(len(template) if count is None else count)
    for i, k in enumerate(sorted(template)):
        n = math.prod(template[k])
        idx = np.arange(0, n, 2)[: max(1, n // 4)]
        if i == 0 and first is not None:
            idx = first(w, n)
        else:
            write_positions(w, idx, n)
        w.f32(scale)
        w.array(np.packbits(np.zeros(len(idx), bool)))
    return (w.getvalue() + pad)[: len(w.getvalue() + pad) - cut]


def _index_form(positions):
    def write(w: Writer, n: int) -> np.ndarray:
        idx = np.array([p if p >= 0 else n for p in positions])
        w.u8(POS_INDEX)
        w.u32(len(idx))
        w.u8(1)
        w.array(idx.astype("<u1"))
        return idx
    return write


MALFORMED = {
    "index out of range": (lambda s: {CODEC_RECORD: payload_record(_payload(s, first=_index_form([0, -1])))}, "out of range"),
    "duplicate indices": (lambda s: {CODEC_RECORD: payload_record(_payload(s, first=_index_form([3, 3])))}, "duplicate"),
    "length mismatch (trailing bytes)": (lambda s: {CODEC_RECORD: payload_record(_payload(s, pad=b"\0\0"))}, "length mismatch"),
    "length mismatch (tensor count)": (lambda s: {CODEC_RECORD: payload_record(_payload(s, count=1))}, "length mismatch"),
    "truncated": (lambda s: {CODEC_RECORD: payload_record(_payload(s, cut=3))}, "truncated"),
    "wrong dtype": (lambda s: {CODEC_RECORD: ConfigRecord({"payload": "not bytes"})}, "wrong dtype"),
    "dense arrays instead of a payload": (lambda s: {"arrays": s.reference(102)}, "not in an 'arrays' array record"),
    "NaN scale": (lambda s: {CODEC_RECORD: payload_record(_payload(s, scale=float("nan")))}, "NaN or Inf scale"),
    "Inf scale": (lambda s: {CODEC_RECORD: payload_record(_payload(s, scale=float("inf")))}, "NaN or Inf scale"),
    "oversized": (lambda s: {CODEC_RECORD: payload_record(_payload(s, pad=bytes(10_000)))}, "oversized"),
    "unknown codec name": (lambda s: {CODEC_RECORD: payload_record(_payload(s, text="delta,topk:0.25,zip"))},
                           "unknown codec 'zip'"),
    "another chain": (lambda s: {CODEC_RECORD: payload_record(_payload(s, text="delta,topk:0.5,ternary"))}, "differs"),
}


def test_a_well_formed_hand_packed_payload_is_accepted():
    s = _strategy()
    arrays, _ = s.aggregate_train(1, [_reply(102, {CODEC_RECORD: payload_record(_payload(s))})])
    assert arrays is not None and not s.pop_rejections()


def test_a_payload_with_an_array_record_the_method_does_not_expect_is_rejected():
    """A method's own records may travel beside the payload (SCAFFOLD's variate); an unexpected one is refused."""
    s = _strategy()
    arrays, _ = s.aggregate_train(1, [_reply(102, {CODEC_RECORD: payload_record(_payload(s)), "smuggled": s.reference(102)})])
    (rej,) = s.pop_rejections()
    assert arrays is None and "expected array records" in rej.reason


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_payload_is_rejected_and_the_global_is_bit_identical(kind):
    make, reason = MALFORMED[kind]
    s = _strategy()
    good = _good(s)
    alone, _ = _strategy().aggregate_train(1, [_good(s)])
    arrays, _ = s.aggregate_train(1, [good, _reply(102, make(s))])
    (rej,) = s.pop_rejections()
    assert rej.client_id == 1 and "malformed payload" in rej.reason and reason in rej.reason
    for k in alone:  # the bad reply changed nothing: the result is what the good reply alone gives
        assert arrays[k].numpy().tobytes() == alone[k].numpy().tobytes()
    s = _strategy()
    assert s.aggregate_train(1, [_reply(102, make(s))]) == (None, None)  # nothing valid: global kept as is


def test_ledger_bytes_are_framing_plus_payload():
    """A coded upload costs its payload plus a fixed Flower framing, so bytes shrink exactly as the packing predicts."""
    s = _strategy()
    sizes = {}
    # Two payload lengths whose protobuf length prefixes (128 B .. 16 KiB) and the decimal body
    # length in Flower's object headers (1000 .. 9999) have the same width.
    for pad in (1200, 2200):
        payload = _payload(s, pad=bytes(pad))
        sizes[pad] = (len(payload), message_bytes(_reply(102, {CODEC_RECORD: payload_record(payload)})))
    assert sizes[2200][1] - sizes[1200][1] == sizes[2200][0] - sizes[1200][0] == 1000
    framing = sizes[1200][1] - sizes[1200][0]
    dense = message_bytes(_reply(102, {"arrays": s.reference(102)}))
    # one config record frames the whole payload; an ArrayRecord frames every tensor on its own
    assert framing < dense - sum(v.numpy().nbytes for v in s.reference(102).values())

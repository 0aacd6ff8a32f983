"""Every malformed-reply kind is rejected with its reason, and the global model is bit-identical to the round without it.

Content kinds come from `fedpeft.faults.malformed.KINDS` (what fault injection uses); message kinds
(another round's reply, a duplicate, an unsolicited one, a wrong sender, an oversized one) are
screened by `fedpeft.reply_screen`. Malformed coded uploads are in test_codec_validation.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.adapters import adapter_state
from fedpeft.faults.malformed import ANY, KINDS, applies, corrupt
from fedpeft.faults.malformed import DENSE as DENSE_UPLOADS
from fedpeft.methods.fedkseed_wire import SCALAR_UPLOADS
from fedpeft.ledger import message_bytes
from fedpeft.models import build_model
from fedpeft.nodes import NodeDirectory
from fedpeft.app.recipe import validate
from fedpeft.reply_screen import reply_limit, screen
from fedpeft.methods.zo import pack_scalars
from strategies import get_strategy_class

TINY = {"source": "tiny", "tiny": {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                                   "intermediate_size": 8}}
DENSE = validate({"model": TINY, "adapter": {"type": "lora", "r": 2, "target_modules": ["query"]},
                  "sim": {"num_clients": 3, "clients_per_round": 3}})
ZO = validate({"model": TINY, "adapter": {"type": "lora", "r": 2, "target_modules": ["query"]},
               "method": {"name": "fedkseed", "num_seeds": 64}, "sim": {"num_clients": 3, "clients_per_round": 3}})
NODES = {101: 0, 102: 1, 103: 2}
# What each kind's rejection reason says (a substring).
EXPECTED = {
    "nan": "non-finite", "inf": "non-finite", "wrong_shape": "expected", "wrong_dtype": "expected",
    "corrupt_buffer": "cannot be decoded", "missing_key": "missing", "extra_key": "unexpected",
    "missing_arrays": "expected array records", "extra_record": "expected array records",
    "arrays_as_config": "expected array records", "oversized": "expected array records",
    "empty": "metric record", "no_metrics": "metric record", "two_metric_records": "metric record",
    "zero_examples": "positive", "negative_examples": "positive", "nan_examples": "positive",
    "absurd_examples": "exceeds", "nan_loss": "not finite",
    "scalars_missing": "missing config record", "scalars_wrong_seeds": "outside the pool", "scalars_non_finite": "non-finite",
    "scalars_truncated": "truncated",
}


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _reply(node: int, content: RecordDict) -> Message:
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


def _dense(value: float, n: int = 10) -> RecordDict:
    state = adapter_state(build_model(DENSE, 2))
    return RecordDict({"arrays": ArrayRecord({k: torch.full_like(v, value) for k, v in state.items()}),
                       "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5})})


def _scalars(idx, val, n: int = 10) -> RecordDict:
    return RecordDict({"zo": ConfigRecord({"scalars": pack_scalars(np.array(idx), np.array(val, np.float32), 64)}),
                       "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5})})


def test_every_kind_has_an_expected_reason_and_there_are_at_least_twenty():
    assert set(EXPECTED) == set(KINDS) and all(EXPECTED.values())
    assert len(KINDS) >= 20


@pytest.mark.parametrize("kind", sorted(k for k, v in KINDS.items() if v.payload in (DENSE_UPLOADS, ANY)))
def test_malformed_dense_reply_is_rejected_and_global_is_bit_identical(kind):
    def strategy():
        s = get_strategy_class("fedavg")(DENSE, NodeDirectory(dict(NODES)), build_model(DENSE, 2))
        s.example_limits = {0: 100, 1: 100, 2: 100}
        return s

    good = [_reply(101, _dense(1.0)), _reply(102, _dense(3.0, n=30))]
    alone, _ = strategy().aggregate_train(1, good)
    bad_content = _dense(5.0)
    assert applies(kind, bad_content)
    s = strategy()
    arrays, _ = s.aggregate_train(1, [_reply(101, _dense(1.0)), _reply(102, _dense(3.0, n=30)),
                                      _reply(103, corrupt(kind, bad_content))])
    (rej,) = s.pop_rejections()
    assert rej.client_id == 2 and EXPECTED[kind] in rej.reason
    for k in alone:
        assert arrays[k].numpy().tobytes() == alone[k].numpy().tobytes()


@pytest.mark.parametrize("kind", sorted(k for k, v in KINDS.items() if v.payload in (SCALAR_UPLOADS, ANY)))
def test_malformed_fedkseed_reply_is_rejected_and_model_is_bit_identical(kind):
    def server():
        return get_strategy_class("fedkseed")(ZO, NodeDirectory(dict(NODES)), build_model(ZO, 2))

    alone = server()
    alone.aggregate_train(1, [_reply(101, _scalars([3, 9], [0.5, -1.0]))])
    s = server()
    s.aggregate_train(1, [_reply(101, _scalars([3, 9], [0.5, -1.0])), _reply(102, corrupt(kind, _scalars([4], [2.0])))])
    (rej,) = s.pop_rejections()
    assert rej.client_id == 1 and EXPECTED[kind] in rej.reason
    assert all(torch.equal(a, b) for a, b in zip(alone.params, s.params))


def _sent(nodes: list[int], round_: int) -> dict[str, Message]:
    out = {}
    for i, node in enumerate(nodes):
        m = Message(RecordDict({"config": ConfigRecord({"server-round": round_})}), dst_node_id=node,
                    message_type=MessageType.TRAIN, group_id=str(round_))
        m.metadata.__dict__["_message_id"] = f"r{round_}-m{i}"  # as Flower's grid does when pushing
        out[m.metadata.message_id] = m
    return out


def _answer(original: Message, content: RecordDict, *, src: int | None = None, group: str | None = None) -> Message:
    reply = Message(content, reply_to=original)
    reply.metadata.__dict__["_reply_to_message_id"] = original.metadata.message_id
    if src is not None:
        reply.metadata.__dict__["_src_node_id"] = src
    if group is not None:
        reply.metadata.group_id = group
    return reply


def _message_kinds():
    sent = _sent([101, 102, 103], 2)
    earlier = _sent([103], 1)
    m101, m102, m103 = sent.values()
    good = [_answer(m101, _dense(1.0)), _answer(m102, _dense(3.0, n=30))]
    return sent, good, {
        "reply to another round's message": (_answer(next(iter(earlier.values())), _dense(9.0)), "did not send"),
        "reply to a message never sent": (_answer(_sent([103], 7)["r7-m0"], _dense(9.0)), "did not send"),
        "duplicate reply from one node": (_answer(m101, _dense(9.0)), "duplicate"),
        "reply from another node": (_answer(m103, _dense(9.0), src=104), "sent to node 103"),
        "reply claiming another round": (_answer(m103, _dense(9.0), group="1"), "round '1'"),
        "oversized reply": (_answer(m103, corrupt("oversized", _dense(9.0))), "oversized"),
    }


MESSAGE_KINDS = ["duplicate reply from one node", "oversized reply", "reply claiming another round",
                 "reply from another node", "reply to a message never sent", "reply to another round's message"]


def test_message_kinds_are_all_tested():
    assert sorted(_message_kinds()[2]) == MESSAGE_KINDS


@pytest.mark.parametrize("kind", MESSAGE_KINDS)
def test_malformed_message_is_refused_before_validation_and_global_is_bit_identical(kind):
    sent, good, kinds = _message_kinds()
    bad, reason = kinds[kind]
    replies = [*good, bad]
    limit = reply_limit(0.0, max(message_bytes(m) for m in sent.values()))
    ok, refused = screen(sent, replies, [message_bytes(r) for r in replies], limit)
    assert ok == good and len(refused) == 1 and reason in refused[0].reason
    s = get_strategy_class("fedavg")(DENSE, NodeDirectory(dict(NODES)), build_model(DENSE, 2))
    alone, _ = get_strategy_class("fedavg")(DENSE, NodeDirectory(dict(NODES)), build_model(DENSE, 2)).aggregate_train(2, good)
    arrays, _ = s.aggregate_train(2, ok)
    for k in alone:
        assert arrays[k].numpy().tobytes() == alone[k].numpy().tobytes()


def test_a_round_with_too_few_valid_replies_fails_and_changes_nothing():
    cfg = validate({**DENSE.model_dump(), "sim": {"num_clients": 3, "clients_per_round": 3, "min_replies": 0.66}})
    s = get_strategy_class("fedavg")(cfg, NodeDirectory(dict(NODES)), build_model(cfg, 2))
    s.sent = dict.fromkeys(NODES, s.initial_arrays())  # three sampled clients: 0.66 x 3 -> 2 needed
    assert s.aggregate_train(1, [_reply(101, _dense(1.0)), _reply(102, corrupt("nan", _dense(2.0)))]) == (None, None)
    assert "1 valid replies of 3 sampled clients" in s.failure and "needs 2" in s.failure
    assert not s.pop_client_metrics()  # nothing of a failed round is accounted as a participation
    arrays, _ = s.aggregate_train(2, [_reply(101, _dense(1.0)), _reply(102, _dense(2.0))])
    assert arrays is not None and s.failure is None

"""Reply validation: malformed or failed replies are rejected with a reason; the global stays intact."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.adapters import adapter_state
from fedpeft.app.recipe import validate
from fedpeft.models import build_model
from fedpeft.nodes import NodeDirectory
from strategies import get_strategy_class

CFG = validate({
    "model": {"source": "tiny", "tiny": {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                                         "intermediate_size": 8}},
    "adapter": {"type": "lora", "r": 2, "target_modules": ["query"]},
    "sim": {"num_clients": 4, "clients_per_round": 2},
})
MODEL = build_model(CFG, num_labels=2)
TEMPLATE = adapter_state(MODEL)
KEY_A, KEY_B = sorted(k for k in TEMPLATE if "lora_" in k)[:2]


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _strategy():
    return get_strategy_class("fedavg")(CFG, NodeDirectory({101: 0, 102: 1, 103: 2, 104: 3}), MODEL)


def _reply(node: int, arrays: dict | None, n: object = 10, error: str | None = None) -> Message:
    """A reply from `node` as the ClientApp would build it (or an error reply, as Flower does on a crash)."""
    instruction = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    if error:
        return Message(Error(code=0, reason=error), reply_to=instruction)
    rd = RecordDict({"metrics": MetricRecord({"num-examples": n})} if n is not None else {})
    if arrays is not None:
        rd["arrays"] = ArrayRecord(arrays)
    return Message(rd, reply_to=instruction)


def _good(value: float) -> dict:
    return {k: torch.full_like(v, value) for k, v in TEMPLATE.items()}


def _with(key: str, value: torch.Tensor) -> dict:
    return {**_good(1.0), key: value}


BAD = {
    "missing key": lambda: {k: v for k, v in _good(1.0).items() if k != KEY_A},
    "extra key": lambda: {**_good(1.0), "evil": torch.zeros(1)},
    "wrong shape": lambda: _with(KEY_A, torch.zeros(TEMPLATE[KEY_A].numel() + 1)),
    "wrong dtype": lambda: {k: v.double() for k, v in _good(1.0).items()},
    "nan": lambda: _with(KEY_A, torch.full_like(TEMPLATE[KEY_A], float("nan"))),
    "inf": lambda: _with(KEY_B, torch.full_like(TEMPLATE[KEY_B], float("inf"))),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_malformed_reply_is_rejected_and_global_is_unchanged(kind):
    s = _strategy()
    arrays, metrics = s.aggregate_train(1, [_reply(101, BAD[kind]())])
    assert arrays is None and metrics is None  # nothing valid: the caller keeps its global adapter
    (rej,) = s.pop_rejections()
    assert rej.client_id == 0 and rej.round == 1 and rej.reason


@pytest.mark.parametrize("n", [0, -3, float("nan"), None])
def test_bad_example_count_is_rejected(n):
    s = _strategy()
    assert s.aggregate_train(2, [_reply(102, _good(1.0), n=n)]) == (None, None)
    (rej,) = s.pop_rejections()
    assert "num-examples" in rej.reason or "metric record" in rej.reason


def test_failed_client_is_rejected_and_others_are_averaged_by_examples():
    s = _strategy()
    replies = [_reply(101, _good(1.0), n=10), _reply(102, _good(4.0), n=30), _reply(103, BAD["nan"]()),
               _reply(104, None, error="CUDA out of memory")]
    arrays, metrics = s.aggregate_train(3, replies)
    avg = arrays.to_torch_state_dict()
    for v in avg.values():
        assert torch.allclose(v, torch.full_like(v, (1.0 * 10 + 4.0 * 30) / 40))
    reasons = {r.client_id: r.reason for r in s.pop_rejections()}
    assert set(reasons) == {2, 3} and "CUDA out of memory" in reasons[3] and "non-finite" in reasons[2]


def test_sampling_is_seeded_and_uses_client_ids():
    s = _strategy()
    a = s.directory.sample(0, 1, 2, [101, 102, 103, 104])
    assert a == s.directory.sample(0, 1, 2, [104, 103, 102, 101])
    rounds = {tuple(s.directory.sample(0, r, 2, [101, 102, 103, 104])) for r in range(1, 30)}
    assert len(rounds) > 1
    # Fewer online known nodes than wanted: all of them (with a warning); sim.min_replies judges the round.
    assert s.directory.sample(0, 1, 2, [101, 999]) == [101]
    assert s.directory.sample(0, 1, 2, []) == []

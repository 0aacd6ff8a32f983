"""The per-client fast paths give exactly what the general paths give."""

from __future__ import annotations

import threading
from pathlib import Path
from queue import Queue

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from fedpeft.data import prepare
    from fedpeft.app.recipe import load

    cfg = load(ROOT / "simulations/smoke.toml", ["sim.num_clients=20", "sim.clients_per_round=5"])
    return cfg, prepare(cfg, tmp_path_factory.mktemp("task") / "task")


def test_client_rows_match_the_partition_dataset(smoke):
    from clients.rows import ClientRows
    from fedpeft.data.sources import DataError

    _, task = smoke
    for cid in (0, 7, 19):
        rows, ds = ClientRows(task, cid), task.client_dataset(cid)
        assert len(rows) == len(ds)
        assert rows["input_ids"] == list(ds["input_ids"]) and rows["label"] == list(ds["label"])
        assert rows.select([0])["label"] == ds.select([0])["label"]  # anything else: the real Dataset
    with pytest.raises(DataError):
        ClientRows(task, 20)


def test_adapter_fast_path_equals_peft(smoke):
    from peft import get_peft_model_state_dict

    from fedpeft.adapters import _state_map, adapter_state, load_adapter_state
    from fedpeft.models import build_model

    cfg, task = smoke
    model = build_model(cfg, task.num_labels)
    assert _state_map(model) is not None
    ref = get_peft_model_state_dict(model)
    got = adapter_state(model)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    new = {k: torch.randn_like(v) for k, v in got.items()}
    load_adapter_state(model, new)
    after = get_peft_model_state_dict(model)
    assert all(torch.equal(after[k], new[k]) for k in new)
    key = next(iter(new))
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state(model, {**new, key: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state(model, {k: v for k, v in new.items() if k != key})


def test_ledger_batch_cache_charges_each_message_exactly():
    from fedpeft.ledger import CommLedger, message_bytes, record_bytes

    g = torch.Generator().manual_seed(0)
    shared = RecordDict({"arrays": ArrayRecord({f"w{i}": torch.randn(16, 8, generator=g) for i in range(4)}),
                         "config": ConfigRecord({"server-round": 3})})
    msgs = [Message(shared, dst_node_id=n, message_type=MessageType.TRAIN) for n in (11, 12, 13)]
    alone = [record_bytes(m) for m in msgs]
    ledger, cache = CommLedger(None, client_of=lambda n: n), {}
    charged = [ledger.charge(m, "down", cache) for m in msgs]
    assert charged == [message_bytes(m) for m in msgs] == [sum(a.values()) for a in alone]
    assert [dict((r.record, r.bytes) for r in ledger.rows[i * 3:(i + 1) * 3]) for i in range(3)] == alone


def test_dispatcher_hands_each_node_its_messages_in_order():
    from fedpeft.app.engine.dispatch import dispatch_messages

    class State:  # the slice of Flower's InMemoryLinkState the dispatcher reads
        def __init__(self):
            self.lock = threading.RLock()
            self.message_ins_store = {}

        def _check_stored_messages(self, ids):
            for mid in ids:  # expire message "x"
                if mid == "x":
                    self.message_ins_store.pop(mid)

    state = State()
    msgs = {}
    for mid, node in [("a", 1), ("b", 2), ("c", 1), ("x", 3), ("d", 9)]:
        m = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        state.message_ins_store[mid] = msgs[mid] = m
    queue, stop = Queue(), threading.Event()
    th = threading.Thread(target=dispatch_messages, args=(state, queue, {1: 0, 2: 1, 3: 2}, stop))
    th.start()
    got = [queue.get(timeout=5) for _ in range(3)]
    stop.set()
    th.join()
    assert got[:2] == [msgs["a"], msgs["b"]] and got[2] is msgs["c"]  # one per node per tick, store order
    assert queue.empty() and msgs["d"].metadata.delivered_at == ""  # not a node of this engine
    assert all(msgs[k].metadata.delivered_at for k in "abc")

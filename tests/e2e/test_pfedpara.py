"""pFedPara: the personal LoHa pair stays on the client; personalized accuracy is reported every round."""

from __future__ import annotations

import csv
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.personal import PersonalTrainer
from clients.app.runtime import ClientRuntime
from fedpeft.adapters import adapter_state
from fedpeft.config import ConfigError
from fedpeft.app.recipe import validate
from fedpeft.data import open_prepared, prepare
from fedpeft.ledger import record_bytes
from fedpeft.models import build_model
from fedpeft.rundir import RunDir
from fedpeft.app.simulate import simulate
from fedpeft.state import ClientStateStore
from fedpeft.methods.pfedpara_wire import LOCAL_SET, is_local

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"


def _cfg(**sim):
    raw = tomllib.loads(SMOKE.read_text())
    raw["adapter"] = {"type": "loha", "r": 4, "alpha": 8, "target_modules": ["query", "value"]}
    raw["method"] = {"name": "pfedpara"}
    raw["sim"].update(sim)
    return validate(raw)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return prepare(_cfg(), tmp_path_factory.mktemp("task"))


def _msg(state: dict, server_round: int) -> Message:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _global_only_upload_bytes(model) -> tuple[int, int]:
    """'arrays' record bytes of an upload with only the global tensors, and with the personal pair too."""
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) for k, v in adapter_state(model).items()}

    def size(s: dict) -> int:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
        rd = RecordDict({"arrays": ArrayRecord(s), "metrics": MetricRecord({"num-examples": 1})})
        return record_bytes(Message(rd, dst_node_id=1, message_type=MessageType.TRAIN))["arrays"]

    return size({k: v for k, v in state.items() if not is_local(k)}), size(state)


def test_local_split_is_seeded_disjoint_and_covers_the_partition(task):
    train, test = task.local_split(3, 0.2, seed=0)
    again = task.local_split(3, 0.2, seed=0)
    rows = task.client_dataset(3)
    assert len(train) + len(test) == len(rows) and len(test) == round(0.2 * len(rows))
    assert train["input_ids"] == again[0]["input_ids"] and test["input_ids"] == again[1]["input_ids"]
    as_tuples = lambda ds: sorted(map(tuple, ds["input_ids"]))  # noqa: E731
    assert len(test) > 0 and sorted(as_tuples(train) + as_tuples(test)) == as_tuples(rows)


def test_equal_bytes_rank_uploads_exactly_the_lora_size_and_dp_is_rejected():
    tiny = {"source": "tiny", "tiny": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 1,
                                       "intermediate_size": 16}}
    lora = build_model(validate({"model": tiny, "adapter": {"type": "lora", "r": 6, "target_modules": ["query"]}}), 3)
    cfg = validate({"model": tiny, "method": {"name": "pfedpara", "match_lora_rank": 6},
                    "adapter": {"type": "loha", "r": 1, "target_modules": ["query"]}})
    loha = build_model(cfg, 3)
    sent = lambda m, keep: sum(v.numel() for k, v in adapter_state(m).items() if keep(k))  # noqa: E731
    assert sent(loha, lambda k: not is_local(k)) == sent(lora, lambda k: True)
    with pytest.raises(ConfigError, match="pfedpara"):
        validate({"method": {"name": "pfedpara"}, "adapter": {"type": "loha", "target_modules": ["query"]},
                  "dp": {"enabled": True, "noise_multiplier": 1.0}})


def test_client_keeps_its_personal_pair_and_uploads_only_the_global_one(tmp_path, task):
    cfg = _cfg()
    trainer = PersonalTrainer(ClientRuntime(cfg, task, build_model(cfg, task.num_labels), str(tmp_path)))
    server = build_model(cfg, task.num_labels)
    global_state = {k: v for k, v in adapter_state(server).items() if not is_local(k)}
    store = ClientStateStore(tmp_path / "client_state")
    reply = trainer.train(_msg(global_state, 1), 2)
    assert set(reply["arrays"]) == set(global_state)
    first = store.load_arrays(2, LOCAL_SET)
    assert first and all(is_local(k) for k in first) and np.abs(first[next(k for k in first if "w2_b" in k)]).sum() > 0
    # another client in the same process starts from its own pair, not client 2's
    trainer.train(_msg(global_state, 1), 5)
    assert not all(np.array_equal(first[k], store.load_arrays(5, LOCAL_SET)[k]) for k in first)
    # client 2 resumes from what it stored: its personalized model is better than fresh on round 2
    reply2 = trainer.train(_msg(global_state, 2), 2)
    later = store.load_arrays(2, LOCAL_SET)
    assert not all(np.array_equal(first[k], later[k]) for k in first)
    m = reply2["metrics"]
    assert m["local-test-examples"] == len(task.local_split(2, 0.2, 0)[1]) and 0 <= m["personal-score"] <= 1


def test_pfedpara_run_never_uploads_a_personal_factor_and_reports_personal_accuracy(tmp_path):
    cfg = _cfg(rounds=3)
    cfg.output.dir = str(tmp_path)
    summary = simulate(cfg)
    run = RunDir(Path(summary["run_dir"]))
    assert summary["rejected"] == 0
    with run.comm_csv.open() as f:
        ups = [r for r in csv.DictReader(f) if r["direction"] == "up" and int(r["round"]) >= 1]
    assert {r["record"] for r in ups} == {"arrays", "metrics", "_envelope"}
    task = open_prepared(str(run.task_dir))
    global_only, with_personal = _global_only_upload_bytes(build_model(cfg, task.num_labels))
    assert global_only < with_personal
    uploads = [int(r["bytes"]) for r in ups if r["record"] == "arrays"]
    assert len(uploads) == cfg.sim.rounds * cfg.sim.clients_per_round
    assert set(uploads) == {global_only}  # every upload is exactly the global tensors' size
    # the personal pairs are on disk, per client that trained, and nowhere in the exchanged adapter
    clients = {int(r["client_id"]) for r in ups}
    store = ClientStateStore(run.path / "client_state")
    for c in clients:
        saved = store.load_arrays(c, LOCAL_SET)
        assert saved and all(is_local(k) for k in saved)
    rows = run.metrics()
    for row in rows[1:]:
        assert row["personal_clients"] == cfg.sim.clients_per_round
        assert 0.0 <= row["personal_accuracy"] <= 1.0 and 0.0 <= row["global_accuracy_local"] <= 1.0
    assert summary["final_personal_accuracy"] == rows[-1]["personal_accuracy"]

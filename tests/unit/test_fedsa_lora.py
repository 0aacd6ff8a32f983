"""FedSA-LoRA: LoRA A (and the head) are averaged, each client's B stays in its client state store."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.base import ClientRuntime
from clients.codec import coded_train
from clients.personal import PersonalTrainer
from clients.registry import get_trainer_class
from fedpeft.adapters import adapter_state
from fedpeft.app.recipe import load, validate
from fedpeft.config import ConfigError
from fedpeft.data import prepare
from fedpeft.methods.personal_wire import LOCAL_TEST, PERSONAL, local_set
from fedpeft.models import build_model
from fedpeft.nodes import NodeDirectory
from fedpeft.records import ARRAYS
from fedpeft.state import ClientStateStore
from strategies import method_spec

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"
NODES = {101: 2, 102: 5}  # node id -> client id
CODECS = {"dense": {}, "coded": {"up": ["delta", "topk:0.25"], "down": ["fp16"]}}


class _Nodes:
    """The part of a Flower grid that sampling reads: which nodes are online."""

    def get_node_ids(self) -> list[int]:
        return list(NODES)


def _cfg(**sections):
    raw = tomllib.loads(SMOKE.read_text())
    raw["method"] = {"name": "fedsa-lora"}
    raw["sim"].update(num_clients=6, clients_per_round=2)
    raw["train"]["local_steps"] = 4
    raw.update(sections)
    return validate(raw)


def _is_b(key: str) -> bool:
    return "lora_B" in key


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return prepare(_cfg(), tmp_path_factory.mktemp("task"))


@pytest.mark.parametrize("codecs", sorted(CODECS))
def test_clients_keep_b_upload_only_a_and_head_and_resume_from_their_stored_b(tmp_path, task, codecs):
    cfg = _cfg(codecs=CODECS[codecs])
    spec = method_spec("fedsa-lora")
    model = build_model(cfg, task.num_labels)
    every = set(adapter_state(model))
    b_keys = {k for k in every if _is_b(k)}
    server = spec.strategy(cfg, NodeDirectory(dict(NODES)), build_model(cfg, task.num_labels))
    # the server expects A and the head back, never B: a reply carrying B is not aggregated
    template = set(server.reply_templates()[ARRAYS])
    assert b_keys and template == every - b_keys and any("lora_A" in k for k in template)
    assert any("classifier" in k for k in template)
    trainer = get_trainer_class(spec.trainer)(ClientRuntime(cfg, task, model, str(tmp_path)), spec.strategy)
    assert isinstance(trainer, PersonalTrainer) and trainer.keys == template
    started: dict[int, dict[str, np.ndarray]] = {}  # the B each client trains from, as loaded before step 1
    trainer.begin = lambda ctx: started.__setitem__(
        ctx.cid, {k: v.numpy() for k, v in adapter_state(model).items() if k in b_keys})
    store = ClientStateStore(tmp_path / "client_state")

    def run_round(r: int, arrays):
        sent = list(server.configure_train(r, arrays, ConfigRecord(), _Nodes()))
        replies = [Message(coded_train(trainer, trainer.rt, m, NODES[m.metadata.dst_node_id]), reply_to=m)
                   for m in sent]
        for reply in replies:  # dense: A and the head; coded: one payload, decoded below against the template
            assert set(reply.content.array_records) == ({ARRAYS} if codecs == "dense" else set())
            assert codecs != "dense" or set(reply.content[ARRAYS]) == template
        aggregate, _ = server.aggregate_train(r, replies)
        assert not server.pop_rejections() and all(set(m.content[ARRAYS]) == template for m in replies)
        assert aggregate is not None and set(aggregate) == template
        return aggregate, server.round_metrics(r, None)

    arrays, metrics = run_round(1, server.initial_arrays())
    assert metrics["personal_clients"] == 2 and 0 <= metrics["personal_accuracy"] <= 1
    first = store.load_arrays(2, local_set("fedsa-lora"))
    assert set(first) == b_keys and all(np.abs(v).sum() > 0 for v in first.values())  # B trained
    assert all(not v.any() for v in started[2].values())  # a new client starts from peft's zero B
    arrays, _ = run_round(2, arrays)
    # round 2 starts from the B client 2 stored in round 1, and stores the B it trained further
    assert all(np.array_equal(started[2][k], first[k]) for k in b_keys)
    later = store.load_arrays(2, local_set("fedsa-lora"))
    assert not all(np.array_equal(first[k], later[k]) for k in b_keys)
    assert not all(np.array_equal(later[k], store.load_arrays(5, local_set("fedsa-lora"))[k]) for k in b_keys)


def test_a_reply_carrying_b_is_rejected(task):
    cfg = _cfg()
    model = build_model(cfg, task.num_labels)
    server = method_spec("fedsa-lora").strategy(cfg, NodeDirectory(dict(NODES)), model)
    with_b = RecordDict({ARRAYS: ArrayRecord(adapter_state(model)),
                         "metrics": MetricRecord({"num-examples": 10, PERSONAL: 0.5, LOCAL_TEST: 3})})
    assert "lora_B" in (server.check_reply(with_b, 2) or "")


@pytest.mark.parametrize("override, why", [
    ('method.lora_aggregation="exact"', "keeps every client's B on the client"),
    ('adapter.type="loha"', "needs adapter.type = 'lora'"),
    ("dp.enabled=true", "DP-SGD does not privatize"),
    ("dp.user.enabled=true", "personal adapter tensors the server never sees"),
])
def test_what_does_not_apply_is_refused_with_a_reason(override, why):
    with pytest.raises(ConfigError, match="fedsa-lora") as err:
        load(SMOKE, ['method.name="fedsa-lora"', override, "dp.noise_multiplier=1.0", "dp.user.noise_multiplier=1.0"])
    assert why in str(err.value)


def test_the_recipe_loads_and_shares_everything_but_b():
    cfg = load(ROOT / "simulations" / "fedsa-lora.toml")
    strategy = method_spec(cfg.method.name).strategy
    assert cfg.method.name == "fedsa-lora" and cfg.adapter.type == "lora"
    assert not strategy.exchanged("x.lora_B.weight") and not strategy.exchanged("x.lora_embedding_B")
    assert strategy.exchanged("x.lora_A.weight") and strategy.exchanged("classifier.weight")

"""FedSVD: clients train and upload B only; the server re-factorizes B̄·A by SVD into an orthonormal A every round."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.base import ClientRuntime
from clients.first_order import FirstOrderTrainer
from clients.registry import get_trainer_class
from fedpeft.adapters import adapter_state
from fedpeft.app.recipe import load, validate
from fedpeft.config import ConfigError
from fedpeft.data import prepare
from fedpeft.faults.attacks import attack
from fedpeft.models import build_model
from fedpeft.nodes import NodeDirectory
from fedpeft.records import ARRAYS
from strategies import available_methods, method_spec
from strategies.fedavg import lora_pairs

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"
NODES = {11: 0, 12: 1, 13: 2}  # node id -> client id
EXAMPLES = {11: 10, 12: 30, 13: 60}  # unequal weights 0.1, 0.3, 0.6


class _Nodes:
    """The part of a Flower grid that sampling reads: which nodes are online."""

    def get_node_ids(self) -> list[int]:
        return list(NODES)


def _cfg(*, dp: bool = False):
    raw = tomllib.loads(SMOKE.read_text())
    raw["method"] = {"name": "fedsvd"}
    raw["sim"].update(num_clients=3, clients_per_round=3)
    raw["train"]["local_steps"] = 3
    if dp:
        raw["dp"] = {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0}
    return validate(raw)


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _reply(state: dict[str, torch.Tensor], node: int) -> Message:
    rd = RecordDict({ARRAYS: ArrayRecord(state), "metrics": MetricRecord({"num-examples": EXAMPLES[node]})})
    return Message(rd, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


def _f64(x) -> np.ndarray:
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float64)


def test_two_rounds_send_orthonormal_a_and_keep_the_product_of_the_mean_b_exact():
    cfg = _cfg()
    model = build_model(cfg, 3)
    server = method_spec("fedsvd").strategy(cfg, NodeDirectory(dict(NODES)), model)
    every = set(adapter_state(model))
    a_keys = {k for k in every if "lora_A" in k}
    pairs = lora_pairs(every)
    assert len(pairs) == 4 and set(server.template) == every  # A, B and the head are all sent
    assert set(server.reply_templates()[ARRAYS]) == every - a_keys  # and A is never expected back
    weights = np.array([EXAMPLES[n] for n in NODES], dtype=np.float64) / sum(EXAMPLES.values())
    gen = torch.Generator().manual_seed(0)
    arrays = server.initial_arrays()
    seeded = {ka: _f64(arrays[ka]) for ka, _ in pairs}
    for rnd in (1, 2):
        sent = list(server.configure_train(rnd, arrays, ConfigRecord(), _Nodes()))
        assert all(set(m.content[ARRAYS]) == every for m in sent)
        ups = {n: {k: torch.randn(v.shape, generator=gen) for k, v in adapter_state(model).items() if k not in a_keys}
               for n in NODES}
        new, _ = server.aggregate_train(rnd, [_reply(ups[n], n) for n in NODES])
        assert not server.pop_rejections() and new is not None and set(new) == every
        for ka, kb in pairs:
            a_old, a_new, b_new = _f64(arrays[ka]), _f64(new[ka]), _f64(new[kb])
            assert new[ka].numpy().dtype == np.float32 and new[kb].numpy().dtype == np.float32
            assert new[ka].shape == arrays[ka].shape and new[kb].shape == arrays[kb].shape
            np.testing.assert_allclose(a_new @ a_new.T, np.eye(a_new.shape[0]), atol=1e-5)
            b_mean = sum(w * _f64(ups[n][kb]) for w, n in zip(weights, NODES))
            np.testing.assert_allclose(b_new @ a_new, b_mean @ a_old, rtol=1e-4, atol=1e-5)
            assert not np.allclose(a_new, a_old, atol=1e-3)  # A moved: it is not the seeded init any more
        head = [k for k in every if "classifier" in k]
        assert head
        for k in head:  # the head is the plain example-weighted mean
            np.testing.assert_allclose(_f64(new[k]), sum(w * _f64(ups[n][k]) for w, n in zip(weights, NODES)),
                                       rtol=1e-5, atol=1e-6)
        arrays = new
    assert all(not np.allclose(_f64(arrays[ka]), seeded[ka], atol=1e-3) for ka in seeded)


def test_a_reply_carrying_a_is_rejected():
    cfg = _cfg()
    model = build_model(cfg, 3)
    server = method_spec("fedsvd").strategy(cfg, NodeDirectory(dict(NODES)), model)
    with_a = RecordDict({ARRAYS: ArrayRecord(adapter_state(model)), "metrics": MetricRecord({"num-examples": 10})})
    assert "lora_A" in (server.check_reply(with_a, 0) or "")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return prepare(_cfg(), tmp_path_factory.mktemp("task"))


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_a_client_trains_from_the_sent_a_keeps_it_and_uploads_only_b_and_the_head(tmp_path, task, dp):
    cfg = _cfg(dp=dp)
    spec = method_spec("fedsvd")
    model = build_model(cfg, task.num_labels)
    server = spec.strategy(cfg, NodeDirectory(dict(NODES)), build_model(cfg, task.num_labels))
    trainer = get_trainer_class(spec.trainer)(ClientRuntime(cfg, task, model, str(tmp_path)), spec.strategy)
    every = set(adapter_state(model))
    a_keys = {k for k in every if "lora_A" in k}
    assert isinstance(trainer, FirstOrderTrainer) and trainer.keys == every and trainer.uploads == every - a_keys
    seeded = {k: v.clone() for k, v in adapter_state(model).items()}
    # What a later round sends: an A with orthonormal rows that no process builds from the seed.
    gen = torch.Generator().manual_seed(1)
    state = {k: v.clone() for k, v in seeded.items()}
    for k in a_keys:
        q, _ = torch.linalg.qr(torch.randn(state[k].shape[1], state[k].shape[0], generator=gen))
        state[k] = q.T.contiguous()
    for k in every - a_keys:
        state[k] = 0.1 * torch.randn(state[k].shape, generator=gen)
    msg = next(iter(server.configure_train(2, ArrayRecord(state), ConfigRecord(), _Nodes())))
    reply = trainer.train(msg, NODES[msg.metadata.dst_node_id])
    assert set(reply[ARRAYS]) == every - a_keys  # A never goes up
    after = adapter_state(model)
    for k in a_keys:
        assert torch.equal(after[k], state[k]) and not torch.equal(after[k], seeded[k])
    assert any(not torch.equal(after[k], state[k]) for k in every if "lora_B" in k)  # B trained
    assert server.check_reply(reply, NODES[msg.metadata.dst_node_id]) is None
    if dp:
        assert float(reply["metrics"]["epsilon"]) > 0


def test_a_tensor_attack_rewrites_only_what_a_reply_carries():
    cfg = load(SMOKE, ['method.name="fedsvd"', "sim.num_clients=3", "sim.clients_per_round=3",
                       "faults.byzantine_fraction=0.4", 'faults.attack="sign_flip"'])
    model = build_model(cfg, 3)
    server = method_spec("fedsvd").strategy(cfg, NodeDirectory(dict(NODES)), model)
    list(server.configure_train(1, server.initial_arrays(), ConfigRecord(), _Nodes()))
    up = {k: v + 1.0 for k, v in adapter_state(model).items() if "lora_A" not in k}
    replies = [_reply(up, n) for n in NODES]
    bad = attack(cfg.faults, 0, 1, replies, NODES.get, frozenset({0}), server.reference)
    assert len(bad) == 1 and set(bad[0].content[ARRAYS]) == set(up)
    sent = server.reference(11)
    for k in up:  # sign_flip: global − scale·(upload − global)
        np.testing.assert_allclose(_f64(bad[0].content[ARRAYS][k]),
                                   _f64(sent[k]) - cfg.faults.attack_scale * 1.0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("override, why", [
    ('method.lora_aggregation="exact"', "already gives B·A exactly"),
    ('adapter.type="loha"', "needs adapter.type = 'lora'"),
    ("dp.user.enabled=true", "not the A they are sent"),
    ('codecs.up=["delta", "int8"]', "codecs.up is not supported"),
    ('codecs.down=["fp16"]', "codecs.down is not supported"),
    ('codecs.merge="ties"', "codecs.merge = 'ties'"),
])
def test_what_does_not_compose_is_refused_with_a_reason(override, why):
    with pytest.raises(ConfigError, match="fedsvd") as err:
        load(SMOKE, ['method.name="fedsvd"', override, "dp.user.noise_multiplier=1.0"])
    assert why in str(err.value)


def test_a_rank_above_a_layer_size_is_refused():
    raw = tomllib.loads(SMOKE.read_text())
    raw["method"] = {"name": "fedsvd"}
    raw["adapter"]["r"] = 40  # the tiny model's query/value are 32 x 32
    cfg = validate(raw)
    with pytest.raises(ConfigError, match=r"adapter.r <= min\(in, out\)"):
        method_spec("fedsvd").strategy(cfg, NodeDirectory(dict(NODES)), build_model(cfg, 3))


def test_recipes_load_and_every_other_method_uploads_what_it_exchanges():
    assert load(ROOT / "simulations" / "fedsvd.toml").method.name == "fedsvd"
    dp = load(ROOT / "simulations" / "dp-fedsvd.toml")
    assert dp.method.name == "fedsvd" and dp.dp.enabled
    keys = ["m.lora_A.default.weight", "m.lora_B.default.weight", "classifier.weight", "m.hada_w1_a", "m.hada_w2_a"]
    for name in available_methods():
        strategy = method_spec(name).strategy
        if name != "fedsvd":
            assert all(strategy.uploaded(k) == strategy.exchanged(k) for k in keys), name

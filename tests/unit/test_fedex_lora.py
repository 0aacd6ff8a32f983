"""FedEx-LoRA: the global model W0 + R + s·B̄·Ā is exactly the example-weighted mean of the clients' models."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.base import ClientRuntime
from clients.codec import coded_train
from clients.fedex import FedExTrainer
from clients.registry import get_trainer_class
from fedpeft.adapters import adapter_state, load_adapter_state
from fedpeft.app.recipe import load, validate
from fedpeft.config import ConfigError
from fedpeft.data import prepare
from fedpeft.methods.fedex_wire import RESIDUAL, base_weight, keep_pretrained
from fedpeft.models import build_model
from fedpeft.nodes import NodeDirectory
from fedpeft.records import ARRAYS
from strategies import method_spec

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "simulations" / "smoke.toml"
NODES = {11: 0, 12: 1, 13: 2}  # node id -> client id
EXAMPLES = {11: 10, 12: 30, 13: 60}  # unequal weights 0.1, 0.3, 0.6


class _Nodes:
    """The part of a Flower grid that sampling reads: which nodes are online."""

    def get_node_ids(self) -> list[int]:
        return list(NODES)


def _cfg(**sections):
    raw = tomllib.loads(SMOKE.read_text())
    raw["method"] = {"name": "fedex-lora"}
    raw["adapter"]["lora_alpha"] = 12  # s = 12 / 4 = 3: a wrong scaling shows
    raw["sim"].update(num_clients=3, clients_per_round=3)
    raw["train"]["local_steps"] = 2
    raw.update(sections)
    return validate(raw)


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1


def _reply(state: dict, node: int) -> Message:
    rd = RecordDict({ARRAYS: ArrayRecord(state), "metrics": MetricRecord({"num-examples": EXAMPLES[node]})})
    return Message(rd, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


def _f64(t: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t, dtype=np.float64)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _client_mean(server, w0: dict, r_prev: dict, replies: list[Message]) -> dict[str, np.ndarray]:
    """Per layer, the example-weighted mean of the clients' full weights W0 + R_prev + s·B_i·A_i (float64)."""
    counts = np.array([float(m.content["metrics"]["num-examples"]) for m in replies])
    out = {}
    for path, layer in server.layers.items():
        full = [w0[path] + r_prev[path] + layer.scale * _f64(m.content[ARRAYS][layer.b].numpy())
                @ _f64(m.content[ARRAYS][layer.a].numpy()) for m in replies]
        out[path] = sum(n * f for n, f in zip(counts / counts.sum(), full))
    return out


def _assert_exact(server, w0: dict, r_prev: dict, replies: list[Message], arrays: ArrayRecord) -> dict:
    """W0 + R_new + s·B̄·Ā equals the clients' mean for every layer, and W0 + R_prev + s·B̄·Ā does not."""
    mean = _client_mean(server, w0, r_prev, replies)
    r_new = {p: _f64(v.numpy()) for p, v in server.extra_records(0)[RESIDUAL].items()}
    for path, layer in server.layers.items():
        product = layer.scale * _f64(arrays[layer.b].numpy()) @ _f64(arrays[layer.a].numpy())
        np.testing.assert_allclose(w0[path] + r_new[path] + product, mean[path], rtol=1e-5, atol=1e-5)
        # separate averaging alone (FedAvg) is off by far more: the residual carries the difference
        error = np.abs(w0[path] + r_new[path] + product - mean[path]).max()
        assert np.abs(w0[path] + r_prev[path] + product - mean[path]).max() > 100 * error
    return mean


def test_two_rounds_aggregate_exactly_to_the_mean_of_the_client_models():
    cfg = _cfg()
    server_model = build_model(cfg, 3)
    server = method_spec("fedex-lora").strategy(cfg, NodeDirectory(dict(NODES)), server_model)
    pristine = build_model(cfg, 3)
    assert len(server.layers) == 4 and all(layer.scale == 3.0 for layer in server.layers.values())
    w0 = {p: _f64(base_weight(pristine, p)) for p in server.layers}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (4, 12), generator=gen)
    arrays = server.initial_arrays()
    for rnd in (1, 2):
        sent = list(server.configure_train(rnd, arrays, ConfigRecord(), _Nodes()))
        assert len(sent) == 3 and all(RESIDUAL in m.content.array_records for m in sent)
        r_prev = {p: _f64(v.numpy()) for p, v in sent[0].content[RESIDUAL].items()}
        assert set(r_prev) == set(server.layers)
        assert (rnd == 1) == all(not r.any() for r in r_prev.values())  # round 2 carries round 1's residual
        states = {n: {k: 0.5 * torch.randn(v.shape, generator=gen) for k, v in adapter_state(server_model).items()}
                  for n in NODES}
        replies = [_reply(states[n], n) for n in NODES]
        arrays, _ = server.aggregate_train(rnd, replies)
        assert not server.pop_rejections() and arrays is not None
        mean = _assert_exact(server, w0, r_prev, replies, arrays)
        r_new = {p: _f64(v.numpy()) for p, v in server.extra_records(rnd + 1)[RESIDUAL].items()}
        # the server's model is W0 + R in the base weights plus the global adapter
        server.load_global(server_model, arrays)
        for path in server.layers:
            np.testing.assert_allclose(_f64(base_weight(server_model, path)), w0[path] + r_new[path], atol=1e-6)
        # and it computes what a model whose weights are the clients' mean (and whose LoRA adds nothing) computes
        reference = build_model(cfg, 3)
        state = arrays.to_torch_state_dict()
        state.update({layer.b: torch.zeros_like(state[layer.b]) for layer in server.layers.values()})
        load_adapter_state(reference, state)
        with torch.no_grad():
            for path in server.layers:
                base_weight(reference, path).copy_(torch.from_numpy(mean[path]))
        torch.testing.assert_close(_logits(server_model, ids), _logits(reference, ids), rtol=1e-4, atol=1e-5)

    # the residual is server state: a resumed run sends (and folds) the same R
    resumed = method_spec("fedex-lora").strategy(cfg, NodeDirectory(dict(NODES)), build_model(cfg, 3))
    resumed.load_server_state(server.server_state())
    for path in server.layers:
        assert np.array_equal(resumed.extra_records(3)[RESIDUAL][path].numpy(),
                              server.extra_records(3)[RESIDUAL][path].numpy())


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return prepare(_cfg(), tmp_path_factory.mktemp("task"))


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_client_trains_from_w0_plus_r_and_never_accumulates(tmp_path, task, dp):
    cfg = _cfg(dp={"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0}) if dp else _cfg()
    spec = method_spec("fedex-lora")
    server = spec.strategy(cfg, NodeDirectory(dict(NODES)), build_model(cfg, task.num_labels))
    model = build_model(cfg, task.num_labels)
    trainer = get_trainer_class(spec.trainer)(ClientRuntime(cfg, task, model, str(tmp_path)), spec.strategy)
    assert isinstance(trainer, FedExTrainer)
    w0 = {p: base_weight(model, p).detach().clone() for p in server.layers}
    seen: list[dict[str, torch.Tensor]] = []  # the base weights each round trains from, after `begin`
    begin = trainer.begin
    trainer.begin = lambda ctx: (begin(ctx), seen.append(
        {p: base_weight(model, p).detach().clone() for p in server.layers}))
    rng = np.random.default_rng(1)
    sent_r = []
    for rnd in (1, 2):
        server.residual = {p: rng.standard_normal(r.shape) for p, r in server.residual.items()}
        sent_r.append({p: torch.from_numpy(r.astype(np.float32)) for p, r in server.residual.items()})
        msg = next(iter(server.configure_train(rnd, server.initial_arrays(), ConfigRecord(), _Nodes())))
        reply = trainer.train(msg, NODES[msg.metadata.dst_node_id])
        assert server.check_reply(reply, NODES[msg.metadata.dst_node_id]) is None  # A, B, head: as FedAvg
        assert ("epsilon" in reply["metrics"]) == dp
        for p in server.layers:  # W0 is back once the client's round ends: the shared model stays pretrained
            assert torch.equal(base_weight(model, p), w0[p])
    r1, r2 = sent_r
    for p in server.layers:
        torch.testing.assert_close(seen[0][p], w0[p] + r1[p], rtol=0, atol=1e-6)
        torch.testing.assert_close(seen[1][p], w0[p] + r2[p], rtol=0, atol=1e-6)  # not W0 + R1 + R2
        assert not torch.allclose(seen[1][p], w0[p] + r1[p] + r2[p], atol=1e-2)


def test_with_update_codecs_the_global_model_is_the_mean_of_the_decoded_client_models(tmp_path, task):
    cfg = _cfg(codecs={"up": ["delta", "topk:0.25"]})
    spec = method_spec("fedex-lora")
    server = spec.strategy(cfg, NodeDirectory(dict(NODES)), build_model(cfg, task.num_labels))
    model = build_model(cfg, task.num_labels)
    w0 = {p: _f64(base_weight(model, p)) for p in server.layers}
    trainer = get_trainer_class(spec.trainer)(ClientRuntime(cfg, task, model, str(tmp_path)), spec.strategy)
    arrays = server.initial_arrays()
    for rnd in (1, 2):
        sent = list(server.configure_train(rnd, arrays, ConfigRecord(), _Nodes()))
        r_prev = {p: _f64(v.numpy()) for p, v in sent[0].content[RESIDUAL].items()}
        replies = [Message(coded_train(trainer, trainer.rt, m, NODES[m.metadata.dst_node_id]), reply_to=m)
                   for m in sent]
        assert all(not m.content.array_records for m in replies)  # coded: one payload each
        arrays, _ = server.aggregate_train(rnd, replies)
        assert not server.pop_rejections() and arrays is not None
        _assert_exact(server, w0, r_prev, replies, arrays)  # the replies now hold the decoded uploads


def test_a_message_without_the_residual_fails_the_client(tmp_path, task):
    cfg = _cfg()
    spec = method_spec("fedex-lora")
    trainer = FedExTrainer(ClientRuntime(cfg, task, build_model(cfg, task.num_labels), str(tmp_path)), spec.strategy)
    server = spec.strategy(cfg, NodeDirectory(dict(NODES)), build_model(cfg, task.num_labels))
    msg = next(iter(server.configure_train(1, server.initial_arrays(), ConfigRecord(), _Nodes())))
    msg.content = RecordDict({name: rec for name, rec in msg.content.items() if name != RESIDUAL})
    with pytest.raises(ValueError, match=RESIDUAL):
        trainer.train(msg, 0)


@pytest.mark.parametrize("override, why", [
    ("dp.user.enabled=true", "not bounded by clipping"),
    ('codecs.merge="ties"', "use codecs.merge = 'mean'"),
    ('adapter.type="loha"', "needs adapter.type = 'lora'"),
    ("adapter.use_dora=true", "DoRA"),
    ('codecs.down=["fp16"]', "dense residual as an array record"),
])
def test_what_does_not_compose_is_refused_with_a_reason(override, why):
    with pytest.raises(ConfigError, match="fedex-lora") as err:
        load(SMOKE, ['method.name="fedex-lora"', override, "dp.user.noise_multiplier=1.0"])
    assert why in str(err.value)


def test_sample_dp_and_update_codecs_are_accepted_and_the_recipe_loads():
    load(SMOKE, ['method.name="fedex-lora"', "dp.enabled=true", "dp.noise_multiplier=1.0"])
    load(SMOKE, ['method.name="fedex-lora"', 'codecs.up=["delta", "topk:0.25"]'])
    cfg = load(ROOT / "simulations" / "fedex-lora.toml")
    assert cfg.method.name == "fedex-lora" and cfg.adapter.type == "lora"


def test_a_tied_base_weight_is_refused():
    from peft import LoraConfig, get_peft_model

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    model = get_peft_model(Tied(), LoraConfig(r=2, target_modules=["head"]))
    with pytest.raises(ConfigError, match="ties"):
        keep_pretrained(model, ["base_model.model.head"])

"""DP-SGD checked per example: what a client's DP-SGD step applies equals clip-and-sum of plain per-example gradients.

Opacus computes per-sample gradients with module hooks (or ghost clipping's two backward passes),
and a mistake there is silent: training runs, ε is accounted, and the update is simply wrong
(opacus issue #820 reports this for peft LoRA models). Here, for a tiny LoRA classifier (BERT) and a
tiny LoRA decoder (Llama), one DP-SGD step runs through the clients' own code (`FirstOrderTrainer`
→ `DPSteps` → `make_private` / `dp_step`) on one batch of examples of different lengths (so with
padding), noise off. The privatized gradient it applies (read in the `adjust_gradients` hook, after
Opacus's clip, noise and scaling and right before the optimizer step) must equal DP-SGD by
definition, computed independently with plain autograd one example at a time:

    g_i = ∇ loss_i (example i alone, no padding), clipped to C: g_i · min(1, C / ‖g_i‖),
    summed over the batch and divided by the expected batch size q·n.

‖g_i‖ is the norm over all exchanged (= trainable) adapter tensors together (flat clipping), and
loss_i is the loss fedpeft trains on for that example: class cross-entropy, or the mean over the
example's response tokens of the next-token cross-entropy. Every `dp.grad_sample_mode` is covered
where the config allows it ("ghost" is refused for causal LMs, which is checked too).
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients import local_steps
from clients.app.runtime import ClientRuntime
from clients.first_order import FirstOrderTrainer
from clients.local_steps import LocalRound
from fedpeft.adapters import adapter_state, load_adapter_state
from fedpeft.app.recipe import load
from fedpeft.config import Config, DPConfig
from fedpeft.data import PreparedTask, prepare
from fedpeft.data.prepared import collate, label_column
from fedpeft.data.prompts import IGNORE_INDEX
from fedpeft.models import build_model
from fedpeft.privacy import sample_level

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {"classifier": ROOT / "simulations" / "smoke.toml", "causal-lm": ROOT / "simulations" / "llm-smoke.toml"}
SMALL = ["data.builtin.num_train=120", "data.builtin.num_test=10", "sim.num_clients=2", "sim.clients_per_round=2"]
# The "skills" instructions: answers of several lengths (llm-smoke's "words" answers are all one token + eos).
TASK = {"classifier": [], "causal-lm": ["data.builtin.task='skills'"]}
DP = ["dp.enabled=true", "dp.noise_multiplier=1.0", "train.local_steps=1", "train.batch_size=16",
      "train.optimizer='sgd'", "train.lr=1.0"]
MODES: tuple[str, ...] = typing.get_args(DPConfig.model_fields["grad_sample_mode"].annotation)
CASES = [(kind, mode) for kind in RECIPES for mode in MODES]
BATCH = 5  # one Poisson draw of 5 examples; the expected batch size q·n is train.batch_size = 16
CID = 0


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PreparedTask]:
    """The tiny classifier and causal-LM tasks, prepared once (small built-in data)."""
    return {kind: prepare(load(recipe, [*SMALL, *TASK[kind]]), tmp_path_factory.mktemp(kind))
            for kind, recipe in RECIPES.items()}


def _config(kind: str, mode: str) -> Config:
    """The tiny recipe of `kind` with DP-SGD in `mode`: one step, batch 16, plain SGD at lr 1."""
    return load(RECIPES[kind], [*SMALL, *TASK[kind], *DP, f"dp.grad_sample_mode='{mode}'"])


def _rows(task: PreparedTask, n: int) -> tuple[list[list[int]], list]:
    """`n` training rows of client CID of pairwise different lengths (so a batch of them is padded) and,
    for causal LM, different numbers of response tokens (so a token-level batch mean differs from
    the mean of per-example means)."""
    ds = task.client_dataset(CID)
    ids, labels, seen_len, seen_resp = [], [], set(), set()
    for x, y in zip(ds["input_ids"], ds[label_column(ds)]):
        resp = sum(t != IGNORE_INDEX for t in y[1:]) if isinstance(y, list) else 0
        if len(x) in seen_len or (isinstance(y, list) and resp in seen_resp):
            continue
        seen_len.add(len(x))
        seen_resp.add(resp)
        ids.append(list(x))
        labels.append(list(y) if isinstance(y, list) else int(y))
        if len(ids) == n:
            return ids, labels
    raise AssertionError(f"client {CID} has fewer than {n} rows of distinct lengths")


def _message(state: dict[str, torch.Tensor]) -> Message:
    """A round-1 train message carrying the global adapter `state`."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"server-round": 1})})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


class _Recorder(FirstOrderTrainer):
    """FedAvg's first-order trainer that keeps the gradient the optimizer is about to apply."""

    applied: list[dict[str, torch.Tensor]]

    def begin(self, ctx: LocalRound) -> None:
        """Start a round with nothing recorded."""
        self.applied = []

    def adjust_gradients(self, ctx: LocalRound) -> None:
        """Runs on the privatized gradient (clipped, noised, divided by q·n), right before the step."""
        self.applied.append({k: p.grad.detach().clone() for k, p in self.exchanged_parameters.items()})


def _example_loss(model: torch.nn.Module, ids: list[int], label, kind: str) -> torch.Tensor:
    """The loss of one example alone (no padding), written out from DP-SGD's definition, not fedpeft's code."""
    x = torch.tensor([ids])
    logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    if kind == "classifier":
        return torch.nn.functional.cross_entropy(logits, torch.tensor([label]))
    targets = torch.tensor(label[1:])  # position t predicts token t + 1
    mask = targets != IGNORE_INDEX
    assert mask.any(), "an example without response tokens has no loss"
    return torch.nn.functional.cross_entropy(logits[0, :-1][mask], targets[mask])  # mean over response tokens


def _per_example_grads(model, params: dict[str, torch.nn.Parameter], rows, kind: str) -> list[dict[str, torch.Tensor]]:
    """Each example's gradient of its own loss w.r.t. `params`, one plain backward pass per example."""
    out = []
    for ids, label in zip(*rows):
        grads = torch.autograd.grad(_example_loss(model, ids, label, kind), list(params.values()))
        out.append({k: g.detach() for k, g in zip(params, grads)})
    return out


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """All tensors as one vector (the flat clipping norm is over all of them together)."""
    return torch.cat([g.flatten() for g in grads.values()])


@pytest.mark.parametrize("kind,mode", CASES)
def test_dp_sgd_step_equals_clipped_sum_of_per_example_gradients(tasks, tmp_path, monkeypatch, kind: str, mode: str):
    """A noiseless DP-SGD step of the client applies Σ_i clip_C(∇ loss_i) / (q·n), ∇ loss_i by plain autograd."""
    if kind == "causal-lm" and mode == "ghost":  # offered for classifiers only: the config must refuse it
        with pytest.raises(ValueError, match="ghost"):
            _config(kind, mode)
        return
    task, cfg = tasks[kind], _config(kind, mode)
    model = build_model(cfg, task.num_labels)
    # Dropout draws one mask for the whole batch, which no one-example-at-a-time pass can replay:
    # with p = 0 the forward is deterministic and the comparison exact. (LoRA dropout is 0 already.)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    trainer = _Recorder(ClientRuntime(cfg, task, model, str(tmp_path)))
    params = trainer.exchanged_parameters
    assert {id(p) for p in params.values()} == {id(p) for p in model.parameters() if p.requires_grad}
    # A global adapter as after some rounds: LoRA's B starts at zero, which would leave A without gradient.
    gen = torch.Generator().manual_seed(0)
    start = {k: 0.2 * torch.randn(v.shape, generator=gen) for k, v in adapter_state(model).items() if k in trainer.keys}
    load_adapter_state(model, start, keys=set(trainer.keys))

    rows = _rows(task, BATCH)
    model.train()
    per_example = _per_example_grads(model, params, rows, kind)
    norms = torch.stack([_flat(g).norm() for g in per_example])
    assert (norms > 1e-2).all(), norms  # Opacus's 1e-6 in C / (‖g‖ + 1e-6) stays far below the tolerance
    # A bound in a clear gap between the sorted norms, near the middle: some examples are left as they
    # are (an error in the scale of per-example gradients shows only on those), the others are clipped.
    ordered = norms.sort().values
    split = min((i for i in range(1, BATCH) if ordered[i] > 1.01 * ordered[i - 1]), key=lambda i: abs(i - 2.5))
    cfg.dp.max_grad_norm = bound = float((ordered[split - 1] * ordered[split]).sqrt())
    assert (norms < bound).sum() == split and (norms > bound).sum() == BATCH - split

    n = len(trainer.dataset(CID))
    expected_batch = sample_level.sample_rate(cfg, n) * n  # q·n: Poisson's expected batch, not this draw's size
    assert expected_batch == pytest.approx(cfg.train.batch_size) and expected_batch != BATCH
    factors = (bound / norms).clamp(max=1.0)
    reference = {k: sum(f * g[k] for f, g in zip(factors, per_example)) / expected_batch for k in params}
    ref, unclipped = _flat(reference), sum(_flat(g) for g in per_example) / expected_batch
    # The test can fail: clipping each example moves the update by far more than the tolerance, and
    # not only in scale (a clip of the batch's gradient as a whole would give a multiple of `unclipped`).
    assert (ref - unclipped).norm() > 1e-2 * unclipped.norm()
    assert (ref - (ref @ unclipped) / (unclipped @ unclipped) * unclipped).norm() > 1e-2 * ref.norm()

    # One DP-SGD step through the client code: noise 0 (the config only takes σ > 0) and this one batch.
    real_plan = sample_level.plan

    def noiseless_plan(*args, **kwargs) -> sample_level.ClientPlan:
        return dataclasses.replace(real_plan(*args, **kwargs), noise_multiplier=0.0, steps=1)

    def one_draw(self, steps: int) -> Iterator[dict[str, torch.Tensor]]:
        yield collate(*rows, task.pad_token_id)  # how `poisson_loader` collates a draw: padded to its longest row

    monkeypatch.setattr(local_steps.sample_level, "plan", noiseless_plan)
    monkeypatch.setattr(local_steps.DPSteps, "draws", one_draw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ε of σ = 0 is infinite; Opacus warns about its orders
        reply = trainer.train(_message({k: v.clone() for k, v in start.items()}), CID)
    assert reply["metrics"]["dp-steps"] == 1

    (applied,) = trainer.applied  # the one step's privatized gradient
    uploaded = reply["arrays"].to_torch_state_dict()
    for k in params:  # is what the step applied to the uploaded adapter (SGD, lr = 1)
        torch.testing.assert_close(start[k] - uploaded[k], applied[k], rtol=1e-4, atol=1e-6)
    for k in params:  # and equals DP-SGD's, tensor by tensor: elementwise and, for tiny tensors, in norm
        torch.testing.assert_close(applied[k], reference[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        assert (applied[k] - reference[k]).norm() <= 1e-4 * reference[k].norm(), k

"""First-order local training of the adapter: one loop, with hooks, for plain training and DP-SGD.

A method that trains differently subclasses `FirstOrderTrainer` and overrides only what changes:
`begin` (after the global adapter is loaded), `loss`, `adjust_gradients` (after backward and, with
DP-SGD, after privatization), `after_step`, `upload` (what the reply carries).
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from clients.base import Trainer
from clients.local_steps import DPSteps, LocalRound, PlainSteps, make_optimizer
from clients.registry import register_trainer
from fedpeft.faults.attacks import label_flipped
from clients.rows import ClientRows, FlippedLabels
from fedpeft.adapters import adapter_state, load_adapter_state
from fedpeft.causal_lm import batch_loss
from fedpeft.methods.contract import FIRST_ORDER
from fedpeft.records import ARRAYS, NUM_EXAMPLES, SERVER_ROUND, TRAIN_LOSS, TRAIN_SECONDS
from fedpeft.seeding import derive_seed

__all__ = ["FirstOrderTrainer", "dp_reply_metrics", "make_optimizer"]


def dp_reply_metrics(num_examples: int, dp_metrics: dict) -> dict:
    """A DP-SGD reply's metrics: the example count and the privacy figures, nothing computed from the data.

    ε covers only the released adapter. The training loss (raw data), the count of non-empty Poisson
    draws (it depends on whether an example was sampled) and the training time (sequence lengths,
    batch sizes) are not privatized, so they stay on the client. `num-examples` is sent: the server
    weights by it, and it reveals the client's dataset size n, which DP-SGD treats as public (the
    sampling rate q = batch_size / n sent alongside is derived from it anyway).
    """
    return {NUM_EXAMPLES: num_examples, **dp_metrics}


@register_trainer(FIRST_ORDER)
class FirstOrderTrainer(Trainer):
    """Load the global adapter, take local optimizer steps (DP-SGD if configured), return the new adapter tensors."""

    def dataset(self, cid: int):
        """The examples client `cid` trains on (its whole partition)."""
        return ClientRows(self.rt.task, cid)

    def train(self, msg: Message, cid: int) -> RecordDict:
        """Train on client `cid` from the global adapter in `msg`; reply with adapter + metrics."""
        t0 = time.perf_counter()
        cfg, model = self.rt.cfg, self.rt.model
        server_round = int(msg.content["config"][SERVER_ROUND])
        load_adapter_state(model, msg.content[ARRAYS].to_torch_state_dict(), keys=set(self.keys))
        params = [p for p in model.parameters() if p.requires_grad]
        rows = self.dataset(cid)
        if label_flipped(msg):  # a Byzantine client of `faults.attack = "label_flip"`
            rows = FlippedLabels(rows, self.rt.task.num_labels)
        ctx = LocalRound(msg, cid, server_round, rows, params)
        torch.manual_seed(derive_seed(cfg.sim.seed, server_round, cid, "dropout"))
        self.begin(ctx)
        model.train()
        try:
            (DPSteps if cfg.dp.enabled else PlainSteps)(self, ctx).run()
        finally:
            model.eval()
        if cfg.dp.enabled:
            return self.upload(ctx, dp_reply_metrics(len(ctx.dataset), ctx.metrics))
        metrics = {NUM_EXAMPLES: len(ctx.dataset), TRAIN_LOSS: ctx.loss_sum / max(ctx.steps, 1),
                   "train-steps": ctx.steps, TRAIN_SECONDS: time.perf_counter() - t0, **ctx.metrics}
        return self.upload(ctx, metrics)

    # ----- hooks ------------------------------------------------------------------------------
    def begin(self, ctx: LocalRound) -> None:
        """Called once the global adapter is loaded, before the first step."""

    def loss(self, ctx: LocalRound, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of one batch (the task's: class cross-entropy, or the response-token loss)."""
        return batch_loss(model, batch)

    base_loss = loss  # lets the DP engine tell whether a subclass changed the loss

    def adjust_gradients(self, ctx: LocalRound) -> None:
        """Change `p.grad` of the trainable parameters before the optimizer step (data-independently)."""

    def after_step(self, ctx: LocalRound) -> None:
        """Called after every optimizer step."""

    def upload(self, ctx: LocalRound, metrics: dict) -> RecordDict:
        """The reply: the adapter tensors the method uploads (`uploads`; by default all it exchanges) + metrics."""
        state = {k: v for k, v in adapter_state(self.rt.model).items() if k in self.uploads}
        return RecordDict({ARRAYS: ArrayRecord(state), "metrics": MetricRecord(metrics)})

"""How local steps are taken: plain optimizer steps, or DP-SGD through Opacus. Both call the trainer's hooks.

A trainer's hooks (`loss`, `adjust_gradients`, `after_step`) run at the same points in both: a
method that changes the loss or the step is written once and works with and without DP-SGD.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from flwr.app import Message

from fedpeft.config import TrainConfig
from fedpeft.data.prepared import train_batches
from fedpeft.precision import compute
from fedpeft.privacy import dpsgd, noise, sample_level
from fedpeft.seeding import rng

if TYPE_CHECKING:
    from clients.base import ClientRuntime
    from fedpeft.state import ClientStateStore


class LocalHooks(Protocol):
    """What the local loop needs of its trainer: the runtime, the loss, and the per-step hooks."""

    rt: "ClientRuntime"

    def loss(self, ctx: "LocalRound", model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of one batch."""

    def adjust_gradients(self, ctx: "LocalRound") -> None:
        """Change the gradients before the optimizer step (FedProx, SCAFFOLD)."""

    def after_step(self, ctx: "LocalRound") -> None:
        """Run after each optimizer step."""

    def store(self, msg: Message) -> "ClientStateStore":
        """The client state store for this message's run."""


@dataclass
class LocalRound:
    """One client's local training in one round: what the hooks may read and keep."""

    msg: Message
    cid: int
    server_round: int
    dataset: Any
    params: list[torch.nn.Parameter]  # the trainable tensors
    steps: int = 0  # optimizer steps taken so far
    loss_sum: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)  # extra reply metrics (e.g. ε)
    scratch: dict[str, Any] = field(default_factory=dict)  # what a method's hooks keep between calls


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured local optimizer over `params`."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class PlainSteps:
    """Shuffled mini-batches and ordinary optimizer steps (optional gradient-norm clipping)."""

    def __init__(self, trainer: LocalHooks, ctx: LocalRound) -> None:
        self.trainer, self.ctx = trainer, ctx
        rt = trainer.rt
        cfg = rt.cfg
        self.batches_ = train_batches(
            ctx.dataset, cfg.train.batch_size, rng(cfg.sim.seed, ctx.server_round, ctx.cid, "batches"),
            rt.task.pad_token_id, steps=cfg.train.local_steps if cfg.train.local_epochs == 0 else 0,
            epochs=cfg.train.local_epochs,
        )
        self.opt = make_optimizer(ctx.params, cfg.train)
        self.model = rt.model

    def run(self) -> None:
        """Take every local step."""
        t, ctx, clip = self.trainer, self.ctx, self.trainer.rt.cfg.train.max_grad_norm
        device = next(self.model.parameters()).device
        precision = self.trainer.rt.cfg.train.precision
        for batch in self.batches_:
            with compute(precision, device):  # the forward only: gradients and the step stay fp32
                loss = t.loss(ctx, self.model, {k: v.to(device) for k, v in batch.items()})
            loss.backward()
            t.adjust_gradients(ctx)
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(ctx.params, clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            ctx.loss_sum += float(loss.detach())
            ctx.steps += 1
            t.after_step(ctx)


class DPSteps:
    """DP-SGD: Poisson batches, per-sample clipping and noise (Opacus); ε accounted in the client state store.

    `adjust_gradients` runs on the privatized gradient (it must not read data, so it costs no privacy).
    """

    def __init__(self, trainer: LocalHooks, ctx: LocalRound) -> None:
        self.trainer, self.ctx = trainer, ctx
        rt = trainer.rt
        cfg, task = rt.cfg, rt.task
        self.delta = sample_level.resolve_delta(cfg, [len(p) for p in task.partitions])
        self.plan = sample_level.plan(cfg, len(ctx.dataset), self.delta)
        self.model = rt.model
        self.device = next(self.model.parameters()).device
        # Both the batch draws and the Gaussian noise: a party that can regenerate either (whoever
        # holds the run seed, outside a simulation) can undo the privacy of the released adapter.
        self.source = noise.noise_source(cfg, rt.simulated)
        parts = (cfg.sim.seed, ctx.server_round, ctx.cid)
        self.loader = dpsgd.poisson_loader(ctx.dataset, self.plan.sample_rate, task.pad_token_id,
                                           noise.torch_noise_generator(self.source, *parts, "dp-sample"))
        self.noise_gen = noise.torch_noise_generator(self.source, *parts, "dp-noise", device=self.device)

    def draws(self, steps: int) -> Iterator[dict[str, torch.Tensor] | None]:
        """`steps` Poisson draws (None for an empty one)."""
        done = 0
        while done < steps:
            for batch in self.loader:
                if done == steps:
                    return
                done += 1
                yield batch

    def run(self) -> None:
        """Take the planned DP-SGD steps (an empty draw takes a noise-only step)."""
        t, ctx, cfg = self.trainer, self.ctx, self.trainer.rt.cfg
        # Refused before wrapping: raising after it would leave Opacus's hooks on the cached model.
        if cfg.dp.grad_sample_mode == "ghost" and type(t).loss is not type(t).base_loss:
            raise ValueError(f"dp.grad_sample_mode = 'ghost' computes the loss itself; trainer "
                             f"'{type(t).__name__}' changes the loss: use grad_sample_mode = 'hooks'")
        self.model.train()  # Opacus validates that the module is in training mode
        dp_model, opt, criterion = dpsgd.make_private(
            self.model, make_optimizer(ctx.params, cfg.train), self.loader, cfg, self.plan.noise_multiplier,
            self.noise_gen)
        dp_model.train()
        draws = 0

        def forward_loss(m: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
            with compute(cfg.train.precision, self.device):
                return t.loss(ctx, m, b)

        try:
            with warnings.catch_warnings():
                # Opacus's hooks over a frozen base model: harmless "Full backward hook is firing" warnings.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                for batch in self.draws(self.plan.steps):
                    draws += 1
                    if batch is None:  # an empty draw: a noise-only step, as accounted
                        dpsgd.noise_step(opt, adjust=lambda: t.adjust_gradients(ctx))
                        ctx.steps += 1
                        t.after_step(ctx)
                        continue
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    ctx.loss_sum += dpsgd.dp_step(dp_model, opt, criterion, batch,
                                                  loss_fn=forward_loss,
                                                  adjust=lambda: t.adjust_gradients(ctx))
                    ctx.steps += 1
                    t.after_step(ctx)
        finally:
            dpsgd.release(dp_model, ctx.params)
        ctx.metrics.update(sample_level.account_round(t.store(ctx.msg), ctx.cid, ctx.server_round, self.plan,
                                                      draws, cfg.dp.accountant))
        ctx.metrics[sample_level.NOISE_SEEDED] = int(self.source == noise.SEEDED)  # a setting, not data: free to report


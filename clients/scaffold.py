"""SCAFFOLD clients: train with the correction c − c_i, keep c_i in the client state store, upload Δc_i.

The correction is added in `adjust_gradients` (after backward; with DP-SGD after clipping and
noise: it depends on no example). c_i⁺ = c_i − c + (x − y_i)/(K·η_l) with K the steps actually
taken and η_l = train.lr (option II of the paper; its analysis is for SGD, the update is the same
for any optimizer).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from clients.first_order import FirstOrderTrainer
from clients.local_steps import LocalRound
from clients.registry import register_trainer
from fedpeft.adapters import adapter_parameters
from fedpeft.records import ARRAYS
from strategies.scaffold import CONTROL, VARIATE_SET


@register_trainer("scaffold")
class ScaffoldTrainer(FirstOrderTrainer):
    """First-order training with SCAFFOLD's drift correction and the client control variate."""

    def begin(self, ctx: LocalRound) -> None:
        """Read c from the message and c_i from the store (zero at first participation); keep x."""
        c = {k: v.numpy() for k, v in ctx.msg.content[CONTROL].items()}
        saved = self.store(ctx.msg).load_arrays(ctx.cid, VARIATE_SET)
        c_i = {k: saved[k] if k in saved else np.zeros_like(v) for k, v in c.items()}
        params = adapter_parameters(self.rt.model, self.keys)
        ctx.scratch.update(c=c, c_i=c_i, x={k: p.detach().cpu().numpy().copy() for k, p in params.items()})
        ctx.scratch["correction"] = [
            (p, torch.from_numpy(c[k] - c_i[k]).to(p.device, p.dtype)) for k, p in params.items() if p.requires_grad
        ]

    def adjust_gradients(self, ctx: LocalRound) -> None:
        """grad += c − c_i."""
        with torch.no_grad():
            for p, corr in ctx.scratch["correction"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(corr)

    def upload(self, ctx: LocalRound, metrics: dict) -> RecordDict:
        """The adapter y_i and Δc_i = c_i⁺ − c_i; c_i⁺ is stored for the client's next round."""
        reply = super().upload(ctx, metrics)
        c, c_i, x = ctx.scratch["c"], ctx.scratch["c_i"], ctx.scratch["x"]
        y = {k: v.numpy() for k, v in reply[ARRAYS].items()}
        scale = 1.0 / (ctx.steps * self.rt.cfg.train.lr) if ctx.steps else 0.0
        new = {k: (c_i[k] - c[k] + scale * (x[k] - y[k])).astype(c_i[k].dtype) if ctx.steps else c_i[k] for k in c}
        self.store(ctx.msg).save_arrays(ctx.cid, VARIATE_SET, new)
        reply[CONTROL] = ArrayRecord({k: Array(np.ascontiguousarray(new[k] - c_i[k])) for k in sorted(new)})
        return reply

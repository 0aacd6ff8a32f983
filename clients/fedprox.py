"""FedProx clients: the gradient of μ/2‖w − w_global‖² is added to every step's gradient.

Adding μ(w − w_global) to the gradient is the proximal term's exact gradient. It is added in
`adjust_gradients`, after backward and (with DP-SGD) after clipping and noise: it depends on no
example, so it costs no privacy, and it is not clipped away.
"""

from __future__ import annotations

import torch

from clients.first_order import FirstOrderTrainer
from clients.local_steps import LocalRound
from clients.registry import register_trainer
from fedpeft.methods.contract import FEDPROX


@register_trainer(FEDPROX)
class FedProxTrainer(FirstOrderTrainer):
    """First-order training with the proximal term towards the adapter the round started from."""

    def __init__(self, rt, method: type | None = None) -> None:
        super().__init__(rt, method)
        self.mu = float(self.method.Options.model_validate(rt.cfg.method.options()).mu)

    def begin(self, ctx: LocalRound) -> None:
        """Remember the global adapter tensors (the ones that travel) the round starts from."""
        ctx.scratch["prox"] = [(p, p.detach().clone()) for p in self.exchanged_parameters.values() if p.requires_grad]

    def adjust_gradients(self, ctx: LocalRound) -> None:
        """grad += μ (w − w_global) on every exchanged trainable tensor."""
        if self.mu == 0:
            return
        with torch.no_grad():
            for p, start in ctx.scratch["prox"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(p.detach() - start, alpha=self.mu)

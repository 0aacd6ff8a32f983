"""FedEx-LoRA clients: train LoRA as in FedAvg, from base weights W0 + R, R being the cumulative residual sent down.

The worker's model serves every client (and run) of the process, so R is folded into the pretrained
W0 kept once per model (`fedpeft.methods.fedex_wire`), never added to whatever the base weight holds,
and W0 is put back when the client's round ends. R depends on no local data: with DP-SGD the client
privatizes A and B as usual, and the residual the server forms from them is post-processing.
"""

from __future__ import annotations

from flwr.app import Message, RecordDict

from clients.first_order import FirstOrderTrainer
from clients.local_steps import LocalRound
from clients.registry import register_trainer
from fedpeft.methods.fedex_wire import FEDEX, RESIDUAL, fold_residual, restore_pretrained


@register_trainer(FEDEX)
class FedExTrainer(FirstOrderTrainer):
    """First-order LoRA training on base weights W0 + R; the upload is the adapter, as in FedAvg."""

    def train(self, msg: Message, cid: int) -> RecordDict:
        """Train from W0 + R, then put W0 back so the shared model is pretrained again (also on failure)."""
        if RESIDUAL not in msg.content.array_records:
            raise ValueError(f"the train message carries no '{RESIDUAL}' record (the cumulative residual)")
        try:
            return super().train(msg, cid)
        finally:
            restore_pretrained(self.rt.model)

    def begin(self, ctx: LocalRound) -> None:
        """Fold the message's cumulative residual into the base weights: W0 + R, whatever an earlier round left."""
        fold_residual(self.rt.model, {k: v.numpy() for k, v in ctx.msg.content[RESIDUAL].items()})

"""Clients of heterogeneous-rank LoRA methods: train the rank the server asked for, send only its slices."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Message, RecordDict

from clients.base import ClientRuntime
from clients.first_order import FirstOrderTrainer
from clients.registry import register_trainer
from fedpeft.adapters import adapter_state
from fedpeft.methods.lowrank import HETERO_RANK, RANK_KEY, pad_lora, truncate_lora


@register_trainer(HETERO_RANK)
class HeteroRankTrainer(FirstOrderTrainer):
    """First-order training of a rank-r LoRA held zero-padded in the process's largest-rank model."""

    def __init__(self, rt: ClientRuntime, method: type | None = None) -> None:
        super().__init__(rt, method)
        self.shapes = {k: tuple(v.shape) for k, v in adapter_state(rt.model).items() if k in self.keys}

    def train(self, msg: Message, cid: int) -> RecordDict:
        """Pad the rank-r download to the model's rank, train, reply with the rank-r slices."""
        rank = int(msg.content["config"][RANK_KEY])
        arrays = msg.content["arrays"]
        # The zero padding is what keeps this a rank-r LoRA: padded rows and columns get zero gradient.
        padded = pad_lora({k: arrays[k].numpy() for k in arrays}, self.shapes)
        msg.content = RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in padded.items()}),
                                  "config": msg.content["config"]})
        reply = super().train(msg, cid)
        up = reply["arrays"]
        sliced = truncate_lora({k: up[k].numpy() for k in up}, rank)
        rest = {name: rec for name, rec in reply.items() if name != "arrays"}
        return RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in sliced.items()}), **rest})

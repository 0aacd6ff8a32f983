"""First-order local training of the adapter (AdamW or SGD on the client's own examples)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from clients.registry import register_trainer
from clients.runtime import ClientRuntime
from fedpeft.adapters import adapter_state, load_adapter_state
from fedpeft.config import TrainConfig
from fedpeft.data.prepared import train_batches
from fedpeft.seeding import derive_seed, rng
from strategies import get_strategy_class


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured local optimizer over `params`."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@register_trainer("first_order")
class FirstOrderTrainer:
    """Load the global adapter, take local optimizer steps, return the new adapter tensors."""

    def __init__(self, rt: ClientRuntime) -> None:
        self.rt = rt
        self.method = get_strategy_class(rt.cfg.method.name)
        self.method.prepare_model(rt.model)
        self.keys = {k for k in adapter_state(rt.model) if self.method.exchanged(k)}

    def dataset(self, cid: int):
        """The examples client `cid` trains on (its whole partition)."""
        return self.rt.task.client_dataset(cid)

    def train(self, msg: Message, cid: int) -> RecordDict:
        """Train on client `cid` from the global adapter in `msg`; reply with adapter + metrics."""
        cfg, model, task = self.rt.cfg, self.rt.model, self.rt.task
        if cfg.dp.enabled:
            from clients.dp import train_dp

            return train_dp(self.rt, msg, cid, make_optimizer, self.keys)
        server_round = int(msg.content["config"]["server-round"])
        load_adapter_state(model, msg.content["arrays"].to_torch_state_dict(), keys=self.keys)
        ds = self.dataset(cid)
        seed = cfg.sim.seed
        torch.manual_seed(derive_seed(seed, server_round, cid, "dropout"))
        batches = train_batches(
            ds, cfg.train.batch_size, rng(seed, server_round, cid, "batches"), task.pad_token_id,
            steps=cfg.train.local_steps if cfg.train.local_epochs == 0 else 0, epochs=cfg.train.local_epochs,
        )
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, cfg.train)
        device = next(model.parameters()).device
        model.train()
        total, steps = 0.0, 0
        try:
            for batch in batches:
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                loss.backward()
                if cfg.train.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                total += float(loss.detach())
                steps += 1
        finally:
            model.eval()
        metrics = {"num-examples": len(ds), "train-loss": total / max(steps, 1), "train-steps": steps}
        upload = {k: v for k, v in adapter_state(model).items() if k in self.keys}
        return RecordDict({"arrays": ArrayRecord(upload), "metrics": MetricRecord(metrics)})

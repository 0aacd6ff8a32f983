"""pFedPara clients: the personal LoHa factor pair lives in the client state store and never travels."""

from __future__ import annotations

import math

import torch
from flwr.app import Message, MetricRecord, RecordDict

from clients.base import ClientRuntime
from clients.first_order import FirstOrderTrainer
from clients.registry import register_trainer
from fedpeft.adapters import adapter_state, load_adapter_state
from fedpeft.evaluation import local_score
from fedpeft.seeding import torch_generator
from fedpeft.methods.pfedpara_wire import GLOBAL_LOCAL, LOCAL_SET, LOCAL_TEST, PERSONAL, PFEDPARA, is_local


@register_trainer(PFEDPARA)
class PFedParaTrainer(FirstOrderTrainer):
    """Train global + personal factors on the local train split; upload only the global ones."""

    def __init__(self, rt: ClientRuntime, method: type | None = None) -> None:
        super().__init__(rt, method)
        state = adapter_state(rt.model)
        self.local_shapes = {k: tuple(v.shape) for k, v in state.items() if is_local(k)}
        self.local_dtypes = {k: v.dtype for k, v in state.items() if is_local(k)}
        self.options = self.method.Options.model_validate(rt.cfg.method.options())

    def split(self, cid: int):
        """(train, local test) examples of client `cid`."""
        return self.rt.task.local_split(cid, self.options.local_test_fraction, self.rt.cfg.sim.seed)

    def dataset(self, cid: int):
        """Only the local train split is trained on."""
        return self.split(cid)[0]

    def initial_local(self, cid: int) -> dict[str, torch.Tensor]:
        """The personal pair a client starts from: peft's LoHa init (w2_a Kaiming, w2_b zero), seeded per client."""
        gen = torch_generator(self.rt.cfg.sim.seed, cid, "pfedpara-local-init")
        out = {}
        for key, shape in self.local_shapes.items():
            t = torch.zeros(shape, dtype=self.local_dtypes[key])
            if "hada_w2_a" in key:
                torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
            out[key] = t
        return out

    def train(self, msg: Message, cid: int) -> RecordDict:
        """Evaluate the global model locally, train with the stored personal pair, evaluate and store it."""
        cfg, model, task = self.rt.cfg, self.rt.model, self.rt.task
        store = self.store(msg)
        _, test = self.split(cid)
        initial = self.initial_local(cid)
        glob = msg.content["arrays"].to_torch_state_dict()
        everything = self.keys | set(initial)
        # peft loads a classifier head only together with the other tensors: load full sets.
        load_adapter_state(model, {**glob, **initial}, keys=everything)

        def evaluate_local() -> float:
            return local_score(model, test, cfg, task)

        global_acc = evaluate_local() if len(test) else 0.0
        saved = store.load_arrays(cid, LOCAL_SET)
        if saved:
            load_adapter_state(model, {**glob, **{k: torch.from_numpy(v) for k, v in saved.items()}}, keys=everything)
        reply = super().train(msg, cid)  # reloads the same global pair; the personal pair stays loaded
        personal_acc = evaluate_local() if len(test) else 0.0
        store.save_arrays(cid, LOCAL_SET, {k: v.numpy() for k, v in adapter_state(model).items() if is_local(k)})
        metrics = dict(reply["metrics"])
        metrics.update({PERSONAL: personal_acc, GLOBAL_LOCAL: global_acc, LOCAL_TEST: len(test)})
        return RecordDict({"arrays": reply["arrays"], "metrics": MetricRecord(metrics)})

"""Personal-split clients (pFedPara, FedSA-LoRA): the tensors the method does not exchange stay on the client.

The personal tensors are the adapter keys the method's `exchanged(key)` is False for. They live in
the client state store between rounds and never travel; a client that has none yet starts from
peft's initialization of them, drawn per client.
"""

from __future__ import annotations

import math

import torch
from flwr.app import Message, MetricRecord, RecordDict

from clients.base import ClientRuntime
from clients.first_order import FirstOrderTrainer
from clients.registry import register_trainer
from fedpeft.adapters import adapter_state, load_adapter_state
from fedpeft.evaluation import local_score
from fedpeft.methods.personal_wire import GLOBAL_LOCAL, LOCAL_TEST, PERSONAL, PERSONAL_SPLIT, local_set, peft_init
from fedpeft.records import ARRAYS
from fedpeft.seeding import torch_generator


@register_trainer(PERSONAL_SPLIT)
class PersonalTrainer(FirstOrderTrainer):
    """Train shared + personal tensors on the local train split; upload only the shared ones."""

    def __init__(self, rt: ClientRuntime, method: type | None = None) -> None:
        super().__init__(rt, method)
        state = adapter_state(rt.model)
        # Adapter-state order: the per-client draws below depend on it (pFedPara's numbers stay as they were).
        self.local_shapes = {k: tuple(v.shape) for k, v in state.items() if k not in self.keys}
        self.local_dtypes = {k: v.dtype for k, v in state.items() if k not in self.keys}
        self.local_set = local_set(self.method.method_name)
        self.options = self.method.Options.model_validate(rt.cfg.method.options())

    def split(self, cid: int):
        """(train, local test) examples of client `cid`."""
        return self.rt.task.local_split(cid, self.options.local_test_fraction, self.rt.cfg.sim.seed)

    def dataset(self, cid: int):
        """Only the local train split is trained on."""
        return self.split(cid)[0]

    def initial_local(self, cid: int) -> dict[str, torch.Tensor]:
        """The personal tensors a new client starts from: peft's init (zero or Kaiming-uniform), seeded per client."""
        gen = torch_generator(self.rt.cfg.sim.seed, cid, f"{self.local_set}-init")
        out = {}
        for key, shape in self.local_shapes.items():
            t = torch.zeros(shape, dtype=self.local_dtypes[key])
            init = peft_init(key)
            if init == "normal":
                torch.nn.init.normal_(t, generator=gen)
            elif init == "kaiming" and t.dim() >= 2:  # nn.Linear's init, as peft's (a vector has no fan-in: zero)
                torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
            out[key] = t
        return out

    def train(self, msg: Message, cid: int) -> RecordDict:
        """Evaluate the global model locally, train with the stored personal tensors, evaluate and store them."""
        cfg, model, task = self.rt.cfg, self.rt.model, self.rt.task
        store = self.store(msg)
        _, test = self.split(cid)
        initial = self.initial_local(cid)
        glob = msg.content[ARRAYS].to_torch_state_dict()
        everything = self.keys | set(initial)
        # peft loads a classifier head only together with the other tensors: load full sets.
        load_adapter_state(model, {**glob, **initial}, keys=everything)

        def evaluate_local() -> float:
            return local_score(model, test, cfg, task)

        global_score = evaluate_local() if len(test) else 0.0
        saved = store.load_arrays(cid, self.local_set)
        if saved:
            load_adapter_state(model, {**glob, **{k: torch.from_numpy(v) for k, v in saved.items()}}, keys=everything)
        reply = super().train(msg, cid)  # reloads the same shared tensors; the personal ones stay loaded
        personal_score = evaluate_local() if len(test) else 0.0
        store.save_arrays(cid, self.local_set,
                          {k: v.numpy() for k, v in adapter_state(model).items() if k not in self.keys})
        metrics = dict(reply["metrics"])
        metrics.update({PERSONAL: personal_score, GLOBAL_LOCAL: global_score, LOCAL_TEST: len(test)})
        return RecordDict({ARRAYS: reply[ARRAYS], "metrics": MetricRecord(metrics)})

"""What every client trainer is: the per-process runtime it trains in, and the interface the ClientApp uses."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from flwr.app import Message, RecordDict

from fedpeft.adapters import adapter_parameters, adapter_state
from fedpeft.config import Config
from fedpeft.data import PreparedTask
from fedpeft.methods.contract import method_spec
from fedpeft.records import SERVER_ROUND
from fedpeft.state import ClientStateStore, store_for

if TYPE_CHECKING:
    from peft import PeftModel


@dataclass
class ClientRuntime:
    """Per-process state shared by every client this worker runs: config, tokenized task, the one base model.

    `simulated`: whether this runs under `fedpeft simulate`; with dp.noise_source = "auto" DP noise
    is then seeded (reproducible), else drawn from OS entropy. The ClientApp's runtime always sets
    it from the run config (`clients.app.runtime`); the default serves runtimes built by hand for
    tests and benchmarks, which are simulations and stay reproducible.
    """

    cfg: Config
    task: PreparedTask
    model: "PeftModel"
    run_dir: str | None = None
    simulated: bool = True


class Trainer(ABC):
    """The client half of a method: turns a train message into a reply, on the worker's one model.

    The ClientApp and the codec wrapper (`clients.codec`) rely on exactly this: `keys` (the adapter
    tensors that travel down; `uploads`, those of them a reply carries back) and `train`.
    """

    def __init__(self, rt: ClientRuntime, method: type | None = None) -> None:
        self.rt = rt
        self.method = method or method_spec(rt.cfg.method.name).strategy
        self.method.prepare_model(rt.model)
        self.keys: frozenset[str] = frozenset(k for k in adapter_state(rt.model) if self.method.exchanged(k))
        self.uploads: frozenset[str] = frozenset(k for k in self.keys if self.method.uploaded(k))

    @cached_property
    def exchanged_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The worker model's parameter behind each exchanged adapter key (mapped once per process)."""
        return adapter_parameters(self.rt.model, self.keys)

    def store(self, msg: Message) -> ClientStateStore:
        """The client state store of this message's run, versioning what it writes by the message's round."""
        config = msg.content["config"] if "config" in msg.content.config_records else {}
        server_round = int(config[SERVER_ROUND]) if SERVER_ROUND in config else None
        return store_for(self.rt.run_dir, msg.metadata.run_id, server_round)

    @abstractmethod
    def train(self, msg: Message, cid: int) -> RecordDict:
        """Train client `cid` from what `msg` carries; the reply's content (upload + one MetricRecord)."""

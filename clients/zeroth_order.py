"""Zeroth-order local training for FedKSeed: two forward passes per step, no backward, no optimizer state.

A client rebuilds the global model of round t-1 by replaying every round's aggregate. It holds the
history it has reached in its own state store (`fedkseed-history`, beside its other state, on its
own machine when deployed), and a train message carries the rounds after the last one it
confirmed (`fedpeft.methods.fedkseed_wire`). Together they cover rounds 1..t-1; when they do not (its
state was lost or rolled back), the client trains nothing and answers how far its history reaches,
and the server sends it the history from there next time. Nothing is ever read from the server's
disk.

A worker process keeps one model and brings it forward round by round, whichever client it runs:
that is the simulation's shortcut (a deployed node's process starts from the base model each time
and replays the whole history). What a client can do is decided by its own store and the message
alone, never by what the worker happens to hold, so simulation and deployment send, charge and
refuse exactly the same.
"""

from __future__ import annotations

import time
from functools import partial
from logging import WARNING

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore import log

from clients.base import ClientRuntime, Trainer
from fedpeft.faults.attacks import label_flipped
from clients.registry import register_trainer
from clients.rows import FlippedLabels
from fedpeft.causal_lm import batch_loss
from fedpeft.data.prepared import train_batches
from fedpeft.precision import compute
from fedpeft.records import NUM_EXAMPLES, SERVER_ROUND, TRAIN_LOSS, TRAIN_SECONDS
from fedpeft.seeding import rng
from fedpeft.state import ClientStateStore
from fedpeft.methods.zo import ZOStepper, pack_scalars, pro_probabilities, replay, seed_pool, tuned_parameters
from fedpeft.methods.fedkseed_wire import (
    FROM_ROUND, HISTORY, HOLDS_ROUND, SCALARS, SCALARS_RECORD, ZEROTH_ORDER, Round, unpack_history,
)

HELD = "fedkseed-history"  # the client state tensor set holding the history a client has reached


def history_arrays(history: list[Round]) -> dict[str, np.ndarray]:
    """Rounds 1..R as three flat arrays (entries per round, seed indices, scalars) for the state store."""
    counts = np.array([idx.size for idx, _ in history], dtype=np.int64)
    idx = np.concatenate([i for i, _ in history]).astype(np.int64) if history else np.zeros(0, np.int64)
    val = np.concatenate([v for _, v in history]).astype(np.float32) if history else np.zeros(0, np.float32)
    return {"counts": counts, "idx": idx, "val": val}


def history_from_arrays(arrays: dict[str, np.ndarray]) -> list[Round]:
    """Inverse of `history_arrays` ([] for a client with no saved history)."""
    if not arrays:
        return []
    ends = np.cumsum(arrays["counts"])
    starts = ends - arrays["counts"]
    idx, val = arrays["idx"].astype(np.int64), arrays["val"].astype(np.float32)
    return [(idx[a:b], val[a:b]) for a, b in zip(starts.tolist(), ends.tolist())]


def catch_up(held: list[Round], from_round: int, sent: list[Round], server_round: int) -> list[Round] | None:
    """Rounds 1..server_round-1 from the client's own history and the message's, or None if they leave a gap."""
    if len(sent) != server_round - from_round:
        raise ValueError(f"the message's history covers {len(sent)} rounds, expected rounds {from_round}.."
                         f"{server_round - 1}")
    if len(held) < from_round - 1:
        return None
    return held[: from_round - 1] + sent  # where both have a round, the server's copy wins


@register_trainer(ZEROTH_ORDER)
class ZerothOrderTrainer(Trainer):
    """Rebuilds the global model from the client's history plus the message's, then runs local ZO steps from it."""

    def __init__(self, rt: ClientRuntime, method: type | None = None) -> None:
        super().__init__(rt, method)
        self.opts = self.method.effective_options(rt.cfg)
        self.k = self.opts.num_seeds
        self.pool = seed_pool(rt.cfg.sim.seed, self.k)
        self.params = tuned_parameters(rt.model, self.opts.scope)
        self.snapshot = [torch.empty_like(p) for p in self.params]  # allocated once per worker
        self.directions = ZOStepper.new_buffer(self.params)  # z of the current step, one value per tuned weight
        self.applied = 0  # the worker's model holds the aggregates of rounds 1..applied
        self.seed_history: list[list[float]] = [[0.0] for _ in range(self.k)]  # FedKSeed-Pro statistics

    @property
    def round(self) -> int:
        """The last round whose aggregate the worker's model holds."""
        return self.applied

    def _apply(self, idx: np.ndarray, val: np.ndarray) -> None:
        replay(self.params, self.pool, zip(idx.tolist(), val.tolist()), self.rt.cfg.train.lr, self.opts.direction)
        for i, g in zip(idx.tolist(), val.tolist()):
            self.seed_history[i].append(g)
        self.applied += 1

    def sync(self, history: list[Round]) -> None:
        """Bring the worker's model to the global model after the last round of `history` (rounds 1..R)."""
        if self.applied > len(history):
            raise RuntimeError(f"this worker's model already holds round {self.applied}, past round {len(history)} "
                               "that this message's client needs; replay cannot be undone")
        for r in range(self.applied, len(history)):
            self._apply(*history[r])

    def held(self, store: ClientStateStore, cid: int) -> list[Round]:
        """The history client `cid` holds in its own state store (rounds 1..R)."""
        return history_from_arrays(store.load_arrays(cid, HELD))

    def probabilities(self) -> np.ndarray | None:
        """Seed sampling probabilities: None for uniform, FedKSeed-Pro's from the replayed history."""
        return pro_probabilities(self.seed_history, self.opts.clip) if self.opts.pro else None

    def train(self, msg: Message, cid: int) -> RecordDict:
        """Catch up, take local ZO steps, restore the global model, reply with per-seed scalars (or a refusal)."""
        t0 = time.perf_counter()  # client compute includes replaying the rounds it missed
        cfg, model, task = self.rt.cfg, self.rt.model, self.rt.task
        c = msg.content["config"]
        server_round, from_round = int(c[SERVER_ROUND]), int(c[FROM_ROUND])
        store = self.store(msg)
        held = self.held(store, cid)
        history = catch_up(held, from_round, unpack_history(c[HISTORY], self.k), server_round)
        if history is None:
            log(WARNING, "client %d holds the FedKSeed history up to round %d, the round %d message starts at round %d: "
                "training nothing, asking for the history from round %d", cid, len(held), server_round, from_round,
                len(held) + 1)
            return RecordDict({SCALARS_RECORD: ConfigRecord({HOLDS_ROUND: len(held)}),
                               "metrics": MetricRecord({TRAIN_SECONDS: time.perf_counter() - t0})})
        self.sync(history)
        store.save_arrays(cid, HELD, history_arrays(history))  # before training: true even if training fails
        for p, s in zip(self.params, self.snapshot):
            s.copy_(p)
        ds = task.client_dataset(cid)
        if label_flipped(msg):  # a Byzantine client of `faults.attack = "label_flip"`
            ds = FlippedLabels(ds, task.num_labels)
        picks = rng(cfg.sim.seed, server_round, cid, "zo-seeds")
        p = self.probabilities()
        acc = np.zeros(self.k, dtype=np.float64)
        eps, lr = self.opts.eps, cfg.train.lr
        device = next(model.parameters()).device
        model.eval()  # no dropout: both passes of a step must see the same function
        losses = []
        batches = train_batches(
            ds, cfg.train.batch_size, rng(cfg.sim.seed, server_round, cid, "batches"), task.pad_token_id,
            steps=cfg.train.local_steps if cfg.train.local_epochs == 0 else 0, epochs=cfg.train.local_epochs,
        )
        # Each step: +eps z, forward, -2 eps z, forward, +(eps - lr g) z (restore and step at once), z generated
        # once per step; the last add is deferred into the next step's first pass (`ZOStepper`).
        stepper = ZOStepper(self.params, self.opts.direction, buffer=self.directions)
        with torch.inference_mode(), compute(cfg.train.precision, device):
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                i = int(picks.choice(self.k, p=p))
                plus, minus, g = stepper.step(int(self.pool[i]), eps, lr, partial(batch_loss, model, batch))
                acc[i] += g
                losses.append((plus + minus) / 2)
        stepper.discard()  # the last step's update is not needed: the snapshot restores the global model
        for p_, s in zip(self.params, self.snapshot):
            p_.copy_(s)
        idx = np.flatnonzero(acc)
        metrics = {NUM_EXAMPLES: len(ds), TRAIN_LOSS: float(np.mean(losses)) if losses else 0.0, "zo-steps": len(losses),
                   TRAIN_SECONDS: time.perf_counter() - t0}
        return RecordDict({
            SCALARS_RECORD: ConfigRecord({SCALARS: pack_scalars(idx, acc[idx].astype(np.float32), self.k)}),
            "metrics": MetricRecord(metrics),
        })

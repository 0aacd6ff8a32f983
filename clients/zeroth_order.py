"""Zeroth-order local training for FedKSeed: two forward passes per step, no backward, no optimizer state.

A worker process keeps one model and brings it forward round by round by replaying the server's
per-round aggregates. The message carries exactly the rounds the client itself is missing (what a
deployed client would receive); rounds a simulation worker lacks beyond those (because it last ran
an earlier client) are read from the server's history file in the run directory, a simulation
shortcut that is not charged because a real client never needs it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from clients.faults import label_flipped
from clients.rows import FlippedLabels
from clients.base import ClientRuntime, Trainer
from clients.registry import register_trainer
from fedpeft.causal_lm import batch_loss
from fedpeft.data.prepared import train_batches
from fedpeft.records import NUM_EXAMPLES, SERVER_ROUND, TRAIN_LOSS, TRAIN_SECONDS
from fedpeft.seeding import rng
from fedpeft.zo import pack_scalars, perturb, pro_probabilities, replay, seed_pool, tuned_parameters
from strategies.fedkseed import HISTORY_FILE, SCALARS_RECORD, read_history_file, unpack_history


@register_trainer("zeroth_order")
class ZerothOrderTrainer(Trainer):
    """Replays the global history into the worker's model, then runs local ZO steps from it."""

    def __init__(self, rt: ClientRuntime, method: type | None = None) -> None:
        super().__init__(rt, method)
        self.opts = self.method.effective_options(rt.cfg)
        self.k = self.opts.num_seeds
        self.pool = seed_pool(rt.cfg.sim.seed, self.k)
        self.params = tuned_parameters(rt.model, self.opts.scope)
        self.snapshot = [torch.empty_like(p) for p in self.params]  # allocated once per worker
        self.round = 0  # the model holds the aggregates of rounds 1..round
        self.seed_history: list[list[float]] = [[0.0] for _ in range(self.k)]  # FedKSeed-Pro statistics
        self.run_dir = Path(rt.run_dir) if rt.run_dir else None

    def _apply(self, idx: np.ndarray, val: np.ndarray) -> None:
        replay(self.params, self.pool, zip(idx.tolist(), val.tolist()), self.rt.cfg.train.lr, self.opts.direction)
        for i, g in zip(idx.tolist(), val.tolist()):
            self.seed_history[i].append(g)
        self.round += 1

    def sync(self, server_round: int, from_round: int, history: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Bring the worker's model to the global model of `server_round - 1`."""
        if len(history) != server_round - from_round:
            raise ValueError(f"history covers {len(history)} rounds, expected {server_round - from_round}")
        if self.round + 1 < from_round:
            if self.run_dir is None or not (self.run_dir / HISTORY_FILE).is_file():
                raise RuntimeError(f"worker is at round {self.round} but the message starts at round {from_round}")
            stored = read_history_file(self.run_dir / HISTORY_FILE, self.k)
            for r in range(self.round + 1, from_round):
                self._apply(*stored[r])
        for r in range(self.round + 1, server_round):
            self._apply(*history[r - from_round])

    def probabilities(self) -> np.ndarray | None:
        """Seed sampling probabilities: None for uniform, FedKSeed-Pro's from the replayed history."""
        return pro_probabilities(self.seed_history, self.opts.clip) if self.opts.pro else None

    def train(self, msg: Message, cid: int) -> RecordDict:
        """Sync, take local ZO steps, restore the global model, reply with per-seed scalars."""
        t0 = time.perf_counter()  # client compute includes replaying the rounds it missed
        cfg, model, task = self.rt.cfg, self.rt.model, self.rt.task
        c = msg.content["config"]
        server_round = int(c[SERVER_ROUND])
        self.sync(server_round, int(c["from-round"]), unpack_history(c["history"], self.k))
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
        with torch.inference_mode():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                i = int(picks.choice(self.k, p=p))
                seed = int(self.pool[i])
                perturb(self.params, seed, eps, self.opts.direction)
                plus = float(batch_loss(model, batch))
                perturb(self.params, seed, -2 * eps, self.opts.direction)
                minus = float(batch_loss(model, batch))
                g = (plus - minus) / (2 * eps)
                perturb(self.params, seed, eps - lr * g, self.opts.direction)  # restore and step at once
                acc[i] += g
                losses.append((plus + minus) / 2)
        for p_, s in zip(self.params, self.snapshot):
            p_.copy_(s)
        idx = np.flatnonzero(acc)
        metrics = {NUM_EXAMPLES: len(ds), TRAIN_LOSS: float(np.mean(losses)) if losses else 0.0, "zo-steps": len(losses),
                   TRAIN_SECONDS: time.perf_counter() - t0}
        return RecordDict({
            SCALARS_RECORD: ConfigRecord({"scalars": pack_scalars(idx, acc[idx].astype(np.float32), self.k)}),
            "metrics": MetricRecord(metrics),
        })

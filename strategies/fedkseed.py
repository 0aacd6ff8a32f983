"""FedKSeed (Qin et al., 2024): zeroth-order federated tuning where only seeds and scalars travel.

Clients take ZO steps along directions regenerated from a pool of K shared seeds and upload one
accumulated scalar per seed they used. The server averages the scalars per seed (weighted by
examples) and applies theta -= lr * sum_s g_s * z_s to its model. A client reaches the current
global model by replaying the per-round aggregates it has not yet applied, so the download is only
the history since the last round that client confirmed (`fedpeft.methods.fedkseed_wire`): a round is
confirmed by an accepted reply, never by a message sent, so a client that missed a round (crashed,
timed out, reply lost or rejected, round failed) is sent that round again. A client whose local
history was lost says so (`holds-round`) and is sent the history from there. FedKSeed-Pro samples
seeds non-uniformly from the history; clients compute those probabilities from the history they
replay, so they never travel.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field

from fedpeft.records import NUM_EXAMPLES, SERVER_ROUND, TRAIN_LOSS, reply_metrics
from fedpeft.methods.zo import DIRECTIONS, PackError, replay, seed_pool, tuned_parameters, unpack_scalars
from strategies.base import AdapterStrategy
from fedpeft.methods.fedkseed_wire import (
    FROM_ROUND, HISTORY, HOLDS_ROUND, SCALAR_UPLOADS, SCALARS, SCALARS_RECORD, ZEROTH_ORDER, held_round, pack_history,
)
from strategies.registry import Capabilities, register
from strategies.strategy_utils import check_metrics

HISTORY_FILE = "fedkseed-history.jsonl"  # every round's aggregate, for analysis; no client reads it


class FedKSeedOptions(BaseModel):
    """Recipe keys of `[method]` for fedkseed."""

    model_config = ConfigDict(extra="forbid")
    num_seeds: int = Field(4096, gt=0, le=1 << 31, description="K: size of the shared seed pool")
    eps: float = Field(1e-3, gt=0.0, description="perturbation scale of the two-point estimate")
    scope: Literal["adapter", "full"] = Field("adapter", description="ZO over adapter tensors, or every weight")
    direction: Literal[DIRECTIONS] = "gaussian"  # type: ignore[valid-type]
    pro: bool = Field(False, description="FedKSeed-Pro: sample seeds by their history importance")
    clip: float = Field(1.0, gt=0.0, description="FedKSeed-Pro: clip |g| before averaging")


def read_history_file(path: Path, k: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per-round aggregates the server wrote to its run directory."""
    out = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out[int(row["round"])] = (np.asarray(row["idx"], dtype=np.int64), np.asarray(row["val"], dtype=np.float32))
    return out


ZO_CAPABILITIES = Capabilities(
    sample_dp="its clients take zeroth-order steps, while DP-SGD needs per-sample gradients",
    user_dp="its uploads are seeds and scalars, which Flower's DP wrappers cannot clip",
    codecs=(),
    codecs_why="its uploads are already seeds and scalars",
    weighted_mean="a per-seed mean of scalars applied by replay",
    uploads=SCALAR_UPLOADS,
    secagg="its uploads are seeds with one scalar each, which the server replays per seed, not fixed-shape dense "
           "updates it could take a sum of",
)


@register("fedkseed", trainer=ZEROTH_ORDER, options=FedKSeedOptions, capabilities=ZO_CAPABILITIES)
class FedKSeed(AdapterStrategy):
    """Seeds-and-scalars federated ZO tuning; the server's model is the global model."""

    @classmethod
    def effective_options(cls, cfg) -> FedKSeedOptions:
        """The options clients and server use for this run."""
        return cls.Options.model_validate(cfg.method.options())

    def __init__(self, cfg, directory, model, workdir: Path | None = None) -> None:
        super().__init__(cfg, directory, model, workdir)
        self.options = o = self.effective_options(cfg)
        self.k = o.num_seeds
        self.pool = seed_pool(cfg.sim.seed, self.k)
        self.params = tuned_parameters(model, o.scope)
        self.history: list[tuple[np.ndarray, np.ndarray]] = []  # index r-1 holds round r's aggregate
        # client id -> the last round whose aggregate the client is known to hold: t-1 once its round-t reply
        # is accepted; lowered when the client says it holds less. Never raised by a message sent.
        self.confirmed: dict[int, int] = {}
        self.history_path = workdir / HISTORY_FILE if workdir else None

    def initial_arrays(self) -> ArrayRecord:
        """No tensors travel: the initial model is rebuilt from the shared seed on every client."""
        return ArrayRecord()

    def load_global(self, model, arrays: ArrayRecord) -> None:
        """Nothing to load: aggregation already updated the server's model in place."""

    def export(self, model, rundir) -> None:
        """Save the adapter; with scope 'full' also every tuned weight (`full_model.safetensors`)."""
        super().export(model, rundir)
        if self.options.scope == "full":
            from safetensors.torch import save_file

            named = sorted(model.named_parameters(), key=lambda kv: kv[0])
            save_file({n: p.detach().cpu().contiguous() for n, p in named}, str(rundir.path / "full_model.safetensors"))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        """Send each sampled client the aggregates of every round after the last one it confirmed."""
        nodes = self.sample(server_round, grid)
        self.sent = dict.fromkeys(nodes, ArrayRecord())  # what sim.min_replies counts as sampled
        msgs = []
        for node in nodes:
            last = self.confirmed.get(self.directory.client_of(node), 0)
            cfg = ConfigRecord({
                SERVER_ROUND: server_round,
                FROM_ROUND: last + 1,
                HISTORY: pack_history(self.history[last : server_round - 1], self.k),
            })
            msgs.append(Message(RecordDict({"config": cfg}), dst_node_id=node, message_type=MessageType.TRAIN))
        return msgs

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every round's aggregate (the history that defines the global model) and the round each client confirmed."""
        out = {"history-rounds": np.asarray(len(self.history))}
        for r, (idx, val) in enumerate(self.history, start=1):
            out[f"history/{r}/idx"], out[f"history/{r}/val"] = idx, val
        clients = sorted(self.confirmed)
        out["confirmed-clients"] = np.asarray(clients, dtype=np.int64)
        out["confirmed-rounds"] = np.asarray([self.confirmed[c] for c in clients], dtype=np.int64)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Replay the saved history onto the freshly built model, in round order, and rewrite the history file."""
        self.history = []
        for r in range(1, int(state["history-rounds"]) + 1):
            idx = np.asarray(state[f"history/{r}/idx"], dtype=np.int64)
            val = np.asarray(state[f"history/{r}/val"], dtype=np.float32)
            replay(self.params, self.pool, zip(idx.tolist(), val.tolist()), self.cfg.train.lr, self.options.direction)
            self.history.append((idx, val))
        # A checkpoint without these (written before rounds were confirmed by replies): every client is sent
        # the whole history once.
        clients, rounds = state.get("confirmed-clients", ()), state.get("confirmed-rounds", ())
        self.confirmed = {int(c): int(r) for c, r in zip(np.asarray(clients).tolist(), np.asarray(rounds).tolist())}
        if self.history_path is not None:
            with self.history_path.open("w") as f:
                for r, (idx, val) in enumerate(self.history, start=1):
                    f.write(json.dumps({"round": r, "idx": idx.tolist(), "val": val.tolist()}) + "\n")

    def check_reply(self, content: RecordDict, client: int = -1) -> str | None:
        """Why a reply cannot be aggregated (a refusal, bad metrics, missing or malformed scalars), or None."""
        held = held_round(content)
        if held is not None:
            return (f"client cannot rebuild the global model: it holds the history up to round {held} only (its "
                    f"local state was lost or rolled back); it is sent the history from round {held + 1} next time")
        if SCALARS_RECORD in content.config_records and HOLDS_ROUND in content[SCALARS_RECORD]:
            return f"malformed '{HOLDS_ROUND}' in a refusal: {content[SCALARS_RECORD][HOLDS_ROUND]!r}"
        reason = check_metrics(content, self.example_limits.get(client))
        if reason:
            return reason
        if SCALARS_RECORD not in content.config_records or SCALARS not in content[SCALARS_RECORD]:
            return f"missing config record '{SCALARS_RECORD}' with '{SCALARS}'"
        try:
            unpack_scalars(content[SCALARS_RECORD][SCALARS], self.k)
        except PackError as err:
            return str(err)
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average scalars per seed over valid replies, apply them to the model, record the round.

        Each accepted reply confirms round `server_round - 1` for its client; a refusal lowers the
        client's confirmed round to what it holds. Nothing else moves a client's confirmed round.
        """
        replies = list(replies)
        for msg in replies:
            held = None if msg.has_error() else held_round(msg.content)
            client = self.directory.client_of(msg.metadata.src_node_id)
            if held is not None and held < self.confirmed.get(client, 0):
                self.confirmed[client] = held
        valid = self.accept(server_round, replies)
        for msg in valid:
            self.confirmed[self.directory.client_of(msg.metadata.src_node_id)] = server_round - 1
        total = np.zeros(self.k, dtype=np.float64)
        weight, loss = 0.0, 0.0
        for msg in valid:
            metrics = reply_metrics(msg.content)
            w = float(metrics[NUM_EXAMPLES])
            idx, val = unpack_scalars(msg.content[SCALARS_RECORD][SCALARS], self.k)
            np.add.at(total, idx, w * val.astype(np.float64))
            weight += w
            loss += w * float(metrics.get(TRAIN_LOSS, 0.0))
        if weight > 0:
            total /= weight
        idx = np.flatnonzero(total)
        val = total[idx].astype(np.float32)
        replay(self.params, self.pool, zip(idx.tolist(), val.tolist()), self.cfg.train.lr, self.options.direction)
        self.history.append((idx, val))
        if self.history_path is not None:
            with self.history_path.open("a") as f:
                f.write(json.dumps({"round": server_round, "idx": idx.tolist(), "val": val.tolist()}) + "\n")
        if not valid:
            return None, None
        return ArrayRecord(), MetricRecord({TRAIN_LOSS: loss / weight, NUM_EXAMPLES: weight, "seeds": int(idx.size)})


@register("fedkseed-pro", trainer=ZEROTH_ORDER, options=FedKSeedOptions, capabilities=ZO_CAPABILITIES)
class FedKSeedPro(FedKSeed):
    """FedKSeed with history-importance seed sampling (FedKSeed-Pro)."""

    @classmethod
    def effective_options(cls, cfg) -> FedKSeedOptions:
        """fedkseed's options with `pro` switched on."""
        return super().effective_options(cfg).model_copy(update={"pro": True})

"""Heterogeneous LoRA ranks: each client trains a LoRA of its tier's rank.

HetLoRA (Cho et al., 2024): zero-pad every client's factors to the largest rank, average them,
send each tier the first r rows/columns. FlexLoRA (Bai et al., 2024): average each client's full
update B·A, and send each tier the best rank-r factorization (truncated SVD) of that mean.

The global adapter is kept at the largest rank. For FlexLoRA it holds the SVD factors of the mean
update ordered by singular value, so the first r of them are exactly its best rank-r
factorization: both methods send a tier the rank-r slices of the global factors and differ only
in how replies are combined. Every client's LoRA has peft's scaling lora_alpha / r_max (a rank-r
LoRA inside the r_max-shaped model), so one cached model serves every tier.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace
from collections.abc import Iterable
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedpeft.config import AdapterConfig, Config, ConfigError
from fedpeft.methods.lowrank import HETERO_RANK, RANK_KEY, assign_ranks, pad_lora, truncate_lora, truncated_shapes
from strategies.base import AdapterStrategy
from strategies.fedavg import FedAvgAdapter, exact_lora
from strategies.registry import Capabilities, register
from strategies.strategy_utils import check_arrays, require_adapter



class HeteroRankOptions(BaseModel):
    """Recipe keys of `[method]` for hetlora and flexlora."""

    model_config = ConfigDict(extra="forbid")
    rank_tiers: dict[int, float] = Field(
        default_factory=lambda: {4: 0.3, 8: 0.5, 16: 0.2}, description="LoRA rank -> share of clients"
    )

    @field_validator("rank_tiers")
    @classmethod
    def _shares(cls, v: dict[int, float]) -> dict[int, float]:
        if not v:
            raise ValueError("needs at least one rank")
        if any(r <= 0 for r in v):
            raise ValueError(f"ranks must be positive, got {sorted(v)}")
        if any(s <= 0 for s in v.values()):
            raise ValueError("every share must be > 0")
        if abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"shares must add up to 1, got {sum(v.values()):.6g}")
        return dict(sorted(v.items()))


RANK_CAPABILITIES = Capabilities(
    sample_dp="DP noise would fill the zero-padded rows, so a client would no longer train its tier's rank",
    user_dp="its clients hold adapters of different ranks, while Flower's wrappers clip every update against "
            "the one global record",
    codecs=("up",),
    codecs_why="downloads differ per tier in shape, which a client cannot decode against its own template",
    secagg="its clients upload adapters of different ranks (shapes differ per tier), while a secure sum adds "
           "vectors of one shape",
)


class HeteroRankLoRA(FedAvgAdapter):
    """Per-tier rank-r slices down, zero-padded to the largest rank on arrival; FedAvg of the padded factors."""

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """Require LoRA (upload codecs with a mean merge only); set adapter.r to the largest tier rank."""
        name = cls.method_name
        require_adapter(name, cfg, "lora")
        if cfg.codecs.merge != "mean":
            # The merge rules stack updates of one shape; tiers send different ranks.
            raise ConfigError(f"method '{name}' combines per-tier ranks and needs codecs.merge = 'mean'")
        opts = cls.Options.model_validate(cfg.method.options())
        kwargs = cfg.adapter.peft_kwargs()
        kwargs["r"] = max(opts.rank_tiers)
        cfg.adapter = AdapterConfig(type=cfg.adapter.type, **kwargs)

    def __init__(self, cfg: Config, directory, model, workdir=None) -> None:
        super().__init__(cfg, directory, model, workdir)
        self.ranks = assign_ranks(cfg.sim.num_clients, self.options.rank_tiers, cfg.sim.seed)
        self.rank_of_node: dict[int, int] = {}

    def rank_of(self, client_id: int) -> int:
        """The LoRA rank of a client."""
        return self.ranks[client_id]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid
    ) -> Iterable[Message]:
        """Send each sampled client the rank-r slices of the global adapter, with r in its config."""
        nodes = self.sample(server_round, grid)
        state = {k: arrays[k].numpy() for k in arrays}
        by_rank: dict[int, ArrayRecord] = {}
        messages, self.sent, self.rank_of_node = [], {}, {}
        for node in nodes:
            rank = self.rank_of(self.directory.client_of(node))
            if rank not in by_rank:
                by_rank[rank] = ArrayRecord({k: Array(v) for k, v in truncate_lora(state, rank).items()})
            self.sent[node], self.rank_of_node[node] = by_rank[rank], rank
            record = RecordDict({"arrays": by_rank[rank], "config": ConfigRecord({"server-round": server_round,
                                                                                  RANK_KEY: rank})})
            messages.extend(self._construct_messages(record, [node], MessageType.TRAIN))
        return messages

    def decode(self, server_round: int, msg: Message, client: int) -> str | None:
        """Check a reply against its tier's shapes, then zero-pad it to the largest rank."""
        reason = super().decode(server_round, msg, client)
        node = msg.metadata.src_node_id
        if reason or "arrays" not in msg.content.array_records:
            return reason  # a missing record is reported by check_reply
        if node not in self.rank_of_node:
            return f"node {node} was not sent anything this round"
        rank = self.rank_of_node[node]
        shapes = truncated_shapes({k: s for k, (s, _) in self.template.items()}, rank)
        reason = check_arrays(msg.content["arrays"], {k: (shapes[k], d) for k, (_, d) in self.template.items()})
        if reason:
            return f"rank-{rank} reply: {reason}"
        arrays = msg.content["arrays"]
        padded = pad_lora({k: arrays[k].numpy() for k in arrays}, {k: s for k, (s, _) in self.template.items()})
        rest = {name: rec for name, rec in msg.content.items() if name != "arrays"}
        msg.content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in padded.items()}), **rest})
        return None

    def round_metrics(self, server_round: int, ledger) -> dict[str, Any]:
        """Bytes down/up and sampled clients per rank tier this round, from the ledger."""
        down, up = self._bytes_by_rank(ledger, server_round)
        clients = Counter(self.rank_of_node.values())
        return {"bytes_down_by_rank": down, "bytes_up_by_rank": up,
                "clients_by_rank": {str(r): clients[r] for r in sorted(clients)}}

    def run_metrics(self, ledger, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Per-tier totals over the run, bytes per upload message per tier, and every client's rank."""
        down, up = self._bytes_by_rank(ledger, None)
        uploads: Counter[int] = Counter()
        for r in ledger.rows:
            client = self.directory.client_of(r.node_id)
            if r.direction == "up" and r.round >= 1 and client >= 0 and r.record == "arrays":
                uploads[self.rank_of(client)] += 1
        return {
            "rank_tiers": {str(r): s for r, s in self.options.rank_tiers.items()},
            "bytes_down_by_rank": down,
            "bytes_up_by_rank": up,
            "upload_bytes_per_message_by_rank": {k: v / uploads[int(k)] for k, v in up.items() if uploads[int(k)]},
            "client_ranks": {str(c): r for c, r in enumerate(self.ranks)},
        }

    def _bytes_by_rank(self, ledger, server_round: int | None) -> tuple[dict[str, int], dict[str, int]]:
        totals: dict[str, dict[int, int]] = {"down": defaultdict(int), "up": defaultdict(int)}
        for r in ledger.rows:
            client = self.directory.client_of(r.node_id)
            if client < 0 or r.round < 1 or (server_round is not None and r.round != server_round):
                continue
            totals[r.direction][self.rank_of(client)] += r.bytes
        return tuple({str(k): v[k] for k in sorted(v)} for v in (totals["down"], totals["up"]))


@register("hetlora", trainer=HETERO_RANK, options=HeteroRankOptions, capabilities=RANK_CAPABILITIES)
class HetLoRA(HeteroRankLoRA):
    """Zero-pad to the largest rank, example-weighted mean of the factors, truncate per tier."""


@register("flexlora", trainer=HETERO_RANK, options=HeteroRankOptions,
          capabilities=replace(RANK_CAPABILITIES, weighted_mean="the truncated SVD of the weighted mean of B·A"))
class FlexLoRA(HeteroRankLoRA):
    """Example-weighted mean of every client's B·A, re-factorized by truncated SVD (best rank-r per tier)."""

    def combine(self, server_round: int, valid: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted mean of the padded replies, then each LoRA pair replaced by the SVD of mean(B·A)."""
        arrays, metrics = AdapterStrategy.combine(self, server_round, valid)
        return (exact_lora(arrays, valid) if arrays is not None else None), metrics

"""Byzantine-robust aggregation of adapter tensors: coordinate-wise median, trimmed mean, Krum, Multi-Krum, Bulyan.

FedMedian and the trimmed mean (Yin et al., 2018) reduce every coordinate across the replies,
unweighted, as Flower's FedMedian and FedTrimmedAvg do. Krum (Blanchard et al., 2017) keeps the
reply whose n − f − 2 nearest replies are closest to it; Multi-Krum averages the m best-scored
replies uniformly, as the paper does. Bulyan (El Mhamdi et al., 2018) selects θ = n − 2f replies by
Krum, applied again to what is left after each pick, then averages per coordinate the β = θ − 2f
selected values closest to their median. No rule reads the self-reported example counts: Flower's
MultiKrum weights its mean by them, which lets one selected attacker claiming 10⁹ examples
(the most a reply may claim where the server does not know the client's size) take the mean over.
None of these is the mean of the client tensors, so recipes with user-level DP or a
`codecs.merge` rule are refused (`weighted_mean`).
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.server.strategy.aggregate import aggregate_bulyan, aggregate_krum
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.supercore import log
from pydantic import BaseModel, ConfigDict, Field

from fedpeft.config import Config, ConfigError
from fedpeft.records import ARRAYS
from strategies.base import AdapterStrategy
from fedpeft.methods.contract import FIRST_ORDER
from strategies.registry import Capabilities, NoOptions, register
from strategies.strategy_utils import stacked

if TYPE_CHECKING:
    from peft import PeftModel

    from fedpeft.ledger import CommLedger
    from fedpeft.nodes import NodeDirectory


class TrimmedMeanOptions(BaseModel):
    """Recipe keys of `[method]` for trimmed-mean."""

    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.2, ge=0.0, lt=0.5, description="fraction of replies trimmed from each end, per coordinate")


class KrumOptions(BaseModel):
    """Recipe keys of `[method]` for krum."""

    model_config = ConfigDict(extra="forbid")
    f: int = Field(1, ge=0, description="number of Byzantine clients assumed among a round's replies")


class MultiKrumOptions(KrumOptions):
    """Recipe keys of `[method]` for multi-krum."""

    m: int | None = Field(None, ge=1, description="replies selected and averaged (default: replies − f)")


class BulyanOptions(KrumOptions):
    """Recipe keys of `[method]` for bulyan (`f`: needs sim.clients_per_round >= 4f + 3)."""


def _capabilities(aggregate: str) -> Capabilities:
    # Sample-level DP and codecs are client-side or decoded before `combine`: they keep working.
    return Capabilities(weighted_mean=aggregate, secagg=f"its aggregate is a {aggregate}, which needs every "
                        "client's own update, while secure aggregation reveals only their sum")


class RobustAggregator(AdapterStrategy):
    """Base of the robust rules: the global adapter is replaced by a robust statistic of the replies."""

    def combine(self, server_round: int, valid: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The robust aggregate of the replies' adapters; reply metrics averaged over every accepted reply."""
        arrays = self.aggregate(server_round, valid)
        # Metrics describe the clients' training this round, not the selection, so all replies count.
        return arrays, self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)

    def aggregate(self, server_round: int, valid: list[Message]) -> ArrayRecord:
        """The aggregate adapter of the accepted replies."""
        raise NotImplementedError

    def per_coordinate(self, valid: list[Message], reduce: Callable[[np.ndarray], np.ndarray]) -> ArrayRecord:
        """`reduce` over the client axis of every tensor's float64 stack, back in each tensor's own dtype."""
        return ArrayRecord({k: Array(np.ascontiguousarray(reduce(stacked(valid, k)), dtype=dtype))
                            for k, (_, dtype) in sorted(self.template.items())})


@register("fedmedian", trainer=FIRST_ORDER, options=NoOptions,
          capabilities=_capabilities("coordinate-wise median"))
class FedMedianAdapter(RobustAggregator):
    """Coordinate-wise median of the returned adapters (unweighted)."""

    def aggregate(self, server_round: int, valid: list[Message]) -> ArrayRecord:
        """np.median over clients, per coordinate: Flower's FedMedian formula (it has no standalone function)."""
        return self.per_coordinate(valid, lambda x: np.median(x, axis=0))


@register("trimmed-mean", trainer=FIRST_ORDER, options=TrimmedMeanOptions,
          capabilities=_capabilities("coordinate-wise trimmed mean"))
class TrimmedMeanAdapter(RobustAggregator):
    """Coordinate-wise mean after dropping the int(beta·n) smallest and largest values (Flower's FedTrimmedAvg)."""

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """Refuse a beta > 0 that trims nobody at sim.clients_per_round (beta < 0.5 always keeps one reply)."""
        beta, n = cls.Options.model_validate(cfg.method.options()).beta, cfg.sim.clients_per_round
        if beta > 0 and int(beta * n) == 0:
            raise ConfigError(
                f"method.beta = {beta} trims int({beta} * {n}) = 0 replies from each end with sim.clients_per_round "
                f"= {n}: the aggregate would be the plain unweighted mean (needs beta * sim.clients_per_round >= 1, "
                f"or beta = 0 for that mean)")

    def aggregate(self, server_round: int, valid: list[Message]) -> ArrayRecord:
        """Flower's `trim_mean` of every tensor's stack."""
        beta = self.options.beta
        if beta > 0 and int(beta * len(valid)) == 0:
            log(WARNING, "round %d: only %d replies, beta = %s trims none of them: plain unweighted mean",
                server_round, len(valid), beta)
        return self.per_coordinate(valid, lambda x: trim_mean(x, beta))


@register("krum", trainer=FIRST_ORDER, options=KrumOptions,
          capabilities=_capabilities("Krum selection (the one reply closest to its n - f - 2 nearest replies)"))
class KrumAdapter(RobustAggregator):
    """Krum: the reply with the smallest sum of squared distances to its n − f − 2 nearest replies."""

    def __init__(self, cfg: Config, directory: "NodeDirectory", model: "PeftModel",
                 workdir: Path | None = None) -> None:
        super().__init__(cfg, directory, model, workdir)
        self.selected: list[int] = []  # client ids chosen in the last aggregated round

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """Krum needs sim.clients_per_round > 2f + 2; Multi-Krum also m <= clients_per_round − f."""
        opts, n = cls.Options.model_validate(cfg.method.options()), cfg.sim.clients_per_round
        if n <= 2 * opts.f + 2:
            raise ConfigError(
                f"method '{cls.method_name}' with method.f = {opts.f} needs sim.clients_per_round > 2 * f + 2 = "
                f"{2 * opts.f + 2} (got {n}): lower method.f or raise sim.clients_per_round")
        m = opts.m if isinstance(opts, MultiKrumOptions) else None
        if m is not None and m > n - opts.f:
            raise ConfigError(
                f"method.m = {m} exceeds sim.clients_per_round - method.f = {n} - {opts.f} = {n - opts.f}: "
                f"Multi-Krum can only select replies it does not assume Byzantine")

    def wanted(self) -> int | None:
        """How many replies to select (None: all but f)."""
        return 1

    def plan(self, server_round: int, n: int) -> tuple[int, int]:
        """(f, m) for n replies: rejections may leave fewer than 2f + 3; then the largest f that fits."""
        f = self.options.f
        fits = max(0, (n - 3) // 2)  # largest f with n > 2f + 2 (0 below 3 replies; Flower scores >= 1 neighbour)
        if f > fits:
            log(WARNING, "round %d: %d replies are too few for f = %d (Krum needs n > 2f + 2): using f = %d",
                server_round, n, f, fits)
            f = fits
        wanted = self.wanted()
        m = n - f if wanted is None else min(wanted, n - f)
        if wanted is not None and m < wanted:
            log(WARNING, "round %d: %d replies with f = %d leave only %d to select (m = %d)",
                server_round, n, f, m, wanted)
        return f, m

    def aggregate(self, server_round: int, valid: list[Message]) -> ArrayRecord:
        """The selected replies' uniform mean (Krum: the selected reply's own tensors)."""
        f, m = self.plan(server_round, len(valid))
        # Flower's select_multikrum scores replies by squared distances computed as |x|² + |y|² − 2x·y in
        # the tensors' own dtype (float32): the global every client started from dominates |x|², and
        # the small differences between clients are lost to rounding. Distances are translation
        # invariant, so it is given float64 copies centred on the coordinate-wise median: same
        # scores, without the cancellation.
        keys = sorted(self.template)
        centred = {k: s - np.median(s, axis=0) for k, s in ((k, stacked(valid, k)) for k in keys)}
        records = [RecordDict({ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(centred[k][i])) for k in keys})})
                   for i in range(len(valid))]
        position = {id(r): i for i, r in enumerate(records)}
        chosen = [position[id(r)] for r in select_multikrum(records, num_malicious_nodes=f, num_nodes_to_select=m)]
        self.selected = [self.directory.client_of(valid[i].metadata.src_node_id) for i in chosen]
        log(INFO, "round %d: %s selected clients %s (f = %d)", server_round, self.method_name, self.selected, f)
        if len(chosen) == 1:
            return valid[chosen[0]].content[ARRAYS]
        # Unweighted, as in Blanchard et al.: the selection bounds each reply's distance from the
        # others, not the weight it claims, so a weight would hand the mean to a selected liar.
        return self.per_coordinate([valid[i] for i in chosen], lambda x: x.mean(axis=0))

    def round_metrics(self, server_round: int, ledger: "CommLedger") -> dict[str, Any]:
        """The client ids Krum selected this round."""
        out, self.selected = {"krum_selected": self.selected}, []
        return out


@register("multi-krum", trainer=FIRST_ORDER, options=MultiKrumOptions,
          capabilities=_capabilities("Multi-Krum selection (the mean of the m best-scored replies only)"))
class MultiKrumAdapter(KrumAdapter):
    """Multi-Krum: the uniform mean of the m replies with the best Krum scores."""

    def wanted(self) -> int | None:
        """method.m (None: all but f)."""
        return self.options.m


@register("bulyan", trainer=FIRST_ORDER, options=BulyanOptions,
          capabilities=_capabilities("Bulyan (a coordinate-wise trimmed mean of the replies Krum selects)"))
class BulyanAdapter(RobustAggregator):
    """Bulyan: θ = n − 2f replies by repeated Krum; per coordinate, the mean of the β = θ − 2f nearest the median."""

    def __init__(self, cfg: Config, directory: "NodeDirectory", model: "PeftModel",
                 workdir: Path | None = None) -> None:
        super().__init__(cfg, directory, model, workdir)
        self.selected: list[int] = []  # client ids Krum selected in the last aggregated round

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """Bulyan needs sim.clients_per_round >= 4f + 3 (Flower's `aggregate_bulyan` refuses fewer replies)."""
        f, n = cls.Options.model_validate(cfg.method.options()).f, cfg.sim.clients_per_round
        if n < 4 * f + 3:
            raise ConfigError(
                f"method 'bulyan' with method.f = {f} needs sim.clients_per_round >= 4 * f + 3 = {4 * f + 3} "
                f"(got {n}): Bulyan keeps theta = n - 2f replies by Krum and averages beta = theta - 2f of them per "
                f"coordinate; lower method.f or raise sim.clients_per_round")

    def plan(self, server_round: int, n: int) -> int:
        """f for n replies: rejections may leave fewer than 4f + 3; then the largest f that fits."""
        f, fits = self.options.f, max(0, (n - 3) // 4)
        if f > fits:
            log(WARNING, "round %d: %d replies are too few for f = %d (Bulyan needs n >= 4f + 3): using f = %d",
                server_round, n, f, fits)
        return min(f, fits)

    def aggregate(self, server_round: int, valid: list[Message]) -> ArrayRecord:
        """Flower's `aggregate_bulyan` with Krum as the selection rule, over float64 copies of the replies."""
        n, keys = len(valid), sorted(self.template)
        if n < 3:  # f = 0 then, so theta = beta = n: Bulyan is the plain mean, which Flower refuses below 3
            log(WARNING, "round %d: only %d replies, too few for Bulyan: their unweighted mean", server_round, n)
            self.selected = [self.directory.client_of(m.metadata.src_node_id) for m in valid]
            return self.per_coordinate(valid, lambda x: x.mean(axis=0))
        f = self.plan(server_round, n)
        stacks = {k: stacked(valid, k) for k in keys}
        # float64 copies: Flower takes Krum's distances, the median and the final mean in the arrays' own
        # dtype. The count is 1 for all: Bulyan, like Krum, never reads the self-reported example counts.
        results = [([stacks[k][i] for k in keys], 1) for i in range(n)]
        left = list(results)
        # aggregate_bulyan pops each reply Krum selects from the list it is given: the 2f left are the unselected.
        out = aggregate_bulyan(left, num_malicious=f, aggregation_rule=aggregate_krum, to_keep=0)
        dropped = {id(r) for r in left}
        self.selected = [self.directory.client_of(valid[i].metadata.src_node_id)
                         for i, r in enumerate(results) if id(r) not in dropped]
        log(INFO, "round %d: bulyan selected clients %s (f = %d)", server_round, self.selected, f)
        return ArrayRecord({k: Array(np.ascontiguousarray(out[j], dtype=self.template[k][1]))
                            for j, k in enumerate(keys)})

    def round_metrics(self, server_round: int, ledger: "CommLedger") -> dict[str, Any]:
        """The client ids Krum selected this round (theta of them)."""
        out, self.selected = {"bulyan_selected": self.selected}, []
        return out

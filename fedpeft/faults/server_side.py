"""The server's part of fault injection: lose the replies the plan drops, let the adversary rewrite Byzantine ones.

The ClientApp's mod (`clients.app.faults`) injects what happens on a client (crash, straggle,
malformed reply, flipped labels); the server draws the same plan, so it also knows which
failures were injected and marks them as such in the metrics.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from logging import INFO

from flwr.app import ArrayRecord, Message
from flwr.supercore import log

from fedpeft.config import Config
from fedpeft.faults.attacks import attack
from fedpeft.faults.plan import DROP, FaultPlan


class ServerFaults:
    """Applies the run's fault plan to the replies of each round, and counts what was injected."""

    def __init__(self, cfg: Config, client_of: Callable[[int], int]) -> None:
        self.cfg = cfg.faults
        self.seed = cfg.sim.seed
        self.client_of = client_of
        self.plan = FaultPlan(cfg.faults, cfg.sim.seed, cfg.sim.num_clients)
        if self.cfg.byzantine_fraction > 0:
            log(INFO, "Byzantine clients (%s): %s", self.cfg.attack, sorted(self.plan.byzantine))

    def injected(self, server_round: int, client: int) -> str | None:
        """The kind of fault injected into `client` this round, or None."""
        fault = self.plan.fault(server_round, client)
        return fault.kind if fault else None

    def on_replies(self, server_round: int, replies: list[Message], reference: Callable[[int], ArrayRecord]
                   ) -> tuple[list[Message], list[int]]:
        """The replies that reach the server (dropped ones removed, Byzantine ones rewritten); the dropped clients."""
        kept, dropped = [], []
        for m in replies:
            client = self.client_of(m.metadata.src_node_id)
            lost = client >= 0 and self.injected(server_round, client) == DROP
            (dropped if lost else kept).append(m)
        if self.cfg.byzantine_fraction > 0:
            attack(self.cfg, self.seed, server_round, kept, self.client_of, self.plan.byzantine, reference)
        return kept, [self.client_of(m.metadata.src_node_id) for m in dropped]

    def counts(self, server_round: int, sampled: list[int]) -> dict[str, int]:
        """How many of the round's sampled clients met each injected fault, and how many are Byzantine."""
        out = Counter(k for c in sampled if (k := self.injected(server_round, c)))
        byzantine = sum(1 for c in sampled if self.plan.is_byzantine(c))
        if byzantine:
            out["byzantine"] = byzantine
        return dict(sorted(out.items()))

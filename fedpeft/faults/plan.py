"""Which fault each sampled client meets in each round, drawn from (run seed, round, client).

The ClientApp (a mod) and the server draw from the same plan, so they agree on every injected
fault without exchanging anything, in simulation and in deployment alike, and a rerun with the
same seed meets exactly the same faults.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from fedpeft.config import FaultsConfig
from fedpeft.seeding import rng

CRASH, STRAGGLE, DROP, MALFORMED = "crash", "straggle", "drop", "malformed"
INJECTED = "injected"  # every injected failure's reason starts with this word


@dataclass(frozen=True)
class Fault:
    """One injected fault: its kind, and for a malformed reply how it is malformed."""

    kind: str
    detail: str = ""

    def reason(self) -> str:
        """How the server and the client describe it (always starting with "injected")."""
        return f"{INJECTED} {self.kind}" + (f" ({self.detail})" if self.detail else "")


class FaultPlan:
    """The faults of `cfg` for a run with `num_clients` clients and seed `seed`."""

    def __init__(self, cfg: FaultsConfig, seed: int, num_clients: int) -> None:
        self.cfg, self.seed, self.num_clients = cfg, seed, num_clients

    def fault(self, server_round: int, client: int) -> Fault | None:
        """The fault client `client` meets in `server_round` if it is sampled, or None."""
        c = self.cfg
        u = float(rng(self.seed, server_round, client, "fault").random())
        for kind, p in ((CRASH, c.crash), (STRAGGLE, c.straggle), (DROP, c.drop), (MALFORMED, c.malformed)):
            if u < p:
                return Fault(kind, c.malformed_kind if kind == MALFORMED else "")
            u -= p
        return None

    @cached_property
    def byzantine(self) -> frozenset[int]:
        """The fixed set of Byzantine clients (round(fraction x clients), seeded)."""
        n = round(self.cfg.byzantine_fraction * self.num_clients)
        picked = rng(self.seed, "byzantine-clients").choice(self.num_clients, size=n, replace=False)
        return frozenset(int(i) for i in picked)

    def is_byzantine(self, client: int) -> bool:
        """Whether `client` is one of the Byzantine clients."""
        return client in self.byzantine

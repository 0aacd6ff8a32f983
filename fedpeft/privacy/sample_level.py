"""Sample-level DP (DP-SGD on each client): δ, sample rate, steps and noise multiplier per client.

ε and solved noise multipliers come from `fedpeft.privacy.accounting` (Opacus's accountants).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedpeft.config import Config, ConfigError
from fedpeft.privacy.accounting import add_steps, epsilon, solve_noise

NOISE_SEEDED = "dp-noise-seeded"  # reply metric: 1 if the DP draws were seeded (reproducible), 0 if OS entropy


@dataclass(frozen=True)
class ClientPlan:
    """How one client runs DP-SGD in one round."""

    n: int
    sample_rate: float
    steps: int
    noise_multiplier: float
    delta: float


def resolve_delta(cfg: Config, sizes: list[int]) -> float:
    """dp.delta, or 1/(10 n_max) with n_max the largest client's example count (so δ < 1/n for all)."""
    if cfg.dp.delta is not None:
        return cfg.dp.delta
    return 1.0 / (10 * max(max(sizes, default=1), 1))


def sample_rate(cfg: Config, n: int) -> float:
    """Poisson sampling rate: one expected batch of train.batch_size examples (at most 1)."""
    return min(1.0, cfg.train.batch_size / max(n, 1))


def steps_per_round(cfg: Config, n: int) -> int:
    """Optimizer steps one client takes per round (local_steps, or epochs of expected batches)."""
    if cfg.train.local_epochs == 0:
        return cfg.train.local_steps
    return cfg.train.local_epochs * math.ceil(1.0 / sample_rate(cfg, n))


def max_participations(cfg: Config) -> int:
    """The most rounds any client can train in, under any client sampling: sim.rounds.

    dp.target_epsilon is a promise for every client, so σ is solved for the busiest one. The
    expected count, ⌈rounds × clients_per_round / num_clients⌉, held only on average: a client
    the sampler drew more often ended above the target. Whatever draws the clients (a seeded
    fixed-size draw, Poisson sampling), a client trains at most once a round, so sim.rounds holds
    for all of them without replaying the sampler.

    The price is more noise where clients train rarely. simulations/dp.toml (12 rounds, 10 of 100
    clients a round, 20 steps at batch 16, n = 44–110, target ε = 8, δ = 1/(10 n_max)): σ solved for
    2 participations was 0.81–1.41 over its clients (median 0.95), and the seeded draw put one client
    in 5 rounds, ε 13.1 (median 5.8 over the clients that trained); solved for 12 it is 1.39–3.05
    (median 1.75), and no client can pass ε = 8.
    """
    return max(1, cfg.sim.rounds)


def plan(cfg: Config, n: int, delta: float) -> ClientPlan:
    """The client's DP-SGD plan; the noise is dp.noise_multiplier or solved for dp.target_epsilon.

    The solved noise reaches dp.target_epsilon after `max_participations` rounds of local steps, so
    no client exceeds it however often it is sampled.
    """
    if delta >= 1.0 / max(n, 1):
        raise ConfigError(
            f"dp.delta = {delta:g} is >= 1/n for a client with n = {n} examples "
            f"(δ must be below 1/n = {1.0 / max(n, 1):g}; lower dp.delta or leave it unset)"
        )
    q, steps = sample_rate(cfg, n), steps_per_round(cfg, n)
    nm = cfg.dp.noise_multiplier
    if nm is None:
        nm = solve_noise(cfg.dp.target_epsilon, delta, q, steps * max_participations(cfg), cfg.dp.accountant,
                         "dp.target_epsilon", "raise dp.target_epsilon or reduce train.local_steps / sim.rounds")
    return ClientPlan(n=n, sample_rate=q, steps=steps, noise_multiplier=nm, delta=delta)


def check_task(cfg: Config, sizes: list[int]) -> None:
    """Fail before the run starts if δ or the target ε cannot be met by some client."""
    if not cfg.dp.enabled:
        return
    nonempty = [n for n in sizes if n > 0]
    if not nonempty:
        return
    delta = resolve_delta(cfg, nonempty)
    # The smallest client has the largest sample rate (hardest for a target ε); the
    # largest client is the first to violate δ < 1/n.
    for n in sorted({min(nonempty), max(nonempty)}, reverse=True):
        plan(cfg, n, delta)



def account_round(store, cid: int, server_round: int, plan: ClientPlan, steps: int, accountant: str) -> dict[str, Any]:
    """Add a round's DP-SGD steps to client `cid`'s history in `store`; the reply metrics with its ε.

    Every planned step is accounted, empty Poisson draws included: the sampled Gaussian mechanism
    ran whether or not the draw held any example.
    """
    state = store.load(cid)
    history = add_steps(state.get("history", []), plan.noise_multiplier, plan.sample_rate, steps)
    eps = epsilon(accountant, history, plan.delta)
    store.save(cid, {"history": history, "rounds": [*state.get("rounds", []), server_round], "epsilon": eps,
                     "delta": plan.delta, "accountant": accountant})
    return {"epsilon": eps, "delta": plan.delta, "noise-multiplier": plan.noise_multiplier,
            "sample-rate": plan.sample_rate, "dp-steps": sum(int(h[2]) for h in history)}

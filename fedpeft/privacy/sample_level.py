"""Sample-level DP (DP-SGD on each client): δ, sample rate, steps and noise multiplier per client.

ε and solved noise multipliers come from `fedpeft.privacy.accounting` (Opacus's accountants).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedpeft.config import Config, ConfigError
from fedpeft.privacy.accounting import add_steps, epsilon, solve_noise


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


def expected_participations(cfg: Config) -> int:
    """Rounds a client is expected to train in: rounds × clients_per_round / num_clients, rounded up."""
    return max(1, math.ceil(cfg.sim.rounds * cfg.sim.clients_per_round / cfg.sim.num_clients))


def plan(cfg: Config, n: int, delta: float) -> ClientPlan:
    """The client's DP-SGD plan; the noise is dp.noise_multiplier or solved for dp.target_epsilon."""
    if delta >= 1.0 / max(n, 1):
        raise ConfigError(
            f"dp.delta = {delta:g} is >= 1/n for a client with n = {n} examples "
            f"(δ must be below 1/n = {1.0 / max(n, 1):g}; lower dp.delta or leave it unset)"
        )
    q, steps = sample_rate(cfg, n), steps_per_round(cfg, n)
    nm = cfg.dp.noise_multiplier
    if nm is None:
        nm = solve_noise(cfg.dp.target_epsilon, delta, q, steps * expected_participations(cfg), cfg.dp.accountant,
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

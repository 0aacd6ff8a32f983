"""Privacy accounting for both DP levels: Opacus accountants over a step history, and the one noise solver.

A history is a list of [noise_multiplier, sample_rate, steps] entries, exactly Opacus's
`accountant.history`; every ε is Opacus's accountant evaluated on it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from fedpeft.config import ConfigError


def accountant_with(mechanism: str, history: list[Any]):
    """An Opacus accountant (`rdp` | `prv`) holding `history`."""
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=mechanism)
    acc.history = [tuple(h) for h in history]
    return acc


def add_steps(history: list[Any], noise_multiplier: float, q: float, steps: int) -> list[list[float]]:
    """History after `steps` more steps at (noise_multiplier, q), merged like Opacus's own `step`."""
    out = [list(h) for h in history]
    if out and out[-1][0] == noise_multiplier and out[-1][1] == q:
        out[-1][2] += steps
    elif steps > 0:
        out.append([noise_multiplier, q, steps])
    return out


def epsilon(mechanism: str, history: list[Any], delta: float) -> float:
    """ε at δ spent by `history`, from Opacus's accountant (0 before any step)."""
    if not history:
        return 0.0
    return float(accountant_with(mechanism, history).get_epsilon(delta=delta))


@lru_cache(maxsize=256)
def solve_noise(target_epsilon: float, delta: float, q: float, steps: int, accountant: str,
                key: str = "dp.target_epsilon", hint: str = "raise it") -> float:
    """The noise multiplier reaching (target_epsilon, delta) after `steps` at sampling rate q.

    `key` and `hint` name the recipe key and the remedy in the error when no noise can reach it.
    """
    from opacus.accountants.utils import get_noise_multiplier

    steps = max(int(steps), 1)
    try:
        nm = float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=q,
                                        steps=steps, accountant=accountant))
        # Opacus stops within its ε tolerance (0.01): a "solution" can still overshoot the target.
        reached = epsilon(accountant, [[nm, q, steps]], delta)
        if reached <= target_epsilon:
            return nm
        why = f"the closest noise multiplier, {nm:g}, gives ε = {reached:.3g}"
    except ValueError as err:
        why = str(err)
    raise ConfigError(
        f"{key} = {target_epsilon:g} cannot be reached with δ = {delta:g}, sampling rate {q:.4g} and {steps} "
        f"steps ({why}); {hint}"
    )

"""Where DP randomness comes from: seeded (reproducible simulation) or OS entropy (deployment).

Seeded noise derives from (sim.seed, round, client, purpose). That is the point of a simulation
(same seed, same run), but under `flwr run` or `fedpeft deploy` the seed sits in the server's run
config: whoever holds it could regenerate every noise draw and subtract it. There the noise comes
from the operating system's entropy pool, which no other party can reproduce.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

from fedpeft.config import Config
from fedpeft.seeding import derive_seed

SEEDED = "seeded"
OS = "os"


def noise_source(cfg: Config, simulated: bool) -> str:
    """`seeded` or `os`: dp.noise_source, where `auto` is seeded under `fedpeft simulate` and OS entropy elsewhere."""
    if cfg.dp.noise_source != "auto":
        return cfg.dp.noise_source
    return SEEDED if simulated else OS


def _seed(source: str, run_seed: int, parts: tuple[object, ...]) -> int:
    if source == SEEDED:
        return derive_seed(run_seed, *parts)
    return secrets.randbits(63)  # os.urandom: unknown to the server and to anyone holding the config


def torch_noise_generator(source: str, run_seed: int, *parts: object, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator for DP draws: seeded from (run seed, parts), or from OS entropy."""
    return torch.Generator(device=device).manual_seed(_seed(source, run_seed, parts))


def numpy_noise_rng(source: str, run_seed: int, *parts: object) -> np.random.Generator:
    """A numpy generator for DP draws: seeded from (run seed, parts), or from OS entropy."""
    return np.random.default_rng(_seed(source, run_seed, parts))

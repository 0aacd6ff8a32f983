"""Byzantine attacks on adapter uploads: what the Byzantine clients' replies become before the server sees them.

The Byzantine clients train honestly (or on flipped labels, `label_flip`: done by the ClientApp),
then an adversary rewrites their replies in transit, after the ledger charged them (a rewritten
dense reply has exactly the honest one's size). An update is the reply's tensors minus what its
node was sent:

- `sign_flip`: −s × update; `scale`: s × update (s = `faults.attack_scale`);
- `noise`: the update replaced by N(0, `noise_std`²) values;
- `alie` ("A little is enough", Baruch et al., NeurIPS 2019): every Byzantine update becomes
  μ − z·σ, the per-coordinate mean and standard deviation of this round's honest updates (all
  sampled clients' honestly trained updates: the omniscient, colluding form used to test robust
  aggregators), with z from the paper: s = ⌊n/2 + 1⌋ − f, z = Φ⁻¹((n − s)/n) for n sampled and
  f Byzantine clients, unless `faults.alie_z` is set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedpeft.config import FaultsConfig
from fedpeft.records import ARRAYS, CONFIG
from fedpeft.seeding import rng

REWRITING = ("sign_flip", "scale", "noise", "alie")  # attacks on the reply (label_flip acts on the data)
LABEL_FLIP_KEY = "fedpeft-label-flip"  # set in the config record a Byzantine label-flipping client trains from


def label_flipped(msg: Message) -> bool:
    """Whether this train message asks the client to train on flipped labels."""
    return bool(msg.content[CONFIG].get(LABEL_FLIP_KEY, False)) if CONFIG in msg.content.config_records else False


def alie_z(n: int, f: int) -> float:
    """The paper's z for n participants of which f are Byzantine (0 when it would be negative)."""
    s = math.floor(n / 2 + 1) - f
    q = (n - s) / n
    return max(0.0, NormalDist().inv_cdf(q)) if 0.0 < q < 1.0 else 0.0


def _update(msg: Message, ref: ArrayRecord) -> dict[str, np.ndarray]:
    arrays = msg.content[ARRAYS]
    # Only what the reply carries: a method may send tensors its clients do not send back (FedSVD's A).
    return {k: arrays[k].numpy().astype(np.float64) - ref[k].numpy().astype(np.float64) for k in ref if k in arrays}


def _write(msg: Message, ref: ArrayRecord, update: dict[str, np.ndarray]) -> None:
    arrays = msg.content[ARRAYS]
    msg.content[ARRAYS] = ArrayRecord({
        k: Array((ref[k].numpy().astype(np.float64) + u).astype(arrays[k].numpy().dtype)) for k, u in update.items()
    })


def attack(cfg: FaultsConfig, seed: int, server_round: int, replies: list[Message], client_of: Callable[[int], int],
           byzantine: frozenset[int], reference: Callable[[int], ArrayRecord]) -> list[Message]:
    """Rewrite, in place, the replies of `byzantine` clients; returns them (only well-formed dense ones)."""
    usable = [m for m in replies if not m.has_error() and ARRAYS in m.content.array_records]
    bad = [m for m in usable if client_of(m.metadata.src_node_id) in byzantine]
    if not bad or cfg.attack not in REWRITING:
        return []
    refs = {id(m): reference(m.metadata.src_node_id) for m in usable}
    if cfg.attack == "alie":
        honest = [_update(m, refs[id(m)]) for m in usable]
        if any(set(u) != set(honest[0]) for u in honest):
            return []
        z = cfg.alie_z if cfg.alie_z is not None else alie_z(len(usable), len(bad))
        target = {k: np.mean([u[k] for u in honest], axis=0) - z * np.std([u[k] for u in honest], axis=0)
                  for k in honest[0]}
        for m in bad:
            _write(m, refs[id(m)], target)
        return bad
    for m in bad:
        update = _update(m, refs[id(m)])
        if cfg.attack == "sign_flip":
            update = {k: -cfg.attack_scale * u for k, u in update.items()}
        elif cfg.attack == "scale":
            update = {k: cfg.attack_scale * u for k, u in update.items()}
        else:  # noise, drawn from (seed, round, client) so reruns see the same
            g = rng(seed, server_round, client_of(m.metadata.src_node_id), "noise-attack")
            update = {k: cfg.noise_std * g.standard_normal(u.shape) for k, u in update.items()}
        _write(m, refs[id(m)], update)
    return bad

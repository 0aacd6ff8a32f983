"""How decoded client updates combine into one global update: weighted mean, mean over senders, or peft merges."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from peft.utils import merge_utils

from fedpeft.seeding import derive_seed

# The peft merges that sum weighted updates use weights that add up to one (a weighted mean);
# TIES-style merges divide by the number of agreeing clients themselves, so their weights
# average one (the merge is then the mean over the clients that agree on the sign).
_SUMMING = {"task_arithmetic": merge_utils.task_arithmetic, "magnitude_prune": merge_utils.magnitude_prune,
            "dare_linear": merge_utils.dare_linear}
_DISJOINT = {"ties": merge_utils.ties, "dare_ties": merge_utils.dare_ties}


def merge_updates(
    method: str,
    updates: Sequence[dict[str, np.ndarray]],
    supports: Sequence[dict[str, np.ndarray | None]],
    weights: Sequence[float],
    density: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """One merged update per tensor from the clients' decoded updates, weighted by `weights` (example counts)."""
    w = np.asarray(weights, dtype=np.float64)
    out = {}
    for i, key in enumerate(sorted(updates[0])):
        stack = np.stack([u[key] for u in updates]).astype(np.float64)
        if method == "mean":
            out[key] = np.tensordot(w / w.sum(), stack, axes=1)
        elif method == "sparse-mean":
            out[key] = _sparse_mean(stack, [s[key] for s in supports], w)
        else:
            out[key] = _peft_merge(method, stack, w, density, derive_seed(seed, "merge", i))
        out[key] = out[key].astype(updates[0][key].dtype)
    return out


def _sparse_mean(stack: np.ndarray, supports: list[np.ndarray | None], w: np.ndarray) -> np.ndarray:
    # Each entry is the weighted mean over the clients that actually sent it, so a top-k entry
    # is not diluted by the clients whose payload left it out.
    flat = stack.reshape(len(stack), -1)
    sent = np.zeros_like(flat, dtype=bool)
    for row, idx in enumerate(supports):
        if idx is None:
            sent[row] = True
        else:
            sent[row, idx] = True
    weight = sent * w[:, None]
    total = weight.sum(axis=0)
    mean = (flat * weight).sum(axis=0) / np.where(total > 0, total, 1.0)
    return mean.reshape(stack.shape[1:])


def _peft_merge(method: str, stack: np.ndarray, w: np.ndarray, density: float, seed: int) -> np.ndarray:
    tensors = [torch.from_numpy(s) for s in stack]
    if method in _SUMMING:
        weights = torch.from_numpy(w / w.sum())
        fn = _SUMMING[method]
    else:
        weights = torch.from_numpy(w / w.mean())
        fn = _DISJOINT[method]
    kwargs = {} if method == "task_arithmetic" else {"density": density}
    # DARE's random drop draws from torch's global generator: seed it for a reproducible round.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(tensors, weights, **kwargs).numpy()

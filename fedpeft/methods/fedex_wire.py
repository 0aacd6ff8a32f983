"""FedEx-LoRA's message and base-weight folding, shared by its server half (`strategies.fedex_lora`) and client half.

Every train message carries the cumulative residual R in record RESIDUAL: one dense matrix per
LoRA layer, shaped like that layer's frozen base weight and keyed by the layer's module path (a
peft state-dict key up to `.lora_A`). Both halves put W0 + R into each such base weight, where W0
is the pretrained weight kept once per model: a worker's model is shared by every client (and run)
it serves, so R is never added in place and W0 is put back after each client's round.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from fedpeft.config import ConfigError
from fedpeft.methods.contract import TrainerKind

FEDEX = TrainerKind("fedex", "first-order steps on LoRA from base weights W0 + R, the cumulative residual sent down")
RESIDUAL = "fedex-residual"  # the record holding R (down only: clients upload A, B and the head as in FedAvg)
LORA_A = ".lora_A"

# model -> module path -> its pretrained base weight W0 (a copy, on the weight's device)
_PRETRAINED: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def layer_path(lora_a_key: str) -> str:
    """The module path of the LoRA layer whose A tensor has state-dict key `lora_a_key`."""
    return lora_a_key.rsplit(LORA_A, 1)[0]


def base_weight(model: torch.nn.Module, path: str) -> torch.nn.Parameter:
    """The frozen base weight of the LoRA layer at `path`."""
    return model.get_submodule(path).base_layer.weight


def _tied(model: torch.nn.Module, weight: torch.nn.Parameter) -> list[str]:
    """Names of the model's parameters that share `weight`'s storage (more than one: the weight is tied)."""
    ptr = weight.data_ptr()
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p.data_ptr() == ptr]


def keep_pretrained(model: torch.nn.Module, paths: Iterable[str]) -> dict[str, torch.Tensor]:
    """W0 of each layer in `paths`, copied the first time this model is seen (then reused); ConfigError if tied.

    A base weight tied to another layer (an LM head tied to the input embeddings) would carry R
    into that layer too, so the folded model would no longer be W0 + R + s·B·A.
    """
    kept = _PRETRAINED.setdefault(model, {})
    for path in paths:
        if path in kept:
            continue
        weight = base_weight(model, path)
        names = _tied(model, weight)
        if len(names) > 1:
            raise ConfigError(f"the residual R is folded into the base weight of '{path}', which the model ties to "
                              f"{names}: leave that layer out of adapter.target_modules")
        kept[path] = weight.detach().clone()
    return kept


def fold_residual(model: torch.nn.Module, residual: Mapping[str, np.ndarray]) -> None:
    """Set each listed layer's base weight to W0 + R (R in float32, as it travels; same op on server and client)."""
    kept = keep_pretrained(model, residual)
    with torch.no_grad():
        for path, r in residual.items():
            weight, w0 = base_weight(model, path), kept[path]
            if tuple(r.shape) != tuple(w0.shape):
                raise ValueError(f"residual of '{path}' has shape {tuple(r.shape)}, its base weight {tuple(w0.shape)}")
            folded = w0.float() + torch.from_numpy(np.asarray(r, dtype=np.float32)).to(w0.device)
            weight.copy_(folded.to(weight.dtype))


def restore_pretrained(model: torch.nn.Module) -> None:
    """Put W0 back into every base weight this model had a residual folded into."""
    with torch.no_grad():
        for path, w0 in _PRETRAINED.get(model, {}).items():
            base_weight(model, path).copy_(w0)

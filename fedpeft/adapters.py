"""peft adapter configs by name, and moving adapter tensors between models and Flower records."""

from __future__ import annotations

import dataclasses
import weakref
from typing import TYPE_CHECKING

import torch

from fedpeft.config import AdapterConfig, ConfigError

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel


def build_peft_config(adapter: AdapterConfig, task_type: str = "SEQ_CLS") -> "PeftConfig":
    """Build the peft config named by `adapter.type` (any peft method) with its keyword options."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    by_name = {str(k.value).lower(): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    cls = by_name.get(adapter.type.lower().replace("-", "_"))
    if cls is None:
        raise ConfigError(f"adapter.type '{adapter.type}' is not a peft method (known: {', '.join(sorted(by_name))})")
    kwargs = adapter.peft_kwargs()
    allowed = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key 'adapter.{unknown[0]}' for adapter.type = '{adapter.type}' "
            f"(allowed: {', '.join(sorted(allowed - {'peft_type', 'task_type'}))})"
        )
    kwargs.setdefault("task_type", task_type)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"adapter ({adapter.type}): {err}") from None


def adapter_state_dict(model: "PeftModel") -> dict[str, torch.Tensor]:
    """peft's state dict of the adapter, without the frozen base weights of targeted embedding layers.

    With `lm_head` (or an embedding) among target_modules, peft would by default also save that
    layer's whole frozen weight matrix; it never changes, so it neither travels nor is exported.
    """
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, save_embedding_layers=False)


_STATE_MAPS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _state_map(model: "PeftModel") -> dict[str, torch.Tensor] | None:
    """peft's adapter state-dict keys → the model's own tensors behind them, or None if any key is not one.

    Built once per model from `adapter_state_dict` (whose values share storage with the
    model's parameters) and reused while the model keeps the same parameters and active adapter:
    peft's call builds the whole model's state dict, which costs more than a small adapter's copy.
    """
    params = list(model.parameters())
    sig = (len(params), str(getattr(model, "active_adapter", "")))
    cached = _STATE_MAPS.get(model)
    if cached is not None and cached[0] == sig:
        return cached[1]
    by_ptr = {(p.data_ptr(), tuple(p.shape)): p for p in params}
    mapping: dict[str, torch.Tensor] | None = {}
    for key, value in adapter_state_dict(model).items():
        p = by_ptr.get((value.data_ptr(), tuple(value.shape)))
        if p is None or p.dtype != value.dtype:
            mapping = None
            break
        mapping[key] = p
    _STATE_MAPS[model] = (sig, mapping)
    return mapping


def adapter_state(model: "PeftModel") -> dict[str, torch.Tensor]:
    """The adapter's trainable tensors (peft's own state-dict view), detached on CPU."""
    mapping = _state_map(model)
    if mapping is not None:
        return {k: p.detach().cpu().clone() for k, p in mapping.items()}
    return {k: v.detach().cpu().clone() for k, v in adapter_state_dict(model).items()}


def load_adapter_state(model: "PeftModel", state: dict[str, torch.Tensor], keys: set[str] | None = None) -> None:
    """Load adapter tensors into `model`, failing if any expected key (all, or `keys`) is missing or extra."""
    mapping = _state_map(model)
    expected = (set(mapping) if mapping is not None else set(get_adapter_keys(model))) if keys is None else set(keys)
    got = set(state)
    if got != expected:
        missing, extra = sorted(expected - got)[:3], sorted(got - expected)[:3]
        raise ValueError(f"adapter keys do not match the model: missing {missing}, unexpected {extra}")
    if mapping is not None and got <= set(mapping):
        for k, v in state.items():
            if tuple(v.shape) != tuple(mapping[k].shape):
                raise ValueError(f"adapter tensor {k} has shape {tuple(v.shape)}, the model's is {tuple(mapping[k].shape)}")
        with torch.no_grad():
            for k, v in state.items():
                mapping[k].copy_(v)
        return
    from peft import set_peft_model_state_dict

    device = next(model.parameters()).device
    set_peft_model_state_dict(model, {k: v.to(device) for k, v in state.items()})


def get_adapter_keys(model: "PeftModel") -> list[str]:
    """Names of the adapter tensors exchanged for this model."""
    return list(adapter_state_dict(model).keys())



def adapter_parameters(model: "PeftModel", keys: set[str] | frozenset[str] | None = None) -> dict[str, torch.nn.Parameter]:
    """The model's parameters behind each adapter state-dict key (all keys, or `keys`).

    peft's state-dict keys drop the adapter name from parameter names (`lora_A.default.weight` →
    `lora_A.weight`, `classifier.modules_to_save.default.bias` → `classifier.bias`).
    """
    wanted = set(get_adapter_keys(model)) if keys is None else set(keys)
    name = model.active_adapter
    out = {}
    for pname, p in model.named_parameters():
        key = pname.replace(f".modules_to_save.{name}.", ".").replace(f".{name}.", ".")
        if key in wanted:
            out[key] = p
    missing = wanted - set(out)
    if missing:
        raise ValueError(f"no parameter for adapter keys {sorted(missing)[:3]}")
    return out

"""Compute precision (`train.precision`): fp32, or bf16 autocast where the hardware runs bf16 matrix work fast.

Only the forward computations (local training, zeroth-order probes, evaluation, generation) run
under autocast. Weights, adapters, gradients, optimizer state, aggregation and every byte on the
wire stay fp32, so a bf16 run exchanges the same kind of update as an fp32 one.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch

PRECISIONS = ("fp32", "bf16", "auto")


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_units() -> str:
    """The CPU's bf16 matrix units ('AMX', 'AVX-512 bf16') or '' when it has none (bf16 is then emulated, slower)."""
    flags = _cpu_flags()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() or "amx_bf16" in flags
    if amx:
        return "AMX"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or "avx512_bf16" in flags:
        return "AVX-512 bf16"
    return ""


def resolve(precision: str, device: torch.device) -> tuple[str, str]:
    """(fp32 | bf16, why): `auto` becomes bf16 on CUDA devices with bf16 and CPUs with AMX or AVX-512 bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision, "set in the recipe"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name(device)} runs bf16"
        return "fp32", "auto: this GPU has no fast bf16"
    units = cpu_bf16_units()
    if units:
        return "bf16", f"auto: the CPU has {units}"
    return "fp32", "auto: the CPU has no AMX or AVX-512 bf16, so bf16 would be emulated"


@lru_cache(maxsize=8)
def _resolved(precision: str, device_type: str) -> str:
    return resolve(precision, torch.device(device_type))[0]


def compute(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in: bf16 autocast on `device`, or nothing for fp32."""
    if _resolved(precision, device.type) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_compute(precision: str, model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """`compute` on the device that holds `model`'s parameters."""
    return compute(precision, next(model.parameters()).device)

"""Option models that several methods share: one definition per meaning, read as attributes.

A method's `Options` inherits the bases whose keys it accepts; shared code asks `isinstance` of
the base (the options declare the capability), never `getattr` by key name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedpeft.methods.contract import NoOptions as MethodOptions

__all__ = ["LoraAggregationOptions", "MethodOptions", "ServerLrOptions", "UpdateClipOptions"]


class UpdateClipOptions(MethodOptions):
    """`clip_norm`: each client's update is clipped to this L2 norm before the aggregate."""

    clip_norm: float = Field(0.0, ge=0.0, description="if > 0, clip each client's update to this L2 norm first")


class LoraAggregationOptions(MethodOptions):
    """`lora_aggregation`: how LoRA's A and B are averaged."""

    lora_aggregation: Literal["separate", "exact"] = Field(
        "separate", description="average LoRA A and B separately, or average B·A and re-factorize by SVD"
    )


class ServerLrOptions(MethodOptions):
    """`server_lr`: η_g, the server's step towards the round's aggregate."""

    server_lr: float = Field(1.0, gt=0.0, description="server learning rate η_g: x ← x + η_g·(step from the aggregate)")


def clip_norm(options: MethodOptions) -> float:
    """The update clipping bound these options set (0: none)."""
    return options.clip_norm if isinstance(options, UpdateClipOptions) else 0.0


def exact_lora_aggregation(options: MethodOptions) -> bool:
    """Whether these options ask for exact LoRA aggregation."""
    return isinstance(options, LoraAggregationOptions) and options.lora_aggregation == "exact"

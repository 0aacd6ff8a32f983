"""FFA-LoRA (Sun et al., 2024): LoRA with A frozen at its shared initialization; only B trains and travels.

With A fixed and identical everywhere, averaging B averages the update B·A exactly, and half of
the LoRA tensors never cross the wire. A is the seeded initialization every process builds.
"""

from __future__ import annotations

from fedpeft.config import Config
from strategies.fedavg import FedAvgAdapter, FedAvgOptions
from fedpeft.methods.contract import FIRST_ORDER
from strategies.registry import Capabilities, register
from strategies.strategy_utils import require_adapter


@register("ffa-lora", trainer=FIRST_ORDER, options=FedAvgOptions, capabilities=Capabilities(secagg=True))
class FFALoRA(FedAvgAdapter):
    """FedAvg over LoRA B matrices (and the classifier head); A matrices stay at their seeded init."""

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """FFA-LoRA needs a LoRA adapter."""
        require_adapter(cls.method_name, cfg, "lora")
        super().validate_config(cfg)

    @classmethod
    def prepare_model(cls, model) -> None:
        """Freeze every LoRA A matrix."""
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)

    @classmethod
    def exchanged(cls, key: str) -> bool:
        """Everything but the frozen A matrices."""
        return "lora_A" not in key

"""FedPara (Hyeon-Woo et al., ICLR 2022): low-rank Hadamard-product weights, W = (X1 Y1^T) o (X2 Y2^T).

peft's LoHa adapter is this parameterization; the server averages its four factors per layer,
weighted by examples. `match_lora_rank` picks the LoHa rank whose parameter count matches a LoRA
of that rank on the same target modules (the comparison "at equal bytes").
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fedpeft.config import AdapterConfig, Config
from strategies.fedavg import FedAvgAdapter
from fedpeft.methods.contract import FIRST_ORDER
from strategies.registry import Capabilities, register
from strategies.strategy_utils import require_adapter


class FedParaOptions(BaseModel):
    """Recipe keys of `[method]` for fedpara."""

    model_config = ConfigDict(extra="forbid")
    match_lora_rank: int = Field(0, ge=0, description="if > 0, set adapter.r to match LoRA of this rank in size")


def equal_bytes_loha_rank(lora_rank: int) -> int:
    """LoHa rank with the parameter count closest to LoRA of `lora_rank` on the same Linear layers.

    Per Linear(in, out): LoRA has r(in + out) parameters, LoHa two factor pairs, 2r(in + out).
    """
    return max(1, round(lora_rank / 2))


@register("fedpara", trainer=FIRST_ORDER, options=FedParaOptions, capabilities=Capabilities(secagg=True))
class FedPara(FedAvgAdapter):
    """Weighted FedAvg of LoHa factors."""

    @classmethod
    def matched_rank(cls, lora_rank: int) -> int:
        """The LoHa rank that `match_lora_rank = lora_rank` selects (same size as that LoRA)."""
        return equal_bytes_loha_rank(lora_rank)

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """Require a LoHa adapter; apply `match_lora_rank`."""
        require_adapter(cls.method_name, cfg, "loha")
        opts = cls.Options.model_validate(cfg.method.options())
        if opts.match_lora_rank:
            kwargs = cfg.adapter.peft_kwargs()
            kwargs["r"] = cls.matched_rank(opts.match_lora_rank)
            kwargs.setdefault("alpha", kwargs["r"])
            cfg.adapter = AdapterConfig(type=cfg.adapter.type, **kwargs)

"""FedSA-LoRA (Guo et al., ICLR 2025): selective aggregation, LoRA A shared and B kept on each client.

The paper finds that the A matrices learn what the clients share and the B matrices what is
specific to each; so A (and the classifier head, like every adapter tensor but B) is sent,
averaged by example-weighted FedAvg and sent back, while each client's B stays in its client
state store (`clients.personal`) and never travels. B starts at peft's zero init on every client.

The server's global model is A with a zero B, i.e. the base model with the shared head; the
method's result is each client's personalized score on a local test split (`strategies.personal`).
"""

from __future__ import annotations

from fedpeft.config import Config, ConfigError
from fedpeft.methods.personal_wire import PERSONAL_SPLIT
from strategies.fedavg import FedAvgAdapter
from strategies.options import LoraAggregationOptions, UpdateClipOptions, exact_lora_aggregation
from strategies.personal import SAMPLE_DP_WHY, SECAGG_WHY, USER_DP_WHY, LocalTestOptions, PersonalScores
from strategies.registry import Capabilities, register
from strategies.strategy_utils import require_adapter

B_MARKS = ("lora_B", "lora_embedding_B")  # peft's names of B (and its bias, with lora_bias) in the adapter state


class FedSALoRAOptions(LoraAggregationOptions, UpdateClipOptions, LocalTestOptions):
    """Recipe keys of `[method]` for fedsa-lora (`lora_aggregation` only as "separate": B is never averaged)."""


@register("fedsa-lora", trainer=PERSONAL_SPLIT, options=FedSALoRAOptions, capabilities=Capabilities(
    sample_dp=SAMPLE_DP_WHY,
    user_dp=USER_DP_WHY,
    client_state=True,
    secagg=SECAGG_WHY,
))
class FedSALoRA(PersonalScores, FedAvgAdapter):
    """FedAvg of LoRA A matrices (and the classifier head); each client's B stays in its state store."""

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """Require a LoRA adapter; refuse exact aggregation, which averages B·A (B is never shared)."""
        require_adapter(cls.method_name, cfg, "lora")
        if exact_lora_aggregation(cls.Options.model_validate(cfg.method.options())):
            raise ConfigError("method.lora_aggregation = 'exact' averages B·A, but fedsa-lora keeps every client's "
                              "B on the client: only A is averaged (use lora_aggregation = 'separate')")
        super().validate_config(cfg)

    @classmethod
    def exchanged(cls, key: str) -> bool:
        """Everything but the personal B matrices (of Linear and of Embedding layers)."""
        return not any(mark in key for mark in B_MARKS)

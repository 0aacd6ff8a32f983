"""pFedPara (Hyeon-Woo et al., ICLR 2022): FedPara with one factor pair per layer kept on the client.

Per LoHa layer, W = (X1 Y1^T) o (X2 Y2^T): the first pair (peft's hada_w1_*) is global (sent,
averaged, sent back), the second (hada_w2_*) is personal and lives in the client state store;
the server never sees it. Each sampled client evaluates, on a local test split of its own data,
the global model (global pair with the initial personal pair) and its personalized model (after
local training); the server reports the mean of both per round (`strategies.personal`).

With peft's LoHa initialization the personal pair starts at X2 Y2^T = 0, so the global model
alone carries no adapter update (only the shared classifier head): the adapter only acts
through each client's personal pair. The paper's variant W1 o (W2 + 1) would differ here.
"""

from __future__ import annotations

from fedpeft.methods.personal_wire import PERSONAL_SPLIT
from fedpeft.methods.pfedpara_wire import is_local
from strategies.fedpara import FedPara, FedParaOptions
from strategies.personal import SAMPLE_DP_WHY, SECAGG_WHY, USER_DP_WHY, LocalTestOptions, PersonalScores
from strategies.registry import Capabilities, register


class PFedParaOptions(FedParaOptions, LocalTestOptions):
    """Recipe keys of `[method]` for pfedpara."""


@register("pfedpara", trainer=PERSONAL_SPLIT, options=PFedParaOptions, capabilities=Capabilities(
    sample_dp=SAMPLE_DP_WHY,
    user_dp=USER_DP_WHY,
    client_state=True,
    secagg=SECAGG_WHY,
))
class PFedPara(PersonalScores, FedPara):
    """FedAvg of the global LoHa factor pair; the personal pair stays in each client's state store."""

    @classmethod
    def matched_rank(cls, lora_rank: int) -> int:
        """Only one factor pair travels, so LoHa rank r sends what LoRA rank r sends."""
        return lora_rank

    @classmethod
    def exchanged(cls, key: str) -> bool:
        """Everything but the personal factor pair."""
        return not is_local(key)

"""FedSVD (Lee et al., NeurIPS 2025): LoRA with B trained on clients and A re-orthonormalized by the server each round.

Clients train only B against the A they are sent (A frozen, as in FFA-LoRA) and upload B and the
head, never A. The server averages what came up (example-weighted FedAvg, with `clip_norm` if
set), then per LoRA layer takes the SVD of the product with the A the clients trained against,
M = B̄·A = U Σ Vᵀ (rank ≤ r), and sends A ← Vᵀ[:r] (orthonormal rows) and B ← U[:, :r]·Σ[:r] down
the next round. B·A = M exactly, so the global model is the one FedAvg of B over a shared A gives,
but A follows the directions the clients' updates span instead of staying at its random init.

Why A's rows are orthonormal: A·Aᵀ = I, so ‖ξ·A‖ = ‖ξ‖ for any change ξ of B. The gradient of B,
∂L/∂(BA)·Aᵀ, is not scaled by A's conditioning, and the noise DP-SGD adds to B enters the model
with exactly its own norm. A is computed on the server from the released B̄ and the previous A,
so under DP-SGD it is post-processing: the clients' ε covers B and the head, which is all they send.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord

from fedpeft.config import Config, ConfigError
from fedpeft.methods.contract import FIRST_ORDER
from strategies.fedavg import FedAvgOptions, lora_pairs, refactorize
from strategies.ffa_lora import FFALoRA
from strategies.options import exact_lora_aggregation
from strategies.registry import Capabilities, register

if TYPE_CHECKING:
    from peft import PeftModel

    from fedpeft.nodes import NodeDirectory

USER_DP_WHY = ("its replies carry B and the head but not the A they are sent, while user-level DP clips and noises "
               "the update of every tensor sent")
CODECS_WHY = ("its upload (B + head) is not the tensors it sends (A, B + head), which the codec chains code the upload "
              "against; a lossy download would also leave clients an A that is not the server's orthonormal one")


class FedSVDOptions(FedAvgOptions):
    """Recipe keys of `[method]` for fedsvd (`lora_aggregation` only as "separate": B·A is already exact)."""


@register("fedsvd", trainer=FIRST_ORDER, options=FedSVDOptions,
          capabilities=Capabilities(user_dp=USER_DP_WHY, codecs=(), codecs_why=CODECS_WHY, secagg=True))
class FedSVD(FFALoRA):
    """FedAvg of LoRA B (and the head) over a frozen A; each round B̄·A is re-factorized by SVD into an orthonormal A."""

    def __init__(self, cfg: Config, directory: "NodeDirectory", model: "PeftModel",
                 workdir: Path | None = None) -> None:
        super().__init__(cfg, directory, model, workdir)
        self.pairs = lora_pairs(self.template)
        for ka, kb in self.pairs:
            (rank, d_in), (d_out, _) = self.template[ka][0], self.template[kb][0]
            if rank > min(d_in, d_out):  # r orthonormal rows need r <= d_in; B·A has rank <= min(d_in, d_out)
                raise ConfigError(f"method 'fedsvd' needs adapter.r <= min(in, out) of every LoRA layer: '{ka}' is "
                                  f"{d_out} x {d_in} with r = {rank}")

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """Require LoRA; refuse exact aggregation (B·A is exact already) and merge rules (no upload codecs)."""
        if exact_lora_aggregation(cls.Options.model_validate(cfg.method.options())):
            raise ConfigError("method.lora_aggregation = 'exact' re-factorizes mean(B_i·A_i), but fedsvd's clients "
                              "share one A, so the mean of B already gives B·A exactly, and the server re-factorizes "
                              "it every round (use lora_aggregation = 'separate')")
        if cfg.codecs.merge != "mean":
            raise ConfigError(f"codecs.merge = '{cfg.codecs.merge}' merges coded uploads, and method 'fedsvd' supports "
                              f"no codecs ({CODECS_WHY}): use codecs.merge = 'mean'")
        super().validate_config(cfg)

    @classmethod
    def exchanged(cls, key: str) -> bool:
        """Every adapter tensor is sent: A changes on the server every round."""
        return True

    @classmethod
    def uploaded(cls, key: str) -> bool:
        """Everything but the A matrices, which clients keep frozen."""
        return "lora_A" not in key

    def server_step(self, server_round: int, aggregate: ArrayRecord) -> ArrayRecord:
        """The new global: per LoRA layer, B̄ times the A the clients trained with, re-split by SVD (A orthonormal)."""
        missing = sorted(set(self.upload_template) - set(aggregate))
        if missing:
            raise ValueError(f"round {server_round}: the aggregate lacks uploaded tensors {missing[:3]}")
        # The A this round's clients were sent (before any send: the initial one).
        sent = self.global_arrays if self.global_arrays is not None else self.initial_arrays()
        out = {k: aggregate[k] for k in aggregate}
        for ka, kb in self.pairs:
            a, b = sent[ka].numpy(), aggregate[kb].numpy()
            # float64 for the product and the SVD; each factor back in its adapter's own dtype.
            new_b, new_a = refactorize(b.astype(np.float64) @ a.astype(np.float64), a.shape[0], orthonormal_a=True)
            out[ka], out[kb] = Array(np.ascontiguousarray(new_a, dtype=a.dtype)), Array(
                np.ascontiguousarray(new_b, dtype=b.dtype))
        return super().server_step(server_round, ArrayRecord({k: out[k] for k in self.template}))

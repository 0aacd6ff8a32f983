"""Multiple-choice evaluation of a causal LM by choice log-likelihood, as lm-evaluation-harness scores MMLU-style tasks.

Each question is one context and one continuation per choice; the model is not asked to generate.

- **Context**: the question rendered as fedpeft renders an instruction prompt (`fedpeft.data.prompts.
  render_prompt`): with a chat template (data.template auto / chat) the question is a user turn and
  `add_generation_prompt=True` opens the assistant's turn; without one it is Alpaca's prompt ending in
  `### Response:`. `template="plain"` gives the harness's own default instead: `Question: {q}\\nAnswer:`.
- **Continuation**: the choice's text as the answer (the "cloze" / continuation formulation, e.g. the
  harness's `arc_easy`, `mmlu_continuation`; not the lettered " A"/" B" formulation, whose
  continuations all have one token and length, so length normalization would change nothing and a
  small model scores letters near chance). It is tokenized on its own, exactly as a training response
  is, and gets no end-of-sequence token; with `template="plain"` it is `" " + choice`, as in the harness.
- **Scores**: a choice's log-likelihood is the sum of log p(token | context, earlier continuation
  tokens) over its continuation tokens. `mc_accuracy` (the harness's `acc`) counts questions whose
  right choice has the highest log-likelihood; `mc_accuracy_norm` (`acc_norm`) divides each by the
  length of the continuation text in characters first. Ties go to the first choice.

The choices of a question share its context, so by default the context runs once (left-padded,
with explicit position ids; `batch_size` contexts a pass) and its key/value cache is copied once per
choice for the continuation tokens after the first, which the context's last position predicts.
The prefix every context shares (a chat template's system turn: 25 of SmolLM2's ~37 context
tokens) runs once per pass.
A model that returns no such cache scores whole sequences instead (context + continuation, left-
padded, only the last positions projected onto the vocabulary with `logits_to_keep`); a model
whose forward takes no position ids is right-padded. Every path equals one unpadded forward pass
per choice (tested against that hand computation).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from fedpeft.causal_lm import _keeps_logits
from fedpeft.data.choices import Question
from fedpeft.data.prompts import _cut_middle, _prompt_ids, render_prompt, special_ids

PLAIN = "plain"  # the harness's default prompt: "Question: ...\nAnswer:" + " choice"


@dataclass(frozen=True)
class Request:
    """One (question, choice) pair as token ids: the context and the continuation scored after it."""

    question: int
    choice: int
    context: list[int]
    continuation: list[int]
    chars: int  # length of the continuation text, for acc_norm


@dataclass
class ChoiceScores:
    """Per question, each choice's summed continuation log-likelihood and text length; the right choices."""

    logliks: list[list[float]]
    chars: list[list[int]]
    answers: list[int]
    seconds: float = 0.0

    def predictions(self, normalized: bool = False) -> list[int]:
        """The chosen index per question: highest log-likelihood (per character when `normalized`)."""
        return [int(np.argmax(np.array(ll) / (np.array(ch) if normalized else 1.0)))
                for ll, ch in zip(self.logliks, self.chars)]

    def metrics(self) -> dict[str, float]:
        """`mc_accuracy` (acc) and `mc_accuracy_norm` (acc_norm) over the questions."""
        if not self.answers:
            return {"mc_accuracy": 0.0, "mc_accuracy_norm": 0.0}
        acc = np.mean([p == a for p, a in zip(self.predictions(), self.answers)])
        norm = np.mean([p == a for p, a in zip(self.predictions(normalized=True), self.answers)])
        return {"mc_accuracy": float(acc), "mc_accuracy_norm": float(norm)}


def context_text(tokenizer, question: str, template: str = "auto") -> str:
    """The prompt text a question is scored after (see the module docstring)."""
    if template == PLAIN:
        return f"Question: {question}\nAnswer:"
    return render_prompt(tokenizer, question, "", template)


def encode_requests(tokenizer, questions: list[Question], template: str = "auto",
                    max_length: int | None = None) -> list[Request]:
    """Token ids of every (question, choice) pair; contexts longer than `max_length` are cut in the middle.

    `max_length` bounds the tokens the model sees (context + continuation - 1, the last continuation
    token being only predicted); the context keeps its start and its last tokens (the assistant header).
    """
    out = []
    for qi, q in enumerate(questions):
        context = _prompt_ids(tokenizer, context_text(tokenizer, q.question, template))
        if not context:  # a context must predict the first continuation token
            context = [special_ids(tokenizer)[1]]
        for ci, choice in enumerate(q.choices):
            text = f" {choice}" if template == PLAIN else choice
            cont = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not cont:
                raise ValueError(f"choice {choice!r} of question {qi} has no tokens")
            ctx = context
            if max_length is not None and len(ctx) + len(cont) - 1 > max_length:
                budget = max_length + 1 - len(cont)
                if budget < 1:
                    raise ValueError(f"choice {choice!r} of question {qi} has {len(cont)} tokens, more than the "
                                     f"model's {max_length} positions")
                ctx = _cut_middle(ctx, budget)
            out.append(Request(qi, ci, list(ctx), list(cont), len(text)))
    return out


@lru_cache(maxsize=16)
def _takes_position_ids(model_type: type) -> bool:
    return "position_ids" in inspect.signature(model_type.forward).parameters


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of `rows` padded to the longest, on the left or on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span], mask[i, span] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _gather(logits: torch.Tensor, tokens: list[int]) -> float:
    """Sum of log p(tokens[j]) under `logits[j]` (one row per token)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(logp.gather(1, torch.tensor(tokens, device=logp.device).unsqueeze(1)).sum())


def _copyable(cache) -> bool:
    return cache is not None and hasattr(cache, "batch_select_indices")


def _shared_batch(model, requests: list[Request], groups: list[list[int]], prefix: int, pad_id: int, keeps: bool,
                  out: list[float]) -> bool:
    """Score the requests of some contexts: each context once (its cache kept), then every continuation after it.

    The first `prefix` tokens, the same in every context (a chat template's system turn), run once
    for the batch. Returns False, scoring nothing, when the model returns no cache that can be
    copied per row.
    """
    device = next(model.parameters()).device
    contexts = [requests[g[0]].context for g in groups]
    kw = {"logits_to_keep": 1} if keeps else {}
    cache = None
    if prefix:
        cache = model(input_ids=torch.tensor([contexts[0][:prefix]], device=device), use_cache=True,
                      **kw).past_key_values
        if not _copyable(cache):
            return False
        cache.batch_select_indices(torch.zeros(len(contexts), dtype=torch.long, device=device))
    # The rest of each context, left-padded: padding sits between the shared prefix and the rest.
    ids, rest_mask = _pad([c[prefix:] for c in contexts], pad_id, left=True)
    mask = torch.cat([torch.ones(len(contexts), prefix, dtype=torch.long), rest_mask], 1)
    first = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                  position_ids=(prefix + _positions(rest_mask)).to(device), past_key_values=cache, use_cache=True, **kw)
    cache = getattr(first, "past_key_values", None)
    if not _copyable(cache):
        return False
    last = first.logits[:, -1]  # predicts every continuation's first token
    rows = []  # (context row, request) of continuations with more than one token
    for row, g in enumerate(groups):
        for i in g:
            out[i] = _gather(last[row:row + 1], requests[i].continuation[:1])
            if len(requests[i].continuation) > 1:
                rows.append((row, i))
    if rows:
        ctx_rows = torch.tensor([r for r, _ in rows])
        cont_ids, cont_mask = _pad([requests[i].continuation[:-1] for _, i in rows], pad_id, left=False)
        cache.batch_select_indices(ctx_rows.to(device))  # one copy of the context's cache per continuation
        positions = mask.sum(-1)[ctx_rows].unsqueeze(1) + torch.arange(cont_ids.shape[1]).unsqueeze(0)
        full_mask = torch.cat([mask[ctx_rows], cont_mask], 1)
        logits = model(input_ids=cont_ids.to(device), attention_mask=full_mask.to(device),
                       position_ids=positions.to(device), past_key_values=cache, use_cache=True).logits
        for k, (_, i) in enumerate(rows):
            cont = requests[i].continuation
            out[i] += _gather(logits[k, :len(cont) - 1], cont[1:])
    return True


def _common_prefix(contexts: list[list[int]]) -> int:
    """Tokens every context starts with, leaving at least one of each (its last predicts the continuation)."""
    if not contexts:
        return 0
    n = min(len(c) for c in contexts) - 1
    first = contexts[0]
    for c in contexts[1:]:
        n = next((j for j in range(n) if c[j] != first[j]), n)
    return max(n, 0)


def _full_batch(model, requests: list[Request], sel: list[int], pad_id: int, left: bool, keeps: bool,
                out: list[float]) -> None:
    """Score requests as whole sequences (context + continuation, less its last token) in one forward pass."""
    device = next(model.parameters()).device
    inputs = [requests[i].context + requests[i].continuation[:-1] for i in sel]
    ids, mask = _pad(inputs, pad_id, left)
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    if left:  # every row ends at the last column: only the last (longest continuation) positions are needed
        keep = max(len(requests[i].continuation) for i in sel)
        batch["position_ids"] = _positions(mask).to(device)
        logits = (model(**batch, logits_to_keep=keep).logits if keeps else model(**batch).logits)[:, -keep:]
    else:
        logits = model(**batch).logits
    for row, i in enumerate(sel):
        cont = requests[i].continuation
        # The last len(cont) input positions of the row predict its continuation.
        end = logits.shape[1] if left else len(inputs[row])
        out[i] = _gather(logits[row, end - len(cont):end], cont)


@torch.inference_mode()
def continuation_logliks(model: torch.nn.Module, requests: list[Request], batch_size: int, pad_id: int,
                         share_context: bool = True) -> list[float]:
    """Summed log-probability of each request's continuation given its context, in request order.

    With `share_context`, requests with the same context (a question's choices) run it once and
    continue from its cache (`batch_size` contexts a pass); otherwise, or when the model keeps no
    cache that can be copied, each request is one sequence (`batch_size` sequences a pass).
    """
    # Each module's own mode comes back afterwards (a peft wrapper in train mode may hold an eval-mode base).
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    base_type = type(_base(model))
    left = _takes_position_ids(base_type)
    keeps = _keeps_logits(base_type)
    out = [0.0] * len(requests)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(tuple(r.context), []).append(i)
    # Longest first, so the memory peak comes at once.
    ordered = sorted(groups.values(), key=lambda g: -len(requests[g[0]].context))
    shared = share_context and left
    prefix = _common_prefix([list(c) for c in groups]) if shared else 0
    for start in range(0, len(ordered), batch_size if shared else max(len(ordered), 1)):
        if shared and _shared_batch(model, requests, ordered[start:start + batch_size], prefix, pad_id, keeps, out):
            continue
        rest = sorted((i for g in ordered[start:] for i in g),
                      key=lambda i: -len(requests[i].context) - len(requests[i].continuation))
        for b in range(0, len(rest), batch_size):
            _full_batch(model, requests, rest[b:b + batch_size], pad_id, left, keeps, out)
        break
    for m, training in modes:
        m.training = training
    return out


def model_positions(model: torch.nn.Module) -> int | None:
    """How many positions the model can attend over (its config's limit), or None when it names none."""
    config = getattr(_base(model), "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def score_questions(model: torch.nn.Module, tokenizer, questions: list[Question], batch_size: int = 32,
                    template: str = "auto", max_length: int | None = None, pad_id: int | None = None,
                    share_context: bool = True) -> ChoiceScores:
    """Every choice's log-likelihood for `questions`; `max_length` defaults to the model's position limit."""
    t0 = time.perf_counter()
    if max_length is None:
        max_length = model_positions(model)
    requests = encode_requests(tokenizer, questions, template, max_length)
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else special_ids(tokenizer)[1]
    logliks = continuation_logliks(model, requests, batch_size, pad_id, share_context)
    ll = [[0.0] * len(q.choices) for q in questions]
    chars = [[0] * len(q.choices) for q in questions]
    for r, value in zip(requests, logliks):
        ll[r.question][r.choice] = value
        chars[r.question][r.choice] = r.chars
    return ChoiceScores(ll, chars, [q.answer for q in questions], time.perf_counter() - t0)


def multiple_choice_scores(model: torch.nn.Module, tokenizer, questions: list[Question], batch_size: int = 32,
                           template: str = "auto", max_length: int | None = None) -> dict[str, float]:
    """`mc_accuracy`, `mc_accuracy_norm` and the scoring time `mc_s` of `model` on `questions`."""
    scores = score_questions(model, tokenizer, questions, batch_size, template, max_length)
    return {**scores.metrics(), "mc_s": scores.seconds}

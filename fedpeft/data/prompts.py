"""Prompts for causal-LM instruction tuning: rendering, special tokens, and token ids with loss labels.

A training example is `[bos] prompt response eos`; the loss is taken on the response and eos only
(labels are -100 elsewhere). Prompt and response are tokenized separately, so the boundary between
them is exact for every tokenizer. When an example is too long the response keeps at least half
the length budget (or all of it, if shorter), and the prompt is cut in the middle: its first tokens
(instruction) and its last ones (the "### Response:" marker or the chat template's assistant header)
stay, because the model needs both to know what to answer and where the answer starts.
"""

from __future__ import annotations

from fedpeft.config import ConfigError

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
TEMPLATES = ("auto", "alpaca", "chat")
IGNORE_INDEX = -100
# Prompt tokens kept at the end when a prompt is cut: enough for the response marker / assistant
# header of common templates (Alpaca's is 5 WordPiece tokens, chat headers 4-6 BPE tokens).
PROMPT_TAIL_TOKENS = 8


def render_prompt(tokenizer, instruction: str, input: str, template: str) -> str:
    """The prompt text of one example: the tokenizer's chat template (`chat`; `auto` if it has one), else Alpaca's."""
    if template not in TEMPLATES:
        raise ConfigError(f"data.template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise ConfigError(f"data.template = 'chat' but the tokenizer ({type(tokenizer).__name__}) has no chat "
                          "template; use data.template = 'auto' or 'alpaca'")
    if template == "alpaca" or not has_chat:
        return (ALPACA_TEMPLATE.format(instruction=instruction, input=input) if input
                else ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction))
    content = f"{instruction}\n\n{input}" if input else instruction
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def special_ids(tokenizer) -> tuple[int | None, int]:
    """(bos id or None, eos id): bos, else cls; eos, else sep (encoder vocabularies such as BERT's)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has neither an eos nor a sep token, "
                         "so generated responses could not end")
    return bos, eos


def pad_id(tokenizer) -> int:
    """The padding id: the pad token, else eos."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else special_ids(tokenizer)[1]


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Prompt ids with bos in front, unless the prompt text already starts with it (chat templates often do)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos, _ = special_ids(tokenizer)
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def _cut_middle(ids: list[int], budget: int) -> list[int]:
    """`ids` shortened to `budget` by dropping tokens between its head and its last few tokens."""
    if len(ids) <= budget:
        return ids
    if budget <= 0:
        return []
    tail = min(PROMPT_TAIL_TOKENS, budget // 2)
    return ids[: budget - tail] + (ids[len(ids) - tail:] if tail else [])


def encode_example(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for `[bos] prompt response eos` in at most `max_length` tokens; labels -100 on the prompt."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    _, eos = special_ids(tokenizer)
    prompt_ids = _prompt_ids(tokenizer, prompt)
    response_ids = [*tokenizer(response, add_special_tokens=False)["input_ids"], eos]
    keep_response = min(len(response_ids), max(1, max_length // 2))
    prompt_ids = _cut_middle(prompt_ids, min(len(prompt_ids), max_length - keep_response))
    # The response's end (and eos) goes only when even the guaranteed share does not fit it all.
    response_ids = response_ids[: max_length - len(prompt_ids)]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def encode_prompt(tokenizer, prompt: str, max_length: int, reserve: int) -> list[int]:
    """`[bos] prompt` ids for generation, cut like `encode_example` to leave `reserve` of `max_length` free."""
    if reserve < 0 or reserve >= max_length:
        raise ValueError(f"cannot reserve {reserve} new tokens in max_length = {max_length} "
                         "(raise model.max_length or lower eval.max_new_tokens)")
    return _cut_middle(_prompt_ids(tokenizer, prompt), max_length - reserve)

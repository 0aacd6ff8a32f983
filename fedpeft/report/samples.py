"""Held-out generation samples side by side: the prompt, the reference, the first generation round's answer
(round 0: the base model, zero-shot) and the last round's (the fine-tuned global model), from generations.jsonl."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

DEFAULT_SAMPLES = 5
# A chat-template prompt decoded without its special tokens ("system\n...\nuser\n<question>\nassistant\n"),
# or an Alpaca one (also as a WordPiece tokenizer decodes it: "# # # instruction : ... # # # response :").
_CHAT = re.compile(r"(?:^|\n)user\n(?P<q>.*)\n\s*assistant\s*$", re.DOTALL)
_ALPACA = re.compile(r"#\s*#\s*#\s*instruction\s*:\s*(?P<q>.*?)\s*#\s*#\s*#\s*response\s*:\s*$", re.DOTALL | re.I)
_ALPACA_INPUT = re.compile(r"\s*#\s*#\s*#\s*input\s*:\s*", re.I)


@dataclass
class SamplePair:
    """One held-out prompt: what the model answered on the first and on the last generation round."""

    prompt: str  # the question as the user wrote it (the template's headers removed)
    reference: str
    first: str
    final: str


def prompt_question(prompt: str) -> str:
    """The user's part of a rendered prompt: the chat template's user turn or Alpaca's instruction (and input)."""
    text = prompt.strip("\n")
    chat = _CHAT.search(text)
    if chat:
        text = chat.group("q").rsplit("\nuser\n", 1)[-1]
    else:
        alpaca = _ALPACA.search(text)
        if alpaca:
            text = _ALPACA_INPUT.sub(" — ", alpaca.group("q"))
    return " ".join(text.split())


def sample_pairs(generations: dict[int, list[dict[str, Any]]],
                 k: int = DEFAULT_SAMPLES) -> tuple[int | None, int | None, list[SamplePair]]:
    """(first round, last round, up to `k` prompts answered on both), paired by position within each round."""
    if not generations:
        return None, None, []
    first, last = min(generations), max(generations)
    pairs = []
    for a, b in zip(generations[first], generations[last]):
        if len(pairs) == k:
            break
        if a.get("prompt") != b.get("prompt"):  # the rounds did not generate from the same prompts
            break
        pairs.append(SamplePair(prompt_question(str(a.get("prompt", ""))), str(a.get("reference", "")),
                                str(a.get("generated", "")), str(b.get("generated", ""))))
    return first, last, pairs

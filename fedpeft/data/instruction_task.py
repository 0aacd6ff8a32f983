"""Instruction records → the tokenized causal-LM task: prompt + response ids with response-only labels."""

from __future__ import annotations

from datasets import Dataset, Features, Sequence, Value

from fedpeft.config import Config
from fedpeft.data.prompts import encode_example, encode_prompt, render_prompt

COLUMNS = ["input_ids", "labels", "prompt_ids", "reference"]


def tokenize_instructions(ds: Dataset, tokenizer, cfg: Config) -> Dataset:
    """Tokenize instruction / input / output rows: prompt + response ids with labels, the prompt alone, the reference.

    Every row keeps its prompt and reference so any split (the held-out test set, a client's
    local test split) can be scored by generation.
    """
    ids, labels, prompts = [], [], []
    max_length, template = cfg.model.max_length, cfg.data.template
    for instruction, context, output in zip(ds["instruction"], ds["input"], ds["output"]):
        prompt = render_prompt(tokenizer, instruction, context, template)
        x, y = encode_example(tokenizer, prompt, output, max_length)
        ids.append(x)
        labels.append(y)
        prompts.append(encode_prompt(tokenizer, prompt, max_length, reserve=0))
    columns = {"input_ids": ids, "labels": labels, "prompt_ids": prompts, "reference": list(ds["output"])}
    features = {"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                "prompt_ids": Sequence(Value("int32")), "reference": Value("string")}
    return Dataset.from_dict(columns, features=Features(features))

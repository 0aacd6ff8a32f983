"""Instruction data: the built-in task, instruction files in common layouts, prompts, token ids and labels."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
from datasets import Dataset

from fedpeft.config import BuiltinDataConfig, ConfigError, DataConfig, ModelConfig, PartitionConfig
from fedpeft.data import DataError, load_instructions
from fedpeft.data import builtin_instructions as bi
from fedpeft.data.instructions import standardize
from fedpeft.data.partitioning import partition_indices
from fedpeft.data.prompts import (ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, IGNORE_INDEX, encode_example,
                                  encode_prompt, pad_id, render_prompt, special_ids)

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tok():
    from fedpeft.models import load_tokenizer
    from fedpeft.app.recipe import validate

    return load_tokenizer(validate({}).model)


def _jsonl(path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _file_cfg(path: str, **kw) -> DataConfig:
    return DataConfig(source="file", path=path, **kw)


# --- the built-in task -------------------------------------------------------------------------


def test_builtin_is_deterministic_with_every_category_equally_often():
    a, b = bi.generate(600, seed=3), bi.generate(600, seed=3)
    assert a.column_names == ["instruction", "input", "output", "category"]
    assert a.to_dict() == b.to_dict()
    assert bi.generate(600, seed=4)["instruction"] != a["instruction"]
    counts = {c: list(a["category"]).count(c) for c in bi.CATEGORIES}
    assert set(counts.values()) == {100}
    assert "" in a["input"] and any(a["input"])  # both prompt shapes occur
    assert all(o == o.lower().strip() and o for o in a["output"])


def test_builtin_answers_are_short_and_examples_fit_the_default_length(tok):
    ds = bi.generate(1200, seed=0)
    lengths = []
    for row in ds:
        prompt = render_prompt(tok, row["instruction"], row["input"], "auto")
        ids, labels = encode_example(tok, prompt, row["output"], 10**6)
        assert sum(lab != IGNORE_INDEX for lab in labels) - 1 <= 3  # answer tokens, eos excluded
        lengths.append(len(ids))
    assert max(lengths) <= ModelConfig().max_length and min(lengths) >= 10


def test_builtin_labels_follow_the_review_and_the_word_lists():
    ds = bi.generate(1800, seed=1)
    rows = list(ds)
    negated_bad = [r for r in rows if r["category"] == "sentiment"
                   and ("not terrible" in r["input"] or "never awful" in r["input"])]
    assert negated_bad and all(r["output"] == "positive" for r in negated_bad)
    antonyms = dict(bi.ANTONYMS) | {b: a for a, b in bi.ANTONYMS}
    following = {s[i]: s[(i + 1) % len(s)] for s, _ in bi.SEQUENCES for i in range(len(s))}
    for r in rows:
        if r["category"] == "antonym" and r["input"]:
            assert antonyms[r["input"]] == r["output"]
        if r["category"] == "successor" and r["input"]:
            assert following[r["input"]] == r["output"] and r["input"] != "twenty"
        if r["category"] == "last-word":
            assert r["input"].split()[-1] == r["output"]
        if r["category"] == "topic":
            assert r["output"] in ("restaurant", "electronics", "travel")
    assert {"monday", "january", "twenty"} & {r["output"] for r in rows if r["category"] == "successor"}


def test_builtin_category_subset_and_unknown_category():
    ds = bi.generate(50, seed=0, categories=["plural", "antonym"])
    assert set(ds["category"]) == {"plural", "antonym"}
    assert set(bi.generate(30, seed=0, categories=["topic"], num_domains=1)["output"]) == {"restaurant"}
    with pytest.raises(ValueError, match="allowed: sentiment, topic, antonym"):
        bi.generate(10, seed=0, categories=["colour"])


def test_load_instructions_builtin_uses_the_config():
    cfg = DataConfig(builtin=BuiltinDataConfig(task="words", num_train=60, num_test=12,
                                               categories=["successor", "last-word"]))
    raw = load_instructions(cfg, seed=5)
    assert len(raw.train) == 60 and len(raw.test) == 12
    assert set(raw.train["category"]) == {"successor", "last-word"}
    assert raw.train.select(range(12)).to_dict() != raw.test.to_dict()  # train and test are drawn apart
    assert load_instructions(cfg, seed=5).train.to_dict() == raw.train.to_dict()


def test_category_column_partitions_over_clients():
    train = bi.generate(600, seed=0)
    parts = partition_indices(train, PartitionConfig(type="dirichlet", alpha=0.3, by="category"), 6, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(600))


# --- files ---------------------------------------------------------------------------------------


def test_alpaca_jsonl_loads_and_splits_off_a_test_part(tmp_path):
    rows = [{"instruction": f"say {i}", "input": "" if i % 3 else f"number {i}", "output": f" {i} ", "source": "x"}
            for i in range(40)]
    raw = load_instructions(_file_cfg(_jsonl(tmp_path / "alpaca.jsonl", rows), test_fraction=0.25), seed=0)
    assert raw.train.column_names == ["instruction", "input", "output", "source"]
    assert len(raw.train) == 30 and len(raw.test) == 10
    outputs = list(raw.train["output"]) + list(raw.test["output"])
    inputs = list(raw.train["input"]) + list(raw.test["input"])
    assert sorted(outputs, key=int) == [str(i) for i in range(40)]  # stripped
    assert "" in inputs and "number 0" in inputs
    again = load_instructions(_file_cfg(str(tmp_path / "alpaca.jsonl"), test_fraction=0.25), seed=0)
    assert again.test.to_dict() == raw.test.to_dict()


def test_dolly_jsonl_with_separate_test_file(tmp_path):
    def dolly(n: int) -> list[dict]:
        return [{"instruction": f"q{i}", "context": "" if i % 2 else f"ctx {i}", "response": f"a{i}",
                 "category": ("open_qa", "summarization")[i % 2]} for i in range(n)]

    cfg = _file_cfg(_jsonl(tmp_path / "train.jsonl", dolly(20)), test_path=_jsonl(tmp_path / "test.jsonl", dolly(6)),
                    max_test_examples=4)
    raw = load_instructions(cfg, seed=0)
    assert raw.train.column_names == ["instruction", "input", "output", "category"]
    assert len(raw.train) == 20 and len(raw.test) == 4
    assert raw.train[1] == {"instruction": "q1", "input": "", "output": "a1", "category": "summarization"}
    assert raw.train[0]["input"] == "ctx 0"


def test_csv_prompt_completion(tmp_path):
    path = tmp_path / "pc.csv"
    path.write_text("prompt,completion\n" + "".join(f"what is {i} plus one?,{i + 1}\n" for i in range(10)))
    raw = load_instructions(_file_cfg(str(path), test_fraction=0.2), seed=0)
    assert raw.train.column_names == ["instruction", "input", "output"]
    assert set(raw.train["input"]) == {""}
    # The CSV reader makes the numeric answers integers; they load as their text.
    assert len(raw.train) == 8 and all(o.isdigit() for o in raw.train["output"])


def test_explicit_column_mapping_in_parquet(tmp_path):
    ds = Dataset.from_dict({"q": ["a?", "b?", "c?", "d?"], "ctx": ["x", None, "", "y"], "a": ["1", "2", "3", "4"],
                            "input": ["other"] * 4})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    cfg = _file_cfg(str(tmp_path / "d.parquet"), instruction_column="q", input_column="ctx", output_column="a",
                    test_fraction=0.5)
    raw = load_instructions(cfg, seed=0)
    assert raw.train.column_names == ["instruction", "input", "output"]  # the unmapped `input` column gives way
    got = sorted((r["instruction"], r["input"]) for split in (raw.train, raw.test) for r in split)
    assert got == [("a?", "x"), ("b?", ""), ("c?", ""), ("d?", "y")]


def test_missing_and_bad_columns_are_named(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "reply": "r"}] * 5)
    with pytest.raises(DataError, match=r"no output column .*'output', 'response', 'answer', 'completion'.*"
                                        r"columns: question, reply.*data.output_column"):
        load_instructions(_file_cfg(p), seed=0)
    with pytest.raises(DataError, match=r"data.instruction_column = 'prompt' is not a column .*question, reply"):
        load_instructions(_file_cfg(p, instruction_column="prompt", output_column="reply"), seed=0)
    assert len(load_instructions(_file_cfg(p, output_column="reply"), seed=0).train) == 4

    good = {"instruction": "q", "output": "a"}
    bad = {"value is missing": {"instruction": "q", "output": None},
           "value is empty": {"instruction": "q", "output": "  "}}
    for i, (message, row) in enumerate(bad.items()):
        p = _jsonl(tmp_path / f"bad{i}.jsonl", [good, good, row, good])
        with pytest.raises(DataError, match=f"column 'output', train split, data row 3: {message}"):
            load_instructions(_file_cfg(p), seed=0)
    p = _jsonl(tmp_path / "list.jsonl", [{"prompt": ["a", "b"], "answer": "a"}, {"prompt": ["c"], "answer": "b"}])
    with pytest.raises(DataError, match="column 'prompt', train split, data row 1: must be a string, got list"):
        load_instructions(_file_cfg(p), seed=0)

    # Files cannot hold zero rows (the readers refuse them); a hub dataset can.
    with pytest.raises(DataError, match="the test split has no examples"):
        standardize(Dataset.from_dict({"instruction": [], "output": []}), DataConfig(), "test")


# --- prompts and token ids ---------------------------------------------------------------------


def test_alpaca_prompts_with_and_without_input(tok):
    with_input = ALPACA_TEMPLATE.format(instruction="name it.", input="a cat")
    assert render_prompt(tok, "name it.", "a cat", "auto") == with_input
    assert render_prompt(tok, "name it.", "", "alpaca") == ALPACA_TEMPLATE_NO_INPUT.format(instruction="name it.")
    assert "### Input" not in ALPACA_TEMPLATE_NO_INPUT and ALPACA_TEMPLATE.endswith("### Response:\n")


def test_chat_template_is_used_when_the_tokenizer_has_one(tok):
    with pytest.raises(ConfigError, match="data.template = 'chat' but the tokenizer"):
        render_prompt(tok, "hi", "", "chat")
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = CHAT
    assert render_prompt(chat_tok, "name it.", "a cat", "auto") == "<|user|>name it.\n\na cat\n<|assistant|>"
    assert render_prompt(chat_tok, "name it.", "", "chat") == "<|user|>name it.\n<|assistant|>"
    assert render_prompt(chat_tok, "name it.", "", "alpaca").startswith("### Instruction:")


def test_special_ids_fall_back_to_cls_and_sep(tok):
    assert special_ids(tok) == (tok.cls_token_id, tok.sep_token_id) and pad_id(tok) == tok.pad_token_id
    gpt = SimpleNamespace(bos_token_id=5, eos_token_id=5, cls_token_id=None, sep_token_id=None, pad_token_id=None)
    assert special_ids(gpt) == (5, 5) and pad_id(gpt) == 5
    bare = SimpleNamespace(bos_token_id=None, eos_token_id=None, cls_token_id=None, sep_token_id=None, pad_token_id=0)
    with pytest.raises(ValueError, match="neither an eos nor a sep token"):
        special_ids(bare)
    no_bos = SimpleNamespace(bos_token_id=None, eos_token_id=2, cls_token_id=None, sep_token_id=None)
    assert special_ids(no_bos) == (None, 2)


def test_labels_mask_the_prompt_and_keep_response_and_eos(tok):
    bos, eos = special_ids(tok)
    prompt = render_prompt(tok, "is this review positive or negative?", "the soup was not bad.", "alpaca")
    ids, labels = encode_example(tok, prompt, "positive", 64)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"]) + 1
    assert ids[0] == bos and ids[-1] == eos and len(ids) == len(labels) == n_prompt + 2
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] == [*tok("positive", add_special_tokens=False)["input_ids"], eos]
    assert ids.count(bos) == 1
    # A prompt that already starts with bos (as chat templates often render it) gets no second one.
    ids2, _ = encode_example(tok, tok.cls_token + prompt, "positive", 64)
    assert ids2 == ids


def test_truncation_keeps_the_response_and_the_prompt_ends(tok):
    bos, eos = special_ids(tok)
    long_input = " ".join(["word"] * 500)
    prompt = render_prompt(tok, "repeat the last word.", long_input + " zebra", "alpaca")
    marker = tok("zebra\n\n### Response:\n", add_special_tokens=False)["input_ids"]
    head = tok("### Instruction:\nrepeat the last word.", add_special_tokens=False)["input_ids"]
    for max_length in (24, 32, 48):
        ids, labels = encode_example(tok, prompt, "zebra", max_length)
        response = [*tok("zebra", add_special_tokens=False)["input_ids"], eos]
        assert len(ids) == max_length and ids[-len(response):] == response == labels[-len(response):]
        prompt_ids = ids[: len(ids) - len(response)]
        assert prompt_ids[0] == bos and prompt_ids[1: 1 + 5] == head[:5] and prompt_ids[-len(marker):] == marker
    # A long response keeps at least half the budget; the prompt ends (marker) survive.
    ids, labels = encode_example(tok, prompt, long_input, 32)
    kept = [lab for lab in labels if lab != IGNORE_INDEX]
    assert len(ids) == 32 and len(kept) == 16 and ids[15] == tok.convert_tokens_to_ids(":")
    ids, labels = encode_example(tok, "short prompt", long_input, 32)
    assert len(ids) == 32 and labels[:3] == [IGNORE_INDEX] * 3 and len([x for x in labels if x != IGNORE_INDEX]) == 29
    assert encode_example(tok, prompt, "zebra", 1)[1] == [tok("zebra", add_special_tokens=False)["input_ids"][0]]


def test_encode_prompt_leaves_room_for_generation(tok):
    prompt = render_prompt(tok, "repeat the last word.", " ".join(["word"] * 300) + " zebra", "alpaca")
    ids = encode_prompt(tok, prompt, max_length=48, reserve=16)
    assert len(ids) == 32 and ids[0] == special_ids(tok)[0]
    assert ids[-8:] == tok("word word zebra\n\n### Response:\n", add_special_tokens=False)["input_ids"]
    short = render_prompt(tok, "hi", "", "alpaca")
    assert encode_prompt(tok, short, 48, 16) == encode_example(tok, short, "x", 48)[0][:-2]
    with pytest.raises(ValueError, match="cannot reserve 48 new tokens in max_length = 48"):
        encode_prompt(tok, short, 48, 48)

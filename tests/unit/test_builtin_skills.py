"""The built-in "skills" instruction task: deterministic, balanced, multi-word answers that follow from the prompt
and fit SmolLM2's chat template; routing by data.builtin.task; category errors."""

from __future__ import annotations

import re

import pytest

from fedpeft.causal_lm import score_texts
from fedpeft.config import BuiltinDataConfig, DataConfig
from fedpeft.data import DataError, builtin, load_instructions
from fedpeft.data import builtin_instructions as words
from fedpeft.data import builtin_skills as bs
from fedpeft.data.prompts import IGNORE_INDEX, encode_example, render_prompt

NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december"]
# Written out here (not taken from the generator) for the answer checks.
SPOT_PLURALS = {"child": "children", "mouse": "mice", "box": "boxes", "city": "cities", "leaf": "leaves",
                "sheep": "sheep", "potato": "potatoes", "cat": "cats"}
SPOT_OPPOSITES = {"hot": "cold", "cold": "hot", "big": "small", "early": "late", "asleep": "awake"}


@pytest.fixture(scope="module")
def smollm2_tok():
    from fedpeft.models import load_tokenizer
    from fedpeft.app.recipe import validate

    tok = load_tokenizer(validate({"model": {"kind": "causal-lm"}}).model)
    assert tok.chat_template  # the prompts below are rendered with it (template auto -> chat)
    return tok


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return list(bs.generate(1400, seed=2))


def _items(text: str) -> list[str]:
    """'a, b and c' -> [a, b, c]."""
    return re.split(r", | and ", text)


def _listed_words(row: dict) -> list[str]:
    # Inline phrasings end with "of <list>?" or "of <list>."; the others carry the list as the input.
    return _items(row["input"] or re.search(r" of (.+)[?.]$", row["instruction"]).group(1))


def _expected(row: dict) -> str:
    """The answer recomputed from the prompt alone."""
    cat, instruction, inp = row["category"], row["instruction"], row["input"]
    if cat == "count":
        a, b = re.search(r"(\w+) to (\w+)", instruction).groups()
        i, j = NUMBERS.index(a), NUMBERS.index(b)
        return " ".join(NUMBERS[i:j + 1] if i <= j else NUMBERS[j:i + 1][::-1])
    if cat == "next":
        k, unit, w = re.search(r"(two|three) (days|months) .*?(?:after|follow) (\w+)", instruction).groups()
        seq = DAYS if unit == "days" else MONTHS
        i = seq.index(w)
        return " ".join(seq[(i + n) % len(seq)] for n in range(1, NUMBERS.index(k) + 2))
    if cat == "opposites":
        pairs = dict(words.ANTONYMS) | {b: a for a, b in words.ANTONYMS}
        return bs.join_and([pairs[w] for w in _listed_words(row)])
    if cat == "plurals":
        return bs.join_and([dict(words.PLURALS)[w] for w in _listed_words(row)])
    if cat == "reverse":
        return " ".join(inp.split()[::-1])
    if cat == "question":
        tokens = inp.rstrip(".").split()
        i = next(n for n, t in enumerate(tokens) if t in ("is", "was", "can", "will"))
        return " ".join([tokens[i], *tokens[:i], *tokens[i + 1:]]) + "?"
    # review: the adjective's polarity, flipped by a negator; the topic of the last noun before the adjective
    tokens = re.findall(r"[a-z]+", inp)
    adj = next(n for n, t in enumerate(tokens) if t in builtin.POSITIVE or t in builtin.NEGATIVE)
    positive = (tokens[adj] in builtin.POSITIVE) != (tokens[adj - 1] in builtin.NEGATORS)
    noun = [t for t in tokens[:adj] if any(t in nouns for nouns in builtin.DOMAINS.values())][-1]
    domain = next(d for d, nouns in builtin.DOMAINS.items() if noun in nouns)
    return f"{'positive' if positive else 'negative'}, about {bs.TOPICS[domain]}"


def test_deterministic_balanced_and_both_prompt_shapes():
    a, b = bs.generate(700, seed=3), bs.generate(700, seed=3)
    assert a.column_names == ["instruction", "input", "output", "category"]
    assert a.to_dict() == b.to_dict()
    assert bs.generate(700, seed=4)["output"] != a["output"]
    counts = {c: list(a["category"]).count(c) for c in bs.CATEGORIES}
    assert 5 <= len(bs.CATEGORIES) <= 8 and set(counts.values()) == {100}
    assert "" in a["input"] and any(a["input"])
    for cat in ("opposites", "plurals"):  # these are asked both inline and with an input
        shapes = {bool(r["input"]) for r in a if r["category"] == cat}
        assert shapes == {True, False}


def test_answers_are_lowercase_and_multi_word(rows):
    for r in rows:
        assert r["output"] == r["output"].lower().strip()
        assert 2 <= len(r["output"].split()) <= 6, r


def test_every_answer_follows_from_its_prompt(rows):
    seen = set()
    for r in rows:
        assert r["output"] == _expected(r), r
        seen.add(r["category"])
        if r["category"] == "plurals":
            for w, p in zip(_listed_words(r), _items(r["output"])):
                assert SPOT_PLURALS.get(w, p) == p
        if r["category"] == "opposites":
            for w, o in zip(_listed_words(r), _items(r["output"])):
                assert SPOT_OPPOSITES.get(w, o) == o
    assert seen == set(bs.CATEGORIES)
    outputs = {r["output"] for r in rows}
    assert {"positive, about a restaurant", "negative, about electronics"} <= outputs
    # Sequences wrap; counts go both ways.
    assert any(r["category"] == "next" and "january" in r["output"].split()[1:] for r in rows)
    assert any(r["category"] == "count" and NUMBERS.index(r["output"].split()[0]) >
               NUMBERS.index(r["output"].split()[-1]) for r in rows)
    # Negated reviews occur and flip the adjective's polarity.
    negated_bad = [r for r in rows if r["category"] == "review"
                   and re.search(rf"\b(not|never) ({'|'.join(builtin.NEGATIVE)})\b", r["input"])]
    assert negated_bad and all(r["output"].startswith("positive") for r in negated_bad)


def test_a_partly_right_answer_scores_partial_rouge_but_no_exact_match():
    s = score_texts(["positive, about travel", "children, boxes and citys", "cloud lemon tower"],
                    ["negative, about travel", "children, boxes and cities", "tower lemon cloud"])
    assert 0.3 < s["rouge_l"] < 0.9 and s["exact_match"] == 0.0


def test_examples_fit_96_tokens_under_the_smollm2_chat_template(smollm2_tok, rows):
    longest, answer_max = 0, 0
    for r in rows[:700]:
        prompt = render_prompt(smollm2_tok, r["instruction"], r["input"], "auto")
        assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
        ids, labels = encode_example(smollm2_tok, prompt, r["output"], 10**6)
        longest = max(longest, len(ids))
        answer_max = max(answer_max, sum(lab != IGNORE_INDEX for lab in labels) - 1)
    assert longest <= 96 and answer_max <= 8  # model.max_length = 96 and eval.max_new_tokens = 8 hold them


def test_category_subset_and_unknown_categories():
    ds = bs.generate(40, seed=0, categories=["reverse", "count", "reverse"])
    assert set(ds["category"]) == {"reverse", "count"} and list(ds["category"]).count("count") == 20
    assert set(bs.generate(12, seed=0, categories=["review"], num_domains=1)["output"]) <= {
        "positive, about a restaurant", "negative, about a restaurant"}
    with pytest.raises(ValueError, match=r"unknown categories \['colour'\] for data.builtin.task = 'skills'.*"
                                         r"allowed: count, next, opposites, plurals, reverse, question, review"):
        bs.generate(10, seed=0, categories=["count", "colour"])


def test_data_builtin_task_routes_and_checks_categories():
    assert BuiltinDataConfig().task == "skills"
    skills = load_instructions(DataConfig(builtin=BuiltinDataConfig(num_train=70, num_test=14)), seed=1)
    assert set(skills.train["category"]) == set(bs.CATEGORIES)
    old = load_instructions(DataConfig(builtin=BuiltinDataConfig(task="words", num_train=60, num_test=12)), seed=1)
    assert set(old.train["category"]) == set(words.CATEGORIES)
    with pytest.raises(DataError, match=r"unknown categories \['antonym'\] for data.builtin.task = 'skills' "
                                        r"\(allowed: count.*\); those are categories of data.builtin.task = 'words'"):
        load_instructions(DataConfig(builtin=BuiltinDataConfig(categories=["count", "antonym"])), seed=0)
    with pytest.raises(DataError, match=r"unknown categories \['reverse'\] for data.builtin.task = 'words' "
                                        r"\(allowed: sentiment, topic.*\); those are categories of .*'skills'"):
        load_instructions(DataConfig(builtin=BuiltinDataConfig(task="words", categories=["reverse"])), seed=0)
    with pytest.raises(ValueError, match="skills.*words"):
        BuiltinDataConfig(task="sentences")

"""The built-in offline "skills" task: seven small text transformations with graded multi-word answers.

`data.builtin.task = "skills"` (the default). Each example is an instruction (several phrasings per
category), an optional input and a lowercase answer of 2-6 words with a single right form, in one of
these categories:

- `count`: count up or down between two number words ("count from four to seven" -> "four five six
  seven"), one to twenty, 2-6 numbers,
- `next`: the next two or three days or months after a given one, wrapping ("the three days after
  saturday" -> "sunday monday tuesday"),
- `opposites`: the antonyms of two or three words, in order ("hot, big and early" -> "cold, small and
  late"; the word pairs of `builtin_instructions.ANTONYMS`, asked both ways),
- `plurals`: the plurals of two or three nouns ("child, box and city" -> "children, boxes and cities",
  regular and irregular),
- `reverse`: a list of three to five words in reverse order ("lemon tower spoon" -> "spoon tower lemon"),
- `question`: a statement turned into a yes/no question by fronting its auxiliary ("the train was late."
  -> "was the train late?"),
- `review`: a review from the built-in classification task (`fedpeft.data.builtin`) -> its sentiment and
  topic ("positive, about a restaurant"); negation flips the adjective ("the battery was not terrible").

Unlike the one-word `words` task (`builtin_instructions`), a partly right answer (one wrong plural, the
right topic with the wrong sentiment, a list half reversed) earns partial Rouge-L but no exact match,
so the two metrics differ. A pretrained instruct model does not answer in these terse forms zero-shot
(it explains, or writes the list in another shape), while a LoRA adapter picks the forms up within a
few hundred steps. Prompts with and without an input block both occur; categories are equally
frequent, and the `category` column lets partitioners give clients skewed mixes of skills. Prompt +
answer fit in 96 tokens under SmolLM2's chat template (system prompt included; 40-66 tokens, median 49),
and every answer in 8 tokens, so `model.max_length = 96` and `eval.max_new_tokens = 8` hold them all.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset, Features, Value

from fedpeft.data import builtin
from fedpeft.data.builtin_instructions import ANTONYMS, LIST_WORDS, PLURALS, SEQUENCES, check_categories
from fedpeft.data.builtin_instructions import pick as _pick

CATEGORIES = ["count", "next", "opposites", "plurals", "reverse", "question", "review"]

NUMBERS = SEQUENCES[2][0]  # one .. twenty
DAYS, MONTHS = SEQUENCES[0][0], SEQUENCES[1][0]
COUNT_WORDS = {2: "two", 3: "three"}
# Sentences for `question`: a subject, an auxiliary and a predicate that fits both (people and animals, things).
SUBJECTS = {
    "alive": ["the dog", "my sister", "our teacher", "the baby", "her brother", "my friend", "their cat", "the pilot"],
    "thing": ["the train", "your phone", "the soup", "the shop", "his car", "the door", "the film", "the bus"],
}
PREDICATES = {
    "alive": {"is": ["hungry", "asleep", "at home", "late", "ready", "tired", "happy"],
              "was": ["hungry", "asleep", "at home", "late", "ready", "tired", "happy"],
              "can": ["swim", "see us", "help them", "wait here", "run fast", "hear you"],
              "will": ["come back", "be fine", "leave soon", "win again", "get better", "call you"]},
    "thing": {"is": ["broken", "open", "late", "ready", "too loud", "very old", "on time", "too hot"],
              "was": ["broken", "open", "late", "ready", "too loud", "very old", "on time", "too hot"],
              "can": ["wait", "be fixed", "stay open", "go faster"],
              "will": ["stay open", "arrive today", "be ready soon", "work again"]},
}

# Phrasings: "input" ones take the item as the input; "inline" ones carry it in the instruction.
PHRASES: dict[str, dict[str, list[str]]] = {
    "count": {"inline": [
        "count from {a} to {b} in words.", "write the numbers from {a} to {b} as words.",
        "list the numbers {a} to {b}, spelled out.", "spell out every number from {a} to {b}.",
    ]},
    "next": {"inline": [
        "name the {k} {unit} after {w}.", "which {k} {unit} follow {w}?", "list the next {k} {unit} after {w}.",
        "what are the {k} {unit} that come after {w}?",
    ]},
    "opposites": {
        "input": ["give the opposite of each word.", "write the antonyms of these words.",
                  "replace every word with its opposite."],
        "inline": ["what are the opposites of {w}?", "give the antonyms of {w}.", "name the opposites of {w}."],
    },
    "plurals": {
        "input": ["give the plural of each noun.", "write these nouns in the plural.", "what are the plurals?"],
        "inline": ["what are the plurals of {w}?", "write the plurals of {w}.", "give the plural forms of {w}."],
    },
    "reverse": {"input": [
        "reverse the order of the words.", "write these words backwards, last word first.",
        "list the words in reverse order.", "say the words from the last one to the first.",
    ]},
    "question": {"input": [
        "turn this sentence into a yes or no question.", "rewrite the statement as a question.",
        "make this a yes/no question.", "ask this as a question.",
    ]},
    "review": {"input": [
        "give the sentiment and topic.", "sentiment and topic of the review?", "name its sentiment and topic.",
        "classify: sentiment, then topic.",
    ]},
}
TOPICS = {"restaurant": "a restaurant", "electronics": "electronics", "travel": "travel"}


def _check(categories: list[str] | None) -> list[str]:
    return check_categories(categories, CATEGORIES, "skills")


def _sample(rng: np.random.Generator, items: list, size: int) -> list:
    return [items[int(i)] for i in rng.choice(len(items), size=size, replace=False)]


def join_and(words: list[str]) -> str:
    """'a, b and c' (two words: 'a and b')."""
    return ", ".join(words[:-1]) + f" and {words[-1]}"


def _listed(rng: np.random.Generator, category: str, words: list[str]) -> tuple[str, str]:
    """(instruction, input) asking about a word list: inline in the instruction or as the input, at random."""
    if rng.random() < 0.5:
        return _pick(rng, PHRASES[category]["inline"]).format(w=join_and(words)), ""
    return _pick(rng, PHRASES[category]["input"]), join_and(words)


def _count(rng: np.random.Generator) -> tuple[str, str, str]:
    size = int(rng.integers(2, 7))
    start = int(rng.integers(len(NUMBERS) - size + 1))
    run = NUMBERS[start:start + size]
    if rng.random() < 0.5:
        run = run[::-1]
    return _pick(rng, PHRASES["count"]["inline"]).format(a=run[0], b=run[-1]), "", " ".join(run)


def _next(rng: np.random.Generator) -> tuple[str, str, str]:
    seq, unit = (DAYS, "days") if rng.random() < 0.5 else (MONTHS, "months")
    k = int(rng.integers(2, 4))
    i = int(rng.integers(len(seq)))
    following = [seq[(i + j) % len(seq)] for j in range(1, k + 1)]
    instruction = _pick(rng, PHRASES["next"]["inline"]).format(k=COUNT_WORDS[k], unit=unit, w=seq[i])
    return instruction, "", " ".join(following)


def _pairs(rng: np.random.Generator, category: str, pairs: list[tuple[str, str]], both_ways: bool):
    chosen = _sample(rng, pairs, int(rng.integers(2, 4)))
    if both_ways:
        chosen = [(b, a) if rng.random() < 0.5 else (a, b) for a, b in chosen]
    instruction, inp = _listed(rng, category, [a for a, _ in chosen])
    return instruction, inp, join_and([b for _, b in chosen])


def _reverse(rng: np.random.Generator) -> tuple[str, str, str]:
    words = _sample(rng, LIST_WORDS, int(rng.integers(3, 6)))
    return _pick(rng, PHRASES["reverse"]["input"]), " ".join(words), " ".join(words[::-1])


def _question(rng: np.random.Generator) -> tuple[str, str, str]:
    kind = _pick(rng, list(SUBJECTS))
    subject, aux = _pick(rng, SUBJECTS[kind]), _pick(rng, list(PREDICATES[kind]))
    predicate = _pick(rng, PREDICATES[kind][aux])
    return (_pick(rng, PHRASES["question"]["input"]), f"{subject} {aux} {predicate}.",
            f"{aux} {subject} {predicate}?")


def generate(num_examples: int, seed: int, categories: list[str] | None = None, num_domains: int = 3,
             negation_rate: float = 0.3) -> Dataset:
    """Generate `num_examples` instruction / input / output / category records deterministically from `seed`."""
    cats = _check(categories)
    rng = np.random.default_rng(seed)
    # Equal category counts (within one), in seeded order.
    order = [cats[i] for i in rng.permutation(np.resize(np.arange(len(cats)), num_examples))]
    reviews = builtin.generate(order.count("review"), int(rng.integers(2**63)), num_domains, negation_rate)
    review_texts, review_labels = list(reviews["text"]), list(reviews["label"])
    domains = list(builtin.DOMAINS)[:num_domains]
    rows: dict[str, list[str]] = {"instruction": [], "input": [], "output": [], "category": []}
    next_review = 0
    for category in order:
        if category == "review":
            # Review labels are 2 * domain + (0 positive, 1 negative), as in builtin.label_names.
            text, label = review_texts[next_review], review_labels[next_review]
            next_review += 1
            output = f"{('positive', 'negative')[label % 2]}, about {TOPICS[domains[label // 2]]}"
            instruction, inp = _pick(rng, PHRASES["review"]["input"]), text
        elif category == "count":
            instruction, inp, output = _count(rng)
        elif category == "next":
            instruction, inp, output = _next(rng)
        elif category == "opposites":
            instruction, inp, output = _pairs(rng, category, ANTONYMS, both_ways=True)
        elif category == "plurals":
            instruction, inp, output = _pairs(rng, category, PLURALS, both_ways=False)
        elif category == "reverse":
            instruction, inp, output = _reverse(rng)
        else:
            instruction, inp, output = _question(rng)
        rows["instruction"].append(instruction)
        rows["input"].append(inp)
        rows["output"].append(output)
        rows["category"].append(category)
    features = Features({k: Value("string") for k in rows})
    return Dataset.from_dict(rows, features=features)

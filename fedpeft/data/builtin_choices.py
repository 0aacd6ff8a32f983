"""The built-in offline multiple-choice set: short English word-knowledge questions with 2 or 4 choices.

Generated deterministically from a seed, in six categories of equal frequency:

- `antonym`: "What is the opposite of hot?" -> cold, among three words from other antonym pairs,
- `plural`: "What is the plural of mouse?" -> mice, among regular-looking wrong forms (mouses, mousees, ...),
- `successor`: the day, month or number after a given one, among its neighbours in the sequence,
- `odd-word`: name an animal (or a fruit): the right word among three objects,
- `arithmetic`: "What is three plus four?" in words, among the nearby numbers,
- `sentiment`: a review from the built-in review task -> positive / negative (two choices; negation included).

The word lists are those of the one-word-answer instruction task (`fedpeft.data.builtin_instructions`),
so fine-tuning on it moves these scores; answers are lowercase as its answers are. Each
choice is scored as the whole answer to the question (see `fedpeft.multiple_choice`). The question
does not list its choices: SmolLM2-135M-Instruct then tends to pick by position (listed choices:
mc_accuracy 0.27-0.38 on 96 questions, about chance; not listed: 0.50). Choice order is shuffled.
"""

from __future__ import annotations

import numpy as np

from fedpeft.data import builtin
from fedpeft.data.builtin_instructions import ANTONYMS, LIST_WORDS, PLURALS, SEQUENCES
from fedpeft.data.question import Question

CATEGORIES = ["antonym", "plural", "successor", "odd-word", "arithmetic", "sentiment"]

ANIMALS = ["horse", "tiger", "rabbit", "dog", "cat", "sheep", "wolf", "mouse", "lion", "cow", "duck", "goat",
           "bear", "fox", "frog", "snake"]
FRUITS = ["apple", "banana", "orange", "grape", "pear", "cherry", "lemon", "peach", "mango", "plum", "melon",
          "strawberry"]
# Objects only: no animal, fruit or other food, so each odd-word question has one right answer.
OBJECTS = [w for w in LIST_WORDS if w not in {*ANIMALS, *FRUITS, "pepper", "doctor", "music", "cloud", "forest",
                                              "desert", "mountain", "island", "river", "planet", "flower", "garden"}]
NUMBERS = ["zero", *SEQUENCES[2][0]]  # zero .. twenty
_SEQUENCE_NAMES = ("day", "month", "number")

PHRASES: dict[str, list[str]] = {
    "antonym": ["What is the opposite of {w}?", "Which word means the opposite of {w}?"],
    "plural": ["What is the plural of {w}?", "One {w}, two what?"],
    "successor": ["Which {kind} comes after {w}?", "What is the {kind} right after {w}?"],
    "odd-word": ["Name {kind}.", "Give one example of {kind}."],
    "arithmetic": ["What is {a} {op} {b}?", "How much is {a} {op} {b}?"],
    "sentiment": ["Is this review positive or negative?", "What is the sentiment of this review?"],
}


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def _others(rng: np.random.Generator, pool: list[str], exclude: set[str], k: int) -> list[str]:
    """`k` distinct words of `pool` outside `exclude`, in seeded order."""
    candidates = sorted(set(pool) - exclude)
    return [candidates[int(i)] for i in rng.choice(len(candidates), size=k, replace=False)]


def _antonym(rng: np.random.Generator) -> tuple[str, str, list[str]]:
    a, b = _pick(rng, ANTONYMS)
    word, answer = (b, a) if rng.random() < 0.5 else (a, b)
    pool = [w for pair in ANTONYMS for w in pair]
    return _pick(rng, PHRASES["antonym"]).format(w=word), answer, _others(rng, pool, {word, answer}, 3)


def _wrong_plurals(word: str) -> list[str]:
    forms = [word + "s", word + "es", word + "en", word]
    if word.endswith("y"):
        forms.append(word[:-1] + "ies")
    if word.endswith(("f", "fe")):
        forms.append(word.rsplit("f", 1)[0] + "ves")
    return forms


def _plural(rng: np.random.Generator) -> tuple[str, str, list[str]]:
    word, answer = _pick(rng, PLURALS)
    wrong = [w for w in dict.fromkeys(_wrong_plurals(word)) if w != answer]
    return _pick(rng, PHRASES["plural"]).format(w=word), answer, _others(rng, wrong, set(), 3)


def _successor(rng: np.random.Generator) -> tuple[str, str, list[str]]:
    k = int(rng.integers(len(SEQUENCES)))
    seq, cyclic = SEQUENCES[k]
    n = len(seq)
    i = int(rng.integers(1, n - 2)) if not cyclic else int(rng.integers(n))
    answer = seq[(i + 1) % n]
    # Near misses: the one before, the one two after, and one more of the sequence.
    near = [seq[(i - 1) % n], seq[(i + 2) % n]]
    rest = _others(rng, seq, {seq[i], answer, *near}, 1)
    question = _pick(rng, PHRASES["successor"]).format(kind=_SEQUENCE_NAMES[k], w=seq[i])
    return question, answer, near + rest


def _odd_word(rng: np.random.Generator) -> tuple[str, str, list[str]]:
    animal = rng.random() < 0.5
    answer = _pick(rng, ANIMALS if animal else FRUITS)
    kind = "an animal" if animal else "a fruit"
    return _pick(rng, PHRASES["odd-word"]).format(kind=kind), answer, _others(rng, OBJECTS, set(), 3)


def _arithmetic(rng: np.random.Generator) -> tuple[str, str, list[str]]:
    if rng.random() < 0.5:
        a, b = (int(x) for x in rng.integers(1, 11, size=2))
        op, value = "plus", a + b
    else:
        a = int(rng.integers(4, 21))
        b = int(rng.integers(1, a))
        op, value = "minus", a - b
    near = [v for v in (value - 3, value - 2, value - 1, value + 1, value + 2, value + 3) if 0 <= v < len(NUMBERS)]
    wrong = [NUMBERS[v] for v in near]
    question = _pick(rng, PHRASES["arithmetic"]).format(a=NUMBERS[a], op=op, b=NUMBERS[b])
    return question, NUMBERS[value], _others(rng, wrong, set(), 3)


_MAKERS = {"antonym": _antonym, "plural": _plural, "successor": _successor, "odd-word": _odd_word,
           "arithmetic": _arithmetic}


def generate(num_questions: int, seed: int, categories: list[str] | None = None) -> list[Question]:
    """`num_questions` questions, deterministically from `seed`; categories equally frequent (within one)."""
    cats = list(dict.fromkeys(categories or CATEGORIES))
    unknown = [c for c in cats if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown multiple-choice categories {unknown} (allowed: {', '.join(CATEGORIES)})")
    rng = np.random.default_rng(seed)
    order = [cats[i] for i in rng.permutation(np.resize(np.arange(len(cats)), num_questions))]
    n_reviews = order.count("sentiment")
    reviews = builtin.generate(max(n_reviews, 1), int(rng.integers(2**63)))
    texts, labels = list(reviews["text"]), list(reviews["label"])
    out: list[Question] = []
    next_review = 0
    for category in order:
        if category == "sentiment":
            # Review labels are 2 * domain + (0 positive, 1 negative), as in builtin.label_names.
            answer = ("positive", "negative")[labels[next_review] % 2]
            question = f"{_pick(rng, PHRASES['sentiment'])}\n\n{texts[next_review]}"
            next_review += 1
            choices = ["positive", "negative"]
        else:
            question, answer, wrong = _MAKERS[category](rng)
            choices = [answer, *wrong]
            rng.shuffle(choices)
        out.append(Question(question, tuple(choices), choices.index(answer), category))
    return out

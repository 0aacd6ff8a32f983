"""The built-in offline instruction task: six kinds of short questions with one-word answers.

Each example is an instruction (several phrasings per kind), an optional input and a short
lowercase answer, in one of these categories:

- `sentiment`: a review from the built-in classification task (`fedpeft.data.builtin`) -> "positive"
  or "negative"; negation flips the adjective's polarity ("the battery was not terrible" is positive),
- `topic`: such a review -> its domain ("restaurant", "electronics", "travel"),
- `antonym`: a common word -> its opposite (a fixed list of pairs, asked both ways),
- `successor`: a day of the week, a month or a number word -> the next one,
- `last-word`: a short list of words -> its last word,
- `plural`: a noun -> its plural (regular and irregular).

Half of the word questions carry the word in the instruction itself and have no input, so both
prompt shapes (with and without an input block) occur. Categories are equally frequent, and the
`category` column lets partitioners give clients skewed mixes of skills. Everything is short:
prompt + answer fit in 48 WordPiece tokens with the Alpaca template (the default model.max_length),
so a small pretrained model with a LoRA adapter learns the word skills within minutes, while
negated sentiment stays harder.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset, Features, Value

from fedpeft.data import builtin

CATEGORIES = ["sentiment", "topic", "antonym", "successor", "last-word", "plural"]

# Every word occurs in one pair only, so each question has a single right answer in both directions.
ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"),
    ("happy", "sad"), ("open", "closed"), ("light", "dark"), ("old", "young"), ("high", "low"),
    ("early", "late"), ("rich", "poor"), ("hard", "soft"), ("long", "short"), ("wet", "dry"),
    ("full", "empty"), ("strong", "weak"), ("true", "false"), ("left", "right"), ("inside", "outside"),
    ("win", "lose"), ("love", "hate"), ("black", "white"), ("push", "pull"), ("buy", "sell"),
    ("first", "last"), ("thick", "thin"), ("wide", "narrow"), ("clean", "dirty"), ("easy", "difficult"),
    ("north", "south"), ("east", "west"), ("top", "bottom"), ("front", "back"), ("before", "after"),
    ("alive", "dead"), ("loud", "quiet"), ("sweet", "sour"), ("friend", "enemy"), ("asleep", "awake"),
]
PLURALS = [
    ("cat", "cats"), ("dog", "dogs"), ("book", "books"), ("car", "cars"), ("tree", "trees"),
    ("house", "houses"), ("bird", "birds"), ("apple", "apples"), ("river", "rivers"), ("chair", "chairs"),
    ("box", "boxes"), ("bus", "buses"), ("glass", "glasses"), ("church", "churches"), ("dish", "dishes"),
    ("city", "cities"), ("baby", "babies"), ("story", "stories"), ("party", "parties"), ("potato", "potatoes"),
    ("hero", "heroes"), ("child", "children"), ("mouse", "mice"), ("goose", "geese"), ("man", "men"),
    ("woman", "women"), ("tooth", "teeth"), ("foot", "feet"), ("person", "people"), ("knife", "knives"),
    ("leaf", "leaves"), ("wolf", "wolves"), ("life", "lives"), ("ox", "oxen"), ("sheep", "sheep"),
    ("fish", "fish"), ("deer", "deer"),
]
# Cyclic sequences wrap (sunday -> monday); the numbers stop at twenty, so nineteen is the last question.
SEQUENCES: list[tuple[list[str], bool]] = [
    (["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"], True),
    (["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
      "november", "december"], True),
    (["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
      "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"], False),
]
LIST_WORDS = [
    "apple", "river", "chair", "table", "window", "garden", "pencil", "doctor", "island", "music",
    "forest", "rabbit", "ticket", "candle", "bridge", "mirror", "rocket", "violin", "pepper", "castle",
    "tiger", "planet", "jacket", "ladder", "lemon", "carpet", "engine", "spoon", "tower", "basket",
    "cloud", "desert", "horse", "kettle", "wallet", "mountain", "hammer", "camera", "flower", "pillow",
]

# Phrasings: "input" ones take the item as the input; "inline" ones carry it as {w} and have no input.
PHRASES: dict[str, dict[str, list[str]]] = {
    "sentiment": {"input": [
        "is this review positive or negative?", "classify the sentiment of the review.",
        "what is the sentiment of this review?", "positive or negative?",
        "label the review as positive or negative.",
    ]},
    "topic": {"input": [
        "what is this review about?", "name the topic of the review.", "topic: {options}?",
        "which domain is this review from?", "about {options}?",
    ]},
    "antonym": {
        "input": ["give the opposite of the word.", "write the antonym.", "what is the opposite of this word?"],
        "inline": ["what is the opposite of {w}?", "give the antonym of {w}.", "the opposite of {w} is what?"],
    },
    "successor": {
        "input": ["what comes next?", "name the one that follows.", "give the next item in the sequence."],
        "inline": ["what comes after {w}?", "which one follows {w}?", "name the one right after {w}."],
    },
    "last-word": {"input": [
        "repeat the last word.", "which word comes last in the list?", "say the final word of the list.",
        "copy the last word of the input.",
    ]},
    "plural": {
        "input": ["give the plural of the noun.", "write this word in the plural.", "what is the plural form?"],
        "inline": ["what is the plural of {w}?", "write the plural of {w}.", "one {w}, two what?"],
    },
}


def check_categories(categories: list[str] | None, allowed: list[str], task: str) -> list[str]:
    """The chosen categories in order without repeats (all when none are chosen); unknown ones are named."""
    chosen = list(allowed) if not categories else list(categories)
    unknown = [c for c in chosen if c not in allowed]
    if unknown:
        raise ValueError(f"unknown categories {unknown} for data.builtin.task = '{task}' (data.builtin.categories; "
                         f"allowed: {', '.join(allowed)})")
    return list(dict.fromkeys(chosen))


def _check(categories: list[str] | None) -> list[str]:
    return check_categories(categories, CATEGORIES, "words")


def pick(rng: np.random.Generator, items: list):
    """One item of `items`, drawn by `rng`."""
    return items[int(rng.integers(len(items)))]


_pick = pick


def _word_question(rng: np.random.Generator, category: str, word: str) -> tuple[str, str]:
    """(instruction, input) asking about `word`: inline in the instruction or as the input, at random."""
    if rng.random() < 0.5:
        return _pick(rng, PHRASES[category]["inline"]).format(w=word), ""
    return _pick(rng, PHRASES[category]["input"]), word


def _pair_item(rng: np.random.Generator, pairs: list[tuple[str, str]], both_ways: bool) -> tuple[str, str]:
    a, b = _pick(rng, pairs)
    return (b, a) if both_ways and rng.random() < 0.5 else (a, b)


def _successor_item(rng: np.random.Generator) -> tuple[str, str]:
    seq, cyclic = _pick(rng, SEQUENCES)
    i = int(rng.integers(len(seq) if cyclic else len(seq) - 1))
    return seq[i], seq[(i + 1) % len(seq)]


def generate(num_examples: int, seed: int, categories: list[str] | None = None, num_domains: int = 3,
             negation_rate: float = 0.3) -> Dataset:
    """Generate `num_examples` instruction / input / output / category records deterministically from `seed`."""
    cats = _check(categories)
    rng = np.random.default_rng(seed)
    # Equal category counts (within one), in seeded order.
    order = [cats[i] for i in rng.permutation(np.resize(np.arange(len(cats)), num_examples))]
    n_reviews = sum(c in ("sentiment", "topic") for c in order)
    reviews = builtin.generate(n_reviews, int(rng.integers(2**63)), num_domains, negation_rate)
    review_texts, review_labels = list(reviews["text"]), list(reviews["label"])
    domains = list(builtin.DOMAINS)[:num_domains]
    options = ", ".join(domains[:-1]) + f" or {domains[-1]}" if len(domains) > 1 else domains[0]
    rows: dict[str, list[str]] = {"instruction": [], "input": [], "output": [], "category": []}
    next_review = 0
    for category in order:
        if category in ("sentiment", "topic"):
            text, label = review_texts[next_review], review_labels[next_review]
            next_review += 1
            # Review labels are 2 * domain + (0 positive, 1 negative), as in builtin.label_names.
            output = ("positive", "negative")[label % 2] if category == "sentiment" else domains[label // 2]
            instruction, inp = _pick(rng, PHRASES[category]["input"]).format(options=options), text
        elif category == "last-word":
            size = int(rng.integers(3, 6))
            words = [LIST_WORDS[int(i)] for i in rng.choice(len(LIST_WORDS), size=size, replace=False)]
            instruction, inp, output = _pick(rng, PHRASES[category]["input"]), " ".join(words), words[-1]
        else:
            if category == "antonym":
                word, output = _pair_item(rng, ANTONYMS, both_ways=True)
            elif category == "plural":
                word, output = _pair_item(rng, PLURALS, both_ways=False)
            else:
                word, output = _successor_item(rng)
            instruction, inp = _word_question(rng, category, word)
        rows["instruction"].append(instruction)
        rows["input"].append(inp)
        rows["output"].append(output)
        rows["category"].append(category)
    features = Features({k: Value("string") for k in rows})
    return Dataset.from_dict(rows, features=features)

"""Multiple-choice questions for `eval.multiple_choice`: the built-in set or a user's JSONL / CSV file.

JSONL: one object per line with `question`, `choices` (a list of at least two strings) and `answer`.
CSV: a `question` column, the choices in single-letter columns `A`, `B`, `C`, ... (MMLU's shape; empty
cells at the end are dropped) or in a `choices` column holding a JSON list, and an `answer` column.
The original MMLU CSV files have no header row: a file of exactly six columns whose first row has
no `question` column is read as question, A, B, C, D, answer.

`answer` is the right choice as, in this order of precedence: the choice's text, a letter (A = the
first choice), or an index counted from 0 (a JSON integer, or a CSV cell of digits).
"""

from __future__ import annotations

import csv
import json
import string
from pathlib import Path
from typing import Any

from fedpeft.data.builtin_choices import generate
from fedpeft.data.question import Question
from fedpeft.data.sources import DataError

BUILTIN = "builtin"
MMLU_NO_HEADER = ["question", "A", "B", "C", "D", "answer"]


def load_questions(spec: str, num_questions: int, seed: int) -> list[Question]:
    """The first `num_questions` questions of `spec`: "builtin" (generated from `seed`) or a .jsonl / .csv file."""
    if spec == BUILTIN:
        return generate(num_questions, seed)
    return load_choice_file(spec)[:num_questions]


def load_choice_file(path_str: str) -> list[Question]:
    """Every question of a JSONL or CSV file; a `DataError` names the file, the line and the problem."""
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise DataError(f"eval.multiple_choice: file not found: {path} (give a .jsonl or .csv file, or 'builtin')")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise DataError(f"eval.multiple_choice: unsupported file type '{path.suffix}' for {path} (use .jsonl or .csv)")
    try:
        questions = _read_jsonl(path) if suffix == ".jsonl" else _read_csv(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason})") from None
    if not questions:
        raise DataError(f"{path}: no questions")
    return questions


def _read_jsonl(path: Path) -> list[Question]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {n} is not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {n} is not a JSON object")
        missing = [k for k in ("question", "choices", "answer") if k not in row]
        if missing:
            raise DataError(f"{path}: line {n} has no {', '.join(repr(k) for k in missing)} "
                            f"(keys: {', '.join(map(str, row)) or 'none'})")
        out.append(_question(row["question"], row["choices"], row["answer"], f"{path}: line {n}"))
    return out


def _read_csv(path: Path) -> list[Question]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DataError(f"{path}: no questions")
    header, first_line = [h.strip() for h in rows[0]], 2
    if "question" not in header and len(header) == len(MMLU_NO_HEADER):
        header, first_line = MMLU_NO_HEADER, 1
    else:
        rows = rows[1:]
    letters = []
    for letter in string.ascii_uppercase:
        if letter not in header:
            break
        letters.append(letter)
    missing = [c for c in ("question", "answer") if c not in header]
    if "choices" not in header and len(letters) < 2:
        missing.append("choices (or columns A, B, ...)")
    if missing:
        raise DataError(f"{path}: missing column {', '.join(missing)} (header: {', '.join(header)})")
    col = {name: header.index(name) for name in header}
    out = []
    for n, row in enumerate(rows, start=first_line):
        where = f"{path}: line {n}"
        cells = row + [""] * (len(header) - len(row))
        if "choices" in col and not letters:
            try:
                choices = json.loads(cells[col["choices"]])
            except json.JSONDecodeError:
                raise DataError(f"{where}: the choices column must hold a JSON list of strings, "
                                f"got {cells[col['choices']]!r}") from None
        else:
            choices = [cells[col[c]] for c in letters]
            while choices and not choices[-1].strip():
                choices.pop()
        answer: Any = cells[col["answer"]].strip()
        out.append(_question(cells[col["question"]], choices, answer, where, digits=True))
    return out


def _question(question: Any, choices: Any, answer: Any, where: str, digits: bool = False) -> Question:
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: the question must be a non-empty string, got {question!r}")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: choices must be a list of strings, got {choices!r}")
    if len(choices) < 2:
        raise DataError(f"{where}: a question needs at least 2 choices, got {len(choices)} ({choices!r})")
    if any(not c.strip() for c in choices):
        raise DataError(f"{where}: a choice is empty ({choices!r})")
    return Question(question, tuple(choices), _answer_index(answer, choices, where, digits))


def _answer_index(answer: Any, choices: list[str], where: str, digits: bool) -> int:
    """The answer as an index: the choice's text, else a letter, else an index (JSON int; CSV digits)."""
    k = len(choices)
    letters = string.ascii_uppercase[:k]
    if isinstance(answer, bool):
        pass  # JSON true/false is no index
    elif isinstance(answer, int):
        if 0 <= answer < k:
            return answer
        raise DataError(f"{where}: answer index {answer} is out of range for {k} choices (0..{k - 1})")
    elif isinstance(answer, str):
        text, texts = answer.strip(), [c.strip() for c in choices]
        if text in texts:
            return texts.index(text)
        if len(text) == 1 and text.upper() in letters:
            return letters.index(text.upper())
        if digits and text.isdigit() and int(text) < k:
            return int(text)
    raise DataError(f"{where}: answer {answer!r} is not among the choices {choices!r} "
                    f"(give the choice's text, a letter {letters[0]}-{letters[-1]} or an index 0-{k - 1})")

"""A multiple-choice question: the record the built-in set and user files both produce."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Question:
    """One question, its choices and the index of the right one."""

    question: str
    choices: tuple[str, ...]
    answer: int
    category: str = ""

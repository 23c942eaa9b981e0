"""Digit-string tasks: copying (helpful to addition), reversal and sorting (unrelated to it).

    name      group       prompt      answer
    copy      helpful     "c48213="   "48213"    the digits as given (addition writes digits out too)
    reverse   unrelated   "r48213="   "31284"    the digits in reverse order
    sort      unrelated   "s48213="   "12348"    the digits in ascending order

Strings have 3 to 6 digits. Near-misses: two adjacent different digits swapped, one digit
changed by +-1 (mod 10), or one digit dropped; never equal to the correct answer.

Shapes: no tensors here.
"""

from __future__ import annotations

import random

from drpt_ref.data.task_base import Task

MIN_DIGITS, MAX_DIGITS = 3, 6  # length range of the digit strings


def string_near_misses(truth: str) -> list[str]:
    """Every near-miss of `truth` (a digit string), sorted, truth excluded."""
    cands = set()
    for i in range(len(truth) - 1):  # adjacent swaps of different digits
        if truth[i] != truth[i + 1]:
            cands.add(truth[:i] + truth[i + 1] + truth[i] + truth[i + 2:])
    for i, ch in enumerate(truth):  # one digit +-1, one digit dropped
        for step in (-1, 1):
            cands.add(truth[:i] + str((int(ch) + step) % 10) + truth[i + 1:])
        cands.add(truth[:i] + truth[i + 1:])
    cands.discard(truth)
    return sorted(cands)


class StringTask(Task):
    """A map from a digit string to a digit string, marked by a one-letter prefix."""

    def __init__(self, name, group, description, prefix, fn):
        self.name, self.group, self.description = name, group, description
        self.prefix = prefix  # one letter that says which map to apply
        self.fn = fn  # digit string -> answer

    def make_prompt(self, rng: random.Random) -> str:
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS)))
        return f"{self.prefix}{digits}="

    def solve(self, prompt: str) -> str:
        body = prompt[len(self.prefix):-1]
        if not (prompt.startswith(self.prefix) and prompt.endswith("=") and body.isdigit()):
            raise ValueError(f"prompt={prompt!r} is not a {self.name} prompt like '{self.prefix}4821='")
        return self.fn(body)

    def near_miss(self, prompt: str, rng: random.Random) -> str:
        return rng.choice(string_near_misses(self.solve(prompt)))


def string_tasks() -> list[Task]:
    return [
        StringTask("copy", "helpful", "copy the digits", "c", lambda s: s),
        StringTask("reverse", "unrelated", "reverse the digits", "r", lambda s: s[::-1]),
        StringTask("sort", "unrelated", "sort the digits ascending", "s", lambda s: "".join(sorted(s))),
    ]

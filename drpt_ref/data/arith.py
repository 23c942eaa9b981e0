"""Addition tasks: the target (3-digit addition, fixed 4-digit answer) and its relatives.

    name        group        prompt        answer   what it is
    add3        target       "123+456="    "0579"   sum zero-padded to 4 digits (the fixed format)
    add2        helpful      "12+34="      "046"    2-digit addition, zero-padded to 3 digits
    carry       helpful      "7+8+1="      "16"     one column of addition with carry-in, 2 digits
    add3_rev    misaligned   "123+456="    "9750"   the target's prompts, answer digits reversed
    add3_noisy  misaligned   "123+456="    "0579"   the target's format, a fraction p_wrong wrong

The two misaligned tasks share the target's prompts, so they pull the model away from the
target's answer on exactly the target's inputs: add3_rev always (its prompts skip the 18 sums
whose padded digits are a palindrome, so its answers never pass the target's verifier), add3_noisy
on the fraction `p_wrong` of samples marked `corrupted`.

Near-misses (DPO rejected answers, the noisy task's wrong answers) are the errors a learner
makes: the sum with every carry dropped ("no-carry": 79+79= -> 048 instead of 158), half of the
time when the problem has a carry, otherwise the sum off by one in one column (+-1, +-10, +-100,
...), always in the task's own format and never equal to the true answer.

Shapes: no tensors here.
"""

from __future__ import annotations

import random

from drpt_ref.data.task_base import Task


def parse_operands(prompt: str) -> list[int]:
    """'123+456=' -> [123, 456]; raises ValueError on a prompt that is not 'a+b(+c)='."""
    if not prompt.endswith("=") or not all(part.isdigit() for part in prompt[:-1].split("+")):
        raise ValueError(f"prompt={prompt!r} is not an addition prompt of the form '12+34='")
    return [int(part) for part in prompt[:-1].split("+")]


def no_carry_sum(operands: list[int]) -> int:
    """Column-wise sum with every carry dropped: 79 + 79 -> 48 (9+9 -> 8, 7+7 -> 4)."""
    total, place = 0, 1
    width = max(len(str(x)) for x in operands)
    for _ in range(width):
        total += (sum((x // place) % 10 for x in operands) % 10) * place
        place *= 10
    return total


def wrong_sums(operands: list[int], width: int) -> list[int]:
    """Plausible wrong values of sum(operands) that fit in `width` digits, sorted, truth excluded."""
    truth = sum(operands)
    cands = {truth + s * 10**k for k in range(width) for s in (-1, 1)}
    cands.add(no_carry_sum(operands))
    return sorted(v for v in cands if v != truth and 0 <= v < 10**width)


class AddTask(Task):
    """sum of `n_terms` operands drawn from `ranges`, written with `width` digits, maybe reversed."""

    def __init__(self, name, group, description, ranges, width, reverse=False):
        self.name, self.group, self.description = name, group, description
        self.ranges = ranges  # one (low, high) inclusive range per operand
        self.width = width  # answer digits, zero-padded
        self.reverse = reverse  # write the answer least significant digit first

    def fmt(self, value: int) -> str:
        s = str(value).zfill(self.width)
        return s[::-1] if self.reverse else s

    def make_prompt(self, rng: random.Random) -> str:
        while True:
            ops = [rng.randint(lo, hi) for lo, hi in self.ranges]
            padded = str(sum(ops)).zfill(self.width)
            if not (self.reverse and padded == padded[::-1]):  # reversed == unreversed: skip
                return "+".join(map(str, ops)) + "="

    def solve(self, prompt: str) -> str:
        return self.fmt(sum(parse_operands(prompt)))

    def near_miss(self, prompt: str, rng: random.Random) -> str:
        ops = parse_operands(prompt)
        no_carry = no_carry_sum(ops)
        if no_carry != sum(ops) and rng.random() < 0.5:  # half of the time the dropped-carry error
            return self.fmt(no_carry)
        return self.fmt(rng.choice(wrong_sums(ops, self.width)))


class NoisyAddTask(AddTask):
    """The target's task and format, but a fraction `p_wrong` of shown answers are near-misses."""

    def __init__(self, name, group, description, ranges, width, p_wrong):
        super().__init__(name, group, description, ranges, width)
        if not 0.0 <= p_wrong <= 1.0:
            raise ValueError(f"p_wrong={p_wrong!r} must be a probability in [0, 1]")
        self.p_wrong = p_wrong

    def shown_answer(self, prompt: str, rng: random.Random) -> tuple[str, bool]:
        if rng.random() < self.p_wrong:
            return self.near_miss(prompt, rng), True
        return self.solve(prompt), False


P_WRONG = 0.3  # fraction of add3_noisy answers that are wrong


def arith_tasks() -> list[Task]:
    three = [(100, 999), (100, 999)]
    return [
        AddTask("add3", "target", "3-digit addition, answer zero-padded to 4 digits", three, 4),
        AddTask("add2", "helpful", "2-digit addition, answer zero-padded to 3 digits", [(10, 99)] * 2, 3),
        AddTask("carry", "helpful", "one column with carry-in: a+b+c, 2 digits", [(0, 9), (0, 9), (0, 1)], 2),
        AddTask("add3_rev", "misaligned", "the target with its answer digits reversed", three, 4, reverse=True),
        NoisyAddTask("add3_noisy", "misaligned", f"the target with {P_WRONG:.0%} wrong answers", three, 4,
                     P_WRONG),
    ]

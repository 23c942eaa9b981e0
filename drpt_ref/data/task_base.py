"""What every task of the suite is: a prompt generator, a ground truth, near-misses, and data formats.

A task is a family of short character-level problems with a *known* correct answer. Each task
subclass says three things: how to draw a prompt (`make_prompt`), what the correct answer is
(`solve`, in the task's own answer format), and how to write a plausible wrong answer
(`near_miss`). Everything else is derived here, the same way for every task:

    verify(prompt, answer)     answer == solve(prompt)                       exact verifier
    reward_exact               1.0 if verify else 0.0                         GRPO reward
    reward_partial             matching characters / max(len(answer), len(truth))   partial credit
    sft(n, seed, split)        [Sample(prompt, answer, task, group, corrupted)]
    dpo(n, seed, split)        [Pair(prompt, chosen, rejected, ...)], rejected = near_miss, never correct
    grpo(n, seed, split)       [RLPrompt(prompt, reference, ...)], reward with `task.reward(...)`

Splits. Every prompt belongs to exactly one split by a stable hash of its text: about 10% of all
possible prompts are "eval" (held out), the rest "train". A generator asked for one split
rejects prompts of the other, so held-out prompts never appear in training data of any task
(the misaligned variants of the target share its prompts, hence its split). The held-out prompts
split again, by the same hash, into two disjoint halves: "select" (to choose settings, e.g. an early
stopping step) and "report" (touched only by the numbers a reproduction reports). `seed` picks a
stream inside a split: same (task, split, seed) gives the same samples in any process.

Shapes: no tensors here; samples are frozen dataclasses of strings.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

GROUPS = ("target", "helpful", "unrelated", "misaligned")
SPLITS = ("train", "eval", "select", "report")  # select and report: the two disjoint halves of eval
EVAL_BUCKETS = 10  # a prompt is held out ("eval") when its hash is 0 modulo this: ~10% of prompts


@dataclass(frozen=True)
class Sample:
    """One SFT example; `corrupted` is True when the shown answer is deliberately wrong."""

    prompt: str
    answer: str
    task: str
    group: str
    corrupted: bool = False


@dataclass(frozen=True)
class Pair:
    """One DPO preference pair; `rejected` is a near-miss that fails the task's verifier."""

    prompt: str
    chosen: str
    rejected: str
    task: str
    group: str
    corrupted: bool = False  # chosen is itself wrong (the noisy task's corrupted fraction)


@dataclass(frozen=True)
class RLPrompt:
    """One GRPO prompt; `reference` is the correct answer its rewards compare against."""

    prompt: str
    reference: str
    task: str
    group: str


def _hash(prompt: str) -> int:
    return int(hashlib.md5(prompt.encode("utf-8")).hexdigest()[:8], 16)  # stable across processes


def split_of(prompt: str) -> str:
    """'eval' or 'train', from a hash of the prompt text that is stable across processes."""
    return "eval" if _hash(prompt) % EVAL_BUCKETS == 0 else "train"


def in_split(prompt: str, split: str) -> bool:
    """Whether `prompt` belongs to `split`; a held-out prompt is in "eval" and in one of its halves, "select"
    (the next hash digit even) or "report" (odd)."""
    h = _hash(prompt)
    if split == "train":
        return h % EVAL_BUCKETS != 0
    if h % EVAL_BUCKETS != 0:
        return False
    return split == "eval" or split == ("select" if (h // EVAL_BUCKETS) % 2 == 0 else "report")


def partial_credit(answer: str, truth: str) -> float:
    """Characters equal at the same position, over the longer of the two lengths (in [0, 1]).

    "0589" vs "0579" -> 3/4; "057" vs "0579" -> 3/4; "05790" vs "0579" -> 4/5; "" vs "0579" -> 0.
    """
    longest = max(len(answer), len(truth))
    if longest == 0:
        return 1.0
    return sum(a == t for a, t in zip(answer, truth)) / longest


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}; use 'train', or 'eval' (held out) or one of its "
                         "disjoint halves 'select' and 'report'")
    return split


def check_count(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n={n!r} must be a non-negative int (the number of samples to draw)")
    return n


class Task:
    """Base class: subclasses set `name`, `group`, `description` and define the three methods."""

    name: str = ""
    group: str = ""
    description: str = ""

    # -- to define in each task -------------------------------------------------------------------
    def make_prompt(self, rng: random.Random) -> str:
        raise NotImplementedError

    def solve(self, prompt: str) -> str:
        """The correct answer to `prompt` in this task's own format (the ground truth)."""
        raise NotImplementedError

    def near_miss(self, prompt: str, rng: random.Random) -> str:
        """A plausible wrong answer in this task's format; must differ from solve(prompt)."""
        raise NotImplementedError

    def shown_answer(self, prompt: str, rng: random.Random) -> tuple[str, bool]:
        """The answer the data shows and whether it is corrupted; the noisy task overrides this."""
        return self.solve(prompt), False

    # -- derived, the same for every task ---------------------------------------------------------
    def verify(self, prompt: str, answer: str) -> bool:
        return answer == self.solve(prompt)

    def reward_exact(self, prompt: str, completion: str) -> float:
        return 1.0 if self.verify(prompt, completion) else 0.0

    def reward_partial(self, prompt: str, completion: str) -> float:
        return partial_credit(completion, self.solve(prompt))

    def reward(self, prompt: str, completion: str, kind: str = "exact") -> float:
        """GRPO reward of one completion: kind 'exact' (0/1) or 'partial' (fraction of characters)."""
        if kind == "exact":
            return self.reward_exact(prompt, completion)
        if kind == "partial":
            return self.reward_partial(prompt, completion)
        raise ValueError(f"kind={kind!r} is not a reward kind; use 'exact' or 'partial'")

    def rng(self, seed: int, split: str, stream: str) -> random.Random:
        # a string seed is hashed by `random` deterministically (sha512), independent of PYTHONHASHSEED
        return random.Random(f"{self.name}/{split}/{seed}/{stream}")

    def prompts(self, n: int, seed: int = 0, split: str = "train") -> list[str]:
        """n prompts of `split`, drawn with replacement from this task's prompt distribution."""
        check_count(n)
        check_split(split)
        rng = self.rng(seed, split, "prompts")
        out: list[str] = []
        while len(out) < n:
            p = self.make_prompt(rng)
            if in_split(p, split):
                out.append(p)
        return out

    def sft(self, n: int, seed: int = 0, split: str = "train") -> list[Sample]:
        rng = self.rng(seed, split, "answers")
        out = []
        for p in self.prompts(n, seed, split):
            answer, corrupted = self.shown_answer(p, rng)
            out.append(Sample(p, answer, self.name, self.group, corrupted))
        return out

    def dpo(self, n: int, seed: int = 0, split: str = "train") -> list[Pair]:
        rng = self.rng(seed, split, "pairs")
        out = []
        for p in self.prompts(n, seed, split):
            chosen, corrupted = self.shown_answer(p, rng)
            rejected = self.near_miss(p, rng)
            while rejected == chosen:  # a corrupted chosen may coincide with a fresh near-miss
                rejected = self.near_miss(p, rng)
            out.append(Pair(p, chosen, rejected, self.name, self.group, corrupted))
        return out

    def grpo(self, n: int, seed: int = 0, split: str = "train") -> list[RLPrompt]:
        return [RLPrompt(p, self.solve(p), self.name, self.group) for p in self.prompts(n, seed, split)]

    def __repr__(self) -> str:
        return f"<task {self.name} ({self.group}): {self.description}>"

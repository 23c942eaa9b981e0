"""The task suite: one target task and a labelled general pool, with a known ground truth.

    group        tasks                 why it is in the pool
    target       add3                  the behaviour we want (3-digit addition, answer "0579")
    helpful      add2, carry, copy     sub-skills of the target: smaller sums, one carry column, digits
    unrelated    reverse, sort         same alphabet, nothing to do with addition
    misaligned   add3_rev, add3_noisy  the target's own prompts with a different answer format,
                                       or with a fraction of wrong answers

A method that regularizes the target with the general pool should lean on the helpful tasks,
ignore the unrelated ones and avoid the misaligned ones; every sample carries `task` and `group`
so a reader can see what a method picked. Definitions: data/arith.py, data/strings.py;
the common machinery (splits, verifiers, SFT/DPO/GRPO formats): data/task_base.py; the design:
theory/tasks.md.

    get_task("add3").sft(n, seed, split)       -> [Sample]
    general_pool(n, seed, split, kind="sft")   -> a seeded mixture of the non-target tasks

Shapes: no tensors here.
"""

from __future__ import annotations

import random

from drpt_ref.data.arith import arith_tasks
from drpt_ref.data.strings import string_tasks
from drpt_ref.data.task_base import GROUPS, SPLITS, Pair, RLPrompt, Sample, Task, check_count, check_split

TARGET = "add3"  # the name of the target task

# name -> task, in the table's order (target, helpful, unrelated, misaligned)
_ALL = {t.name: t for t in arith_tasks() + string_tasks()}
TASKS: dict[str, Task] = {k: _ALL[k] for k in
                          ("add3", "add2", "carry", "copy", "reverse", "sort", "add3_rev", "add3_noisy")}

# The general pool and its default mixture: every non-target task, equal weight.
GENERAL = tuple(name for name, t in TASKS.items() if t.group != "target")
DEFAULT_WEIGHTS = {name: 1.0 for name in GENERAL}

__all__ = ["GROUPS", "SPLITS", "TARGET", "TASKS", "GENERAL", "Sample", "Pair", "RLPrompt", "Task",
           "get_task", "task_names", "general_pool", "parse_weights"]


def task_names(spec: str) -> list[str]:
    """'all' -> every task; 'general' -> the pool; a group -> its tasks; 'a,helpful' -> a + the group."""
    if "," in spec:
        return [name for part in spec.split(",") if part.strip() for name in task_names(part.strip())]
    if spec == "all":
        return list(TASKS)
    if spec == "general":
        return list(GENERAL)
    if spec in GROUPS:
        return [name for name, t in TASKS.items() if t.group == spec]
    return [get_task(spec).name]


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task={name!r} is unknown; known tasks: {', '.join(TASKS)} "
                         f"(or 'all', 'general', or a group: {', '.join(GROUPS)})")
    return TASKS[name]


def parse_weights(spec: str) -> dict[str, float]:
    """'add2:1,copy:0.5' -> {'add2': 1.0, 'copy': 0.5}; names must be tasks, weights >= 0."""
    weights = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"weights item {item!r} must be 'task:weight', e.g. 'add2:1.0'")
        get_task(name.strip())
        w = float(value)
        if w < 0:
            raise ValueError(f"weight of {name!r} is {w}; weights must be >= 0")
        weights[name.strip()] = w
    if not weights or sum(weights.values()) <= 0:
        raise ValueError(f"weights={spec!r} must give at least one task a positive weight")
    return weights


def counts_for(n: int, weights: dict[str, float], rng: random.Random) -> dict[str, int]:
    """How many of n samples each task gets: n draws of a task with probability proportional to weight."""
    names = list(weights)
    picks = rng.choices(names, weights=[weights[k] for k in names], k=n)
    return {k: picks.count(k) for k in names}


def general_pool(n: int, seed: int = 0, split: str = "train", kind: str = "sft",
                 weights: dict[str, float] | None = None) -> list:
    """n samples of the general pool (or of any mixture `weights`), shuffled, each labelled.

    kind: 'sft' -> [Sample], 'dpo' -> [Pair], 'grpo' -> [RLPrompt]. Deterministic in (n, seed, split,
    weights); the per-task counts are random draws, so a mixture of 1000 has ~1000/8 of each task.
    """
    check_count(n)
    check_split(split)
    if kind not in ("sft", "dpo", "grpo"):
        raise ValueError(f"kind={kind!r} must be 'sft', 'dpo' or 'grpo'")
    weights = DEFAULT_WEIGHTS if weights is None else weights
    rng = random.Random(f"pool/{split}/{seed}/{kind}")
    out: list = []
    for name, count in counts_for(n, weights, rng).items():
        out.extend(getattr(get_task(name), kind)(count, seed, split))
    rng.shuffle(out)
    return out

"""The example reward function of drpt_ref/data/examples/: partial credit for the target's answer format.

    drpt train --paradigm grpo ... --reward-fn drpt_ref.data.examples.reward:sum_reward

A reward function for `drpt train --reward-fn` is any importable `f(prompt, completion) -> float`: the prompt
as the data file holds it (text, or chat messages), the completion as the model's decoded text.

Shapes: no tensors here.
"""

from __future__ import annotations

import re

from drpt_ref.data.task_base import partial_credit

SUM = re.compile(r"^(\d+)\+(\d+)=$")  # an addition prompt, "123+456="


def sum_reward(prompt, completion: str) -> float:
    """The fraction of characters of `completion` that match the prompt's sum written as the target task writes
    it (four digits, zero-padded: "123+456=" -> "0579"); 0.0 for a prompt that is not an addition of two numbers.
    In [0, 1]; 1.0 exactly for the right answer."""
    match = SUM.match(prompt) if isinstance(prompt, str) else None
    if match is None:
        return 0.0
    return partial_credit(completion, f"{int(match[1]) + int(match[2]):04d}")

"""A small data set in TRL's conventions, to try `drpt train` on files: made from the task suite.

    target.jsonl   32 rows of the target task (add3, 3-digit addition), its train split
    general.jsonl  160 rows of the general pool, each with its `source` (the suite task it came from)
    eval.jsonl     48 held-out rows of the target task (its eval split: never in the two files above)

Every row has the columns prompt, completion, chosen, rejected and source, so the same three files serve
SFT (prompt/completion), DPO (prompt/chosen/rejected; chosen == completion, rejected a near-miss) and GRPO
(prompt, with the reward function `drpt_ref.data.examples.reward:sum_reward`). Made by

    python -m drpt_ref.data.examples.make

(deterministic: the suite's seeded generators), and used by README's "Your own model and data".
"""

"""The task suite, its character tokenizer, and the sampling of completions (rollouts).

One target task and a labelled general pool with a known ground truth: the task base class
(task_base.py), arithmetic and string tasks (arith.py, strings.py), the registry (tasks.py), the
character tokenizer (tokenizer.py), and batched, seeded sampling of GRPO completions (sampling.py).
Your own data: files in TRL's conventions read into units (files.py), with any Hugging Face tokenizer
and its chat template (encode_rows.py); a small example data set made from the suite (examples/).

May import: flags.
"""

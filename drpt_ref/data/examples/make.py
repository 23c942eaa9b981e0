"""Write the example data files of drpt_ref/data/examples/ from the task suite (target, general pool, held out).

    python -m drpt_ref.data.examples.make [--out drpt_ref/data/examples]

The rows come from the suite's DPO pairs (data/task_base.py), written in TRL's column conventions:
prompt, completion (= chosen, the shown answer), chosen, rejected (a near-miss), source (the task).
Deterministic: the same files every time.

Shapes: no tensors here.
"""

from __future__ import annotations

import argparse
import json
import os

from drpt_ref.data.tasks import TARGET, general_pool, get_task

SIZES = {"target": 32, "general": 160, "eval": 48}  # rows per file


def rows(pairs) -> list[dict]:
    return [{"prompt": p.prompt, "completion": p.chosen, "chosen": p.chosen, "rejected": p.rejected,
             "source": p.task} for p in pairs]


def tables() -> dict[str, list[dict]]:
    """file stem -> rows: the target task's train split, the general pool, the target's held-out split."""
    return {"target": rows(get_task(TARGET).dpo(SIZES["target"], seed=0, split="train")),
            "general": rows(general_pool(SIZES["general"], seed=0, split="train", kind="dpo")),
            "eval": rows(get_task(TARGET).dpo(SIZES["eval"], seed=0, split="eval"))}


def write(out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    paths = []
    for stem, table in tables().items():
        paths.append(os.path.join(out, f"{stem}.jsonl"))
        with open(paths[-1], "w") as f:
            f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in table)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                        help="folder to write target.jsonl, general.jsonl, eval.jsonl to (default: this package)")
    for path in write(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()

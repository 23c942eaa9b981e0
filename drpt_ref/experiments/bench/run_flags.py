"""The command-line flags `drpt bench step` and `drpt bench comm` share: the model's shape, timed runs, threads, output.

Shapes: no tensors here.
"""

from __future__ import annotations


def add_model_run_flags(parser, timed: str) -> None:
    """The flags `bench step` and `bench comm` share: the model's shape, the timed runs, threads, output, seed.

    timed: what one timed run is (printed in --repeat's help)."""
    parser.add_argument("--sketch-dim", type=int, default=32, help="sketch Gram: projection dimension")
    parser.add_argument("--model", default="small_models/gpt2-tiny", help="folder whose config gives the shape")
    parser.add_argument("--repeat", type=int, default=3, help=f"timed {timed} (the median is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (per process)")
    parser.add_argument("--out", default=None, help="also write the tables as markdown to this file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and token batches")


def check_model_run_flags(args) -> None:
    """Refuse counts below 1 among those flags, naming the flag (a ValueError the CLI prints without a traceback)."""
    for flag in ("repeat", "threads", "sketch_dim"):
        value = getattr(args, flag)
        if value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {value}: must be >= 1.")

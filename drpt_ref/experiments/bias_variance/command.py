"""`drpt bias-variance`: the measured bias and variance of every method, on the linear or the GPT-2 problem.

Runs `run_linear` (measure.py) or `run_gpt2` (gpt2.py) along the spectrum, writes the table (.csv, .md)
and the plot (plot.py) to --out. theory/bias_variance.md derives what is measured.

Shapes: no tensors here.
"""

from __future__ import annotations

import os
from dataclasses import replace

from drpt_ref.experiments.bias_variance.gpt2 import GPT2Config, run_gpt2
from drpt_ref.experiments.bias_variance.measure import PROBLEMS, LinearConfig, run_linear
from drpt_ref.experiments.bias_variance.plot import plot_rows, write_tables


def add_arguments(parser) -> None:
    parser.add_argument("--problem", choices=PROBLEMS, default="linear", help="the controlled problem")
    parser.add_argument("--resamples", type=int, default=None, help="R target batches (linear 400, gpt2 200)")
    parser.add_argument("--points", type=int, default=9, help="positions per knob path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bias_variance",
                        help="folder for the table and the plot (default: runs/bias_variance, which git ignores)")
    parser.add_argument("--model", default="small_models/gpt2-tiny", help="gpt2 only: the model folder")


def run(args) -> int:
    if args.resamples is not None and args.resamples < 2:
        raise ValueError(f"--resamples={args.resamples} must be >= 2")
    if args.problem == "linear":
        cfg = LinearConfig(seed=args.seed)
        cfg = replace(cfg, resamples=args.resamples or cfg.resamples)
        rows, about = run_linear(cfg, args.points, progress=True), cfg
    else:
        cfg = GPT2Config(seed=args.seed, model=args.model)
        cfg = replace(cfg, resamples=args.resamples or cfg.resamples)
        rows, about = run_gpt2(cfg, args.points, progress=True)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.problem)
    text = write_tables(rows, stem, about)
    plot_rows(rows, stem + ".png", title=f"bias and variance across the spectrum ({args.problem})")
    print(text)
    print(f"written {stem}.csv, {stem}.md, {stem}.png")
    return 0

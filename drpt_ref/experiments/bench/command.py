"""`drpt bench WHAT`: one command, several benchmarks, each in its own module.

    drpt bench solvers ...   the batched solvers against exact, cvxpy and qpth   (experiments/bench/solvers.py)
    drpt bench step ...      the Dr step against the standard step, by phase      (experiments/bench/step.py)
    drpt bench comm ...      bytes and seconds in torch.distributed against W     (experiments/bench/comm.py)

Each benchmark module keeps its own `add_arguments(parser)` and `run(args)` (both take `--device`);
this file gives each an argparse sub-parser, refuses a CUDA device where there is none, and hands the
parsed arguments to the chosen module's `run`.

Shapes: no tensors here.
"""

from __future__ import annotations

import argparse
import importlib

import torch

# what -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "solvers": ("drpt_ref.experiments.bench.solvers", "the batched solvers against the exact solver, cvxpy and qpth"),
    "step": ("drpt_ref.experiments.bench.step", "time per Dr step by phase, and the ratio to the standard step"),
    "comm": ("drpt_ref.experiments.bench.comm", "bytes and seconds per Dr step in torch.distributed, against W"),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    for what, (module, help_line) in BENCHMARKS.items():  # every flag's help shows its default
        p = sub.add_parser(what, help=help_line, description=help_line,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        importlib.import_module(module).add_arguments(p)


def run(args) -> int:
    if args.what not in BENCHMARKS:
        raise ValueError(f"what={args.what!r} is unknown; use one of {sorted(BENCHMARKS)}")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here; run on CPU (the default) instead.")
        return 2
    return int(importlib.import_module(BENCHMARKS[args.what][0]).run(args) or 0)

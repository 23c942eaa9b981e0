"""`drpt bench WHAT`: one command, several benchmarks, each in its own module.

    drpt bench solvers ...   the batched solvers against exact, cvxpy and qpth   (bench_solvers.py)
    drpt bench step ...      the Dr step against the standard step, by phase      (bench_step.py)

Each benchmark module keeps its own `add_arguments(parser)` and `run(args)`; this file only gives each
an argparse sub-parser and hands the parsed arguments to the chosen module's `run`. bench_solvers
declares its own positional `what` (choice "solvers"); here the sub-parser's name plays that part,
so that positional is skipped when its arguments are added.

Shapes: no tensors here.
"""

from __future__ import annotations

import importlib

# what -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "solvers": ("drpt_ref.bench_solvers", "the batched solvers against the exact solver, cvxpy and qpth"),
    "step": ("drpt_ref.bench_step", "time per Dr step by phase, and the ratio to the standard step"),
}


class _WithoutWhat:
    """A parser proxy that drops a module's own positional `what` (the sub-parser's name replaces it)."""

    def __init__(self, parser):
        self._parser = parser

    def add_argument(self, *names, **kwargs):
        if names == ("what",):
            return None
        return self._parser.add_argument(*names, **kwargs)

    def __getattr__(self, name):
        return getattr(self._parser, name)


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    for what, (module, help_line) in BENCHMARKS.items():
        p = sub.add_parser(what, help=help_line, description=help_line)
        importlib.import_module(module).add_arguments(_WithoutWhat(p))


def run(args) -> int:
    if args.what not in BENCHMARKS:
        raise ValueError(f"what={args.what!r} is unknown; use one of {sorted(BENCHMARKS)}")
    return int(importlib.import_module(BENCHMARKS[args.what][0]).run(args) or 0)

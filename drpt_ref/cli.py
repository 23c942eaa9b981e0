"""`drpt`: the command line of drpt_ref, one subcommand per job.

Each subcommand lives in its own module, which defines `add_arguments(parser)` and
`run(args) -> int`; the table below maps the command name to that module, and the module is
imported only when its command runs (so `drpt --help` stays fast).

    drpt train / eval                                   training/train.py, training/evaluate.py
    drpt reproduce, bias-variance, spectrum, bench,     experiments/
         build-model

May import: flags, core, batched, data, losses, gram, training, experiments.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from drpt_ref.training.host_memory import retain_freed_memory

# command -> (module, one-line help). Add a line here when a new job gets a command.
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("drpt_ref.experiments.bench.command",
              "`bench solvers` (batched vs exact, cvxpy, qpth), `bench step` (Dr vs standard)"),
    "bias-variance": ("drpt_ref.experiments.bias_variance.command",
                      "measured bias and variance of each method's direction by resampling"),
    "spectrum": ("drpt_ref.experiments.spectrum.demo",
                 "every projection of the family on one synthetic problem, vs cvxpy"),
    "build-model": ("drpt_ref.experiments.build_model",
                    "pre-train small_models/gpt2-tiny from nothing (deterministic)"),
    "reproduce": ("drpt_ref.experiments.reproduce.run",
                  "the fixed comparison over seeds: endpoints, oracle, Dr vs baselines, paired verdicts, figures"),
    "train": ("drpt_ref.training.train",
              "SFT, DPO, GRPO or HPT on the task suite or your own files, each step a Dr. Post-Training projection"),
    "eval": ("drpt_ref.training.evaluate", "greedy exact-match accuracy and answer loss on held-out task prompts"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drpt",
        description="Data-Regularized Post-Training (Dr. Post-Training): reference implementation.",
        epilog="Run `drpt COMMAND --help` for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_module, help_line) in COMMANDS.items():
        sub.add_parser(name, help=help_line, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help or the "invalid choice" error and exits
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"drpt {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(rest)
    retain_freed_memory()  # host memory freed by a step stays mapped for the next (training/host_memory.py)
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # bad input: the message names the flag and the fix
        sub.error(str(err))  # prints usage and the message, exits 2 (no traceback)


if __name__ == "__main__":
    sys.exit(main())

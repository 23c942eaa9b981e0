"""`drpt`: the command line of drpt_ref, one subcommand per job.

Each subcommand lives in its own module, which defines `add_arguments(parser)` and
`run(args) -> int`; the table below maps the command name to that module, and the module is
imported only when its command runs (so `drpt --help` stays fast).

    drpt spectrum      every projection of the family on one synthetic problem, checked against cvxpy
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import io
import os
import sys
import textwrap
import tokenize

# command -> (module, one-line help). Add a line here when a new job gets a command.
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("drpt_ref.bench", "`bench solvers` (batched vs exact, cvxpy, qpth), `bench step` (Dr vs standard)"),
    "bias-variance": ("drpt_ref.bias_variance", "measured bias and variance of each method's direction by resampling"),
    "spectrum": ("drpt_ref.spectrum_demo", "every projection of the family on one synthetic problem, vs cvxpy"),
    "build-model": ("drpt_ref.build_model", "pre-train small_models/gpt2-tiny from nothing (deterministic)"),
    "reproduce": ("drpt_ref.reproduce", "every method on SFT, DPO, GRPO, HPT over seeds: tables, curves, spectrum"),
    "train": ("drpt_ref.train", "SFT, DPO or GRPO on the task suite, each step a Dr. Post-Training projection"),
    "eval": ("drpt_ref.evaluate", "greedy exact-match accuracy and answer loss on held-out task prompts"),
}


def parse_bool(text: str) -> bool:
    """The `type` of every true/false flag: refuses anything but 1/0, true/false, yes/no."""
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; use true or false")


def field_comments(cls) -> dict[str, str]:
    """The comment after each field of a config dataclass, `name: type = default  # comment`, read from
    its source: the comments are the documentation of the defaults, so `--help` shows them verbatim."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments, line_field = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        row = tok.start[0]
        if tok.type == tokenize.NAME and row not in line_field and tok.start[1] == 4:
            line_field[row] = tok.string  # a field name starts a line of the class body
        elif tok.type == tokenize.COMMENT and row in line_field:
            comments[line_field[row]] = tok.string.lstrip("# ").strip()
    return comments


def add_config_arguments(parser: argparse.ArgumentParser, cls, choices: dict | None = None) -> None:
    """One --flag-name per field of the config dataclass `cls`, typed by the field, its help the field's
    comment and its default; `choices` (field -> allowed values) lets argparse refuse a bad name."""
    comments, choices = field_comments(cls), choices or {}
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        text = f"{comments.get(f.name, '')} (default: {f.default})".replace("%", "%%")
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, type=parse_bool, nargs="?", const=True, default=f.default,
                                metavar="BOOL", help=text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type] if isinstance(f.type, str) else f.type
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=text,
                                choices=choices.get(f.name))


def check_positive_ints(config, names: tuple[str, ...]) -> None:
    """Refuse a setting among `names` of `config` (a config dataclass or an argparse namespace) that is
    not a whole number >= 1, naming its flag."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (a whole number), got {value!r}.")


def check_device(device: str) -> None:
    """Refuse a CUDA device that this torch build cannot see (torch is imported here, not at `drpt --help`)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this torch build sees no CUDA device; use --device cpu.")


def write_output(path: str, text: str) -> None:
    """Write a command's table to `path` (an --out file), creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text + "\n")


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
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # bad input: the message names the flag and the fix
        sub.error(str(err))  # prints usage and the message, exits 2 (no traceback)


if __name__ == "__main__":
    sys.exit(main())

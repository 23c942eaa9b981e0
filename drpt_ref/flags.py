"""Command-line flags shared by every `drpt` command: config dataclass -> argparse, checks that name the flag.

A command's config is a dataclass with a comment on every field; `add_config_arguments` gives each
field a `--flag-name` whose help is that comment and its default, and the checks below refuse a bad
value with the flag named, so `drpt COMMAND` prints usage and the message instead of a traceback.

May import: nothing from drpt_ref (every layer that defines a command may import this module).

Shapes: no tensors here.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import math
import os
import textwrap
import tokenize


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


def check_finite(config) -> None:
    """Refuse a float setting of `config` (a config dataclass) that is inf or nan, naming its flag."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, got {value!r}.")


def check_device(device: str) -> None:
    """Refuse a device drpt does not run on (it runs on cpu and cuda[:N]) or one this torch build cannot see
    (torch is imported here, not at `drpt --help`)."""
    kind, _, index = device.partition(":")
    if device != "cpu" and (kind != "cuda" or (index and not index.isdigit())):
        raise ValueError(f"--device {device!r}: drpt runs on 'cpu' or 'cuda' (or 'cuda:N'); use one of those.")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this torch build sees no CUDA device; use --device cpu.")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1}).")


def check_out_path(path: str, flag: str = "--out") -> None:
    """Refuse an output folder that cannot be one: an existing file, a path under a file, or a path whose
    nearest existing folder is not writable. Writes nothing."""
    if os.path.isfile(path):
        raise ValueError(f"{flag} {path!r} is a file; an output folder is needed: choose another {flag}.")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{flag} {path!r} lies under the file {probe!r}: choose another {flag}.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path!r}: the folder {probe!r} is not writable: choose another {flag}.")


def write_output(path: str, text: str) -> None:
    """Write a command's table to `path` (an --out file), creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text + "\n")

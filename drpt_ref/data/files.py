"""Units from local data files in TRL's conventions (JSONL, Parquet, CSV), read with the `datasets` library.

Post-training on one's own data needs the same three things the task suite gives (data/tasks.py): a
scarce target set, a general pool whose every example carries a source label, and held-out target
prompts. Here each comes from a file, in the column conventions of TRL's trainers:

    paradigm   columns                                        unit
    sft        prompt, completion    (or messages)            IdsSample(prompt ids, answer ids)
    dpo        prompt, chosen, rejected                       IdsPair(prompt ids, chosen ids, rejected ids)
    grpo       prompt  (+ a reward function, --reward-fn)     IdsPrompt(prompt ids, reference ids or ())

A value is text or chat messages (data/encode_rows.py). A general example's source is the column named
by --source-column (default `source`): it is what metrics.jsonl logs per general unit, so the weights by
source read as on the suite. A held-out (--eval-data) row is an IdsPrompt whose reference is its
completion (sft: `completion` or the last message; dpo: `chosen`; grpo: `completion` if present).

The units subclass the suite's Sample / Pair / RLPrompt with token ids in place of text, so every
consumer of units (the batch builders, the weight rules' anchors) serves both; the ids are encoded and
truncated once, at load (--max-length, eq. (4) in theory/own_data.md). The reward function is named by
an import path `package.module:function`, imported with importlib (never exec), and called as
f(prompt, completion) -> float, with the prompt as the file holds it (text or messages) and the
completion as decoded text.

    read_data_file(path, flag)                 -> DataFile(path, flag, table, sha256): the file read once
    read_table(path, flag)                     -> datasets.Dataset   (the format from the extension)
    check_columns(path, flag, kind, role, source_column)             the columns a role needs, or ValueError
    load_reward_fn(spec, flag)                 -> the callable
    read_units(path, flag, kind, role, tok, ..., table=None)   -> list of units (of `table` if given)

Shapes: no tensors; ids are tuples of ints.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import io
import math
import numbers
import os
from dataclasses import dataclass, field

from drpt_ref.data.encode_rows import completion_ids, is_messages, prompt_ids, truncate
from drpt_ref.data.task_base import Pair, RLPrompt, Sample

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}  # extension -> datasets builder
COLUMNS = {"sft": (("prompt", "completion"), ("messages",)),  # one of these column sets per paradigm
           "dpo": (("prompt", "chosen", "rejected"),),
           "grpo": (("prompt",),)}
EVAL_COLUMNS = {"sft": (("prompt", "completion"), ("messages",)), "dpo": (("prompt", "chosen"),),
                "grpo": (("prompt",),)}
ROLES = ("target", "general", "eval")


@dataclass(frozen=True)
class IdsSample(Sample):
    """An SFT example from a file: prompt and answer as token ids (the answer without its final <eos>)."""

    prompt: tuple
    answer: tuple


@dataclass(frozen=True)
class IdsPair(Pair):
    """A DPO pair from a file: prompt, chosen and rejected as token ids."""

    prompt: tuple
    chosen: tuple
    rejected: tuple


@dataclass(frozen=True)
class IdsPrompt(RLPrompt):
    """A GRPO (or held-out) prompt from a file: its ids, a reference completion's ids (() if none), the prompt as
    the file holds it (`raw`, what the reward function sees) and the reward function (None if none)."""

    prompt: tuple
    reference: tuple
    raw: object = field(default=None, compare=False)
    reward_fn: object = field(default=None, compare=False, repr=False)

    def reward(self, completion: str) -> float:
        """reward_fn(raw prompt, completion), checked: a finite real number, else ValueError naming the flag."""
        try:
            value = self.reward_fn(self.raw, completion)
        except Exception as err:  # noqa: BLE001  the user's function: say which one failed, on what
            raise ValueError(f"--reward-fn: the reward function raised {type(err).__name__}: {err} on the "
                             f"completion {completion[:40]!r}; fix the function.") from err
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise ValueError(f"--reward-fn: the reward function returned {value!r} for the completion "
                             f"{completion[:40]!r}; it must return a finite float.")
        return float(value)


@dataclass(frozen=True)
class DataFile:
    """A data file read once: its rows (`table`, a datasets.Dataset) and the sha256 of the bytes they were read
    from, which config.json stores (data_sha256) so that --resume refuses a file that changed since."""

    path: str
    flag: str
    table: object = field(repr=False)
    sha256: str


def read_table(path: str, flag: str):
    """The rows of a data file as a datasets.Dataset (read_data_file's table)."""
    return read_data_file(path, flag).table


def read_data_file(path: str, flag: str) -> DataFile:
    """A data file's rows as a datasets.Dataset, its format from the extension (.jsonl/.json, .parquet, .csv),
    and the sha256 of its bytes, read once. ValueError naming `flag` for a missing file, an unknown extension,
    or a file that does not parse."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path!r}: no such file; pass a .jsonl, .parquet or .csv file.")
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"{flag} {path!r}: unknown extension {ext!r}; use one of {', '.join(FORMATS)}.")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{flag} needs the `datasets` library: pip install 'drpt_ref[data]'.") from None
    try:
        with open(path, "rb") as f:  # the one read of the bytes: their sha256, and a CSV file's header
            raw = f.read()
    except OSError as err:
        raise ValueError(f"{flag} {path!r} could not be read as {FORMATS[ext]} ({type(err).__name__}: "
                         f"{str(err)[:200]}); fix the file.") from None
    kw = {}
    if ext == ".csv":  # every cell is text, read as written (pandas would turn " 57" into the number 57)
        text = io.TextIOWrapper(io.BytesIO(raw), newline="", encoding="utf-8", errors="replace")
        header = next(csv.reader(text), [])
        kw = dict(features=datasets.Features({name: datasets.Value("string") for name in header}),
                  keep_default_na=False)
    if not raw:
        raise ValueError(f"{flag} {path!r} is empty (0 bytes); it must hold at least one row.")
    try:
        table = datasets.load_dataset(FORMATS[ext], data_files=os.path.abspath(path), split="train", **kw)
    except Exception as err:  # noqa: BLE001  datasets raises many kinds; all mean "this file does not parse"
        raise ValueError(f"{flag} {path!r} could not be read as {FORMATS[ext]} ({type(err).__name__}: "
                         f"{str(err)[:200]}); fix the file.") from None
    if len(table) == 0:
        raise ValueError(f"{flag} {path!r} holds no rows.")
    return DataFile(path, flag, table, hashlib.sha256(raw).hexdigest())


def columns_of(kind: str, role: str, names) -> tuple[str, ...] | None:
    """The first column set of `kind` (for `role`) that `names` holds, or None."""
    options = (EVAL_COLUMNS if role == "eval" else COLUMNS)[kind]
    return next((cols for cols in options if set(cols) <= set(names)), None)


def check_columns(table, path: str, flag: str, kind: str, role: str, source_column: str = "source",
                  source_flag: str = "--source-column") -> tuple[str, ...]:
    """The columns of `table` that a `role` file of paradigm `kind` is read from; ValueError naming the flag and
    the columns it lacks (a general file also needs its source column)."""
    if kind not in COLUMNS or role not in ROLES:
        raise ValueError(f"kind={kind!r} must be one of {tuple(COLUMNS)} and role={role!r} one of {ROLES}")
    cols = columns_of(kind, role, table.column_names)
    if cols is None:
        want = " or ".join("/".join(c) for c in (EVAL_COLUMNS if role == "eval" else COLUMNS)[kind])
        raise ValueError(f"{flag} {path!r} has columns {table.column_names}; --paradigm {kind} reads {want} "
                         "(TRL's conventions): rename the columns.")
    if role == "general" and source_column not in table.column_names:
        raise ValueError(f"{flag} {path!r} has no column {source_column!r} (the source label of each general "
                         f"example); add it, or name the column that holds it with {source_flag}.")
    return cols


def load_reward_fn(spec: str, flag: str = "--reward-fn"):
    """The function named by `package.module:function`, imported with importlib (never exec). ValueError
    naming the flag for a malformed path, a module that does not import, or a name that is not callable."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name.isidentifier():
        raise ValueError(f"{flag} {spec!r} must be an import path 'package.module:function', e.g. "
                         "'drpt_ref.data.examples.reward:sum_reward'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{flag} {spec!r}: module {module_name!r} does not import ({err}); install it, or put its "
                         "folder on PYTHONPATH (PYTHONPATH=. drpt train ...).") from None
    if not hasattr(module, name):
        raise ValueError(f"{flag} {spec!r}: {module_name} has no function {name!r}.")
    fn = getattr(module, name)
    if not callable(fn):
        raise ValueError(f"{flag} {spec!r}: {module_name}.{name} is a {type(fn).__name__}, not a function.")
    return fn


def _prompt_and_reference(row: dict, cols: tuple[str, ...], kind: str, where: str):
    """(prompt, reference or None) of a held-out or GRPO row: the last message, `chosen` (dpo) or `completion`."""
    if cols == ("messages",):
        prompt, (reference,) = _prompt_and_answers(row, cols, where)
        return prompt, reference
    return row["prompt"], row.get("chosen" if kind == "dpo" else "completion")


def _prompt_and_answers(row: dict, cols: tuple[str, ...], where: str):
    """(prompt, [answers]) of a training row in the columns `cols`."""
    if cols == ("messages",):
        msgs = row["messages"]
        if not is_messages(msgs) or len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            raise ValueError(f"{where}, column 'messages': a conversation of at least two messages ending with "
                             "the assistant's is needed (the last one is the completion trained on).")
        return msgs[:-1], [msgs[-1:]]
    return row["prompt"], [row[c] for c in cols[1:]]


def read_units(path: str, flag: str, kind: str, role: str, tok, *, max_length: int | None,
               source_column: str = "source", reward_fn=None, max_new_tokens: int = 0, table=None) -> list:
    """The units of one file, encoded with `tok`, each row cut to `max_length` tokens (None: no cut) by eq. (4)
    of theory/own_data.md; a GRPO prompt (and a held-out one) keeps its last max_length - max_new_tokens - 1
    tokens, room for the sampled completion and <eos>. Target units are labelled source 'target', held-out ones
    'eval', general ones by their source column. ValueError naming `flag` and the row for a value that cannot
    be encoded. `table`: the file's rows already read (read_data_file), else they are read here."""
    table = read_table(path, flag) if table is None else table
    cols = check_columns(table, path, flag, kind, role, source_column)
    group = "general" if role == "general" else "target"
    units = []
    rows = iter(table)
    for i in range(len(table)):
        where = f"{flag} {path!r} row {i}"
        try:
            row = next(rows)
        except UnicodeDecodeError as err:  # datasets decodes lazily, row by row
            raise ValueError(f"{where} is not UTF-8 text ({err}); re-encode the file as UTF-8.") from None
        label = row[source_column] if role == "general" else role
        if label is None or not str(label).strip():
            raise ValueError(f"{where}: the source label (column {source_column!r}, --source-column) is empty; "
                             "give every general row the name of its source.")
        source = str(label)
        if role == "eval" or kind == "grpo":  # a prompt, and a reference completion where the row has one
            prompt, ref = _prompt_and_reference(row, cols, kind, where)
            if ref is None and kind != "grpo":
                raise ValueError(f"{where}: no reference completion to evaluate against; fill it in.")
            p = prompt_ids(tok, prompt, f"{where}, the prompt")
            r = [] if ref is None else completion_ids(tok, prompt, ref, f"{where}, the reference")
            if kind != "grpo":
                p, (r,) = truncate(p, [r], max_length) if max_length else (p, [r])
            elif max_length:  # the prompt from its end, room for max_new_tokens and <eos>; the reference after it
                p = p[max(len(p) - (max_length - max_new_tokens - 1), 0):]
                r = r[:max_length - len(p) - 1]
            units.append(IdsPrompt(tuple(p), tuple(r), source, group, raw=prompt, reward_fn=reward_fn))
            continue
        prompt, answers = _prompt_and_answers(row, cols, where)
        names = ("messages",) if cols == ("messages",) else cols[1:]
        p = prompt_ids(tok, prompt, f"{where}, the prompt")
        ans = [completion_ids(tok, prompt, a, f"{where}, column {c!r}") for a, c in zip(answers, names)]
        if max_length:
            p, ans = truncate(p, ans, max_length)
        if kind == "sft":
            units.append(IdsSample(tuple(p), tuple(ans[0]), source, group))
        else:
            units.append(IdsPair(tuple(p), tuple(ans[0]), tuple(ans[1]), source, group))
    return units

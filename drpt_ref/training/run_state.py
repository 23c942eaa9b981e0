"""The folder of a run: its marker, its config, its metrics log, the per-step generators of an exact resume.

A run directory holds
    drpt_run.json        the marker: this folder was made by drpt (kind "train" or "reproduce"); drpt writes
                         only into an empty folder or one with its own marker, never into a --model folder
    config.json          the TrainConfig of the run (a resumed run must match it, RESUME_FREE aside) and its
                         run_id, which every checkpoint of the run carries (a copied checkpoint is refused)
    metrics.jsonl        one JSON object per step
    checkpoint-NNNNNN/   the last checkpoint, atomic and verified on resume (training/checkpoint.py)
    final/               the model at the end (safetensors, config, tokenizer)
    drpt_run.lock        while a drpt process writes the folder: its pid (training/run_files.py); a second
                         process is refused, a lock whose process is gone is taken over with a message

Resume is bitwise: every random draw of a step is seeded from (seed, step) (see `step_generator`),
so the checkpoint needs no global RNG state. On resume the metrics log is cut back to the checkpoint's
step (a torn last line, what a kill during a write leaves, is dropped with a message) and must then hold
exactly the steps 1..step, so the resumed run appends what the uninterrupted one would have written.
A new run into the folder of an old one needs --overwrite, which removes only what a run writes (a symlink
among them is unlinked, never followed). Files are replaced through PATH.tmp created anew, never through a
symlink of that name.

Shapes: no tensors here but the generators.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import torch

from drpt_ref.flags import check_out_path
from drpt_ref.training.checkpoint import FINAL, remove_checkpoints
from drpt_ref.training.run_files import LOCK, read_json_or_none, remove_path, write_bytes_atomic, write_json_atomic

METRICS = "metrics.jsonl"
CONFIG = "config.json"
MARKER = "drpt_run.json"
RUN_ID = "run_id"  # the key of config.json that binds the run's checkpoints to it (written at run start)
SUMMARY = "summary.json"  # written by `drpt reproduce` into each of its runs
# what a train run writes into its folder: all that --overwrite removes (the marker stays)
RUN_FILES = (CONFIG, METRICS, SUMMARY, FINAL, FINAL + ".tmp", FINAL + ".old")
# TrainConfig fields that do not change what a run computes: where it is written, its bar, how it starts
PLACE_FIELDS = ("out", "progress", "resume", "overwrite")
# config fields that may differ on --resume: those, and the steps (a resumed run may go further)
RESUME_FREE = PLACE_FIELDS + ("steps",)


def step_generator(seed: int, step: int, stream: int = 0, device: str = "cpu") -> torch.Generator:
    """The generator for the random draws of one step: a function of (seed, step, stream) only."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 101 + stream)
    return g


# ---- the run folder -----------------------------------------------------------------------------------------

def read_marker(folder: str) -> dict | None:
    """The marker of a drpt folder ({"kind": ...}), or None where there is none or it is not drpt's."""
    marker = read_json_or_none(os.path.join(folder, MARKER))
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_out_folder(out: str, kind: str, model: str | None = None, reuse: bool = False) -> None:
    """Refuse an --out that drpt must not write into; writes nothing. `reuse`: a folder holding a drpt folder of
    the same `kind` may be written into (a train run: --resume or --overwrite; a reproduction: always)."""
    check_out_path(out, "--out")
    if model is not None and (_inside(out, model) or _inside(model, out)):
        raise ValueError(f"--out {out!r} and --model {model!r} overlap; drpt never writes into a model folder "
                         "(nor a model into a run folder): choose another --out, e.g. runs/NAME.")
    if not os.path.isdir(out):
        return
    marker = read_marker(out)
    drpt_own = lambda n: n in (MARKER + ".tmp", LOCK) and os.path.isfile(os.path.join(out, n)) and \
        not os.path.islink(os.path.join(out, n))  # noqa: E731  left by a kill (a symlink is never drpt's)
    contents = sorted(n for n in os.listdir(out) if not drpt_own(n))
    if marker is None and contents:
        raise ValueError(f"--out {out!r} holds files that drpt did not write ({', '.join(contents[:4])}"
                         f"{', ...' if len(contents) > 4 else ''}) and no {MARKER}; drpt writes only into an empty "
                         "or new folder or one of its own runs: choose another --out.")
    if marker is not None and marker["kind"] != kind:
        raise ValueError(f"--out {out!r} holds a drpt {marker['kind']} folder, not a {kind} one: choose another --out.")
    if marker is not None and not reuse:
        raise ValueError(f"--out {out!r} holds a drpt run already; continue it with --resume, or replace it with "
                         "--overwrite (its checkpoint, metrics and final model are removed), or choose another --out.")


def claim_folder(out: str, kind: str, overwrite: bool = False) -> list[str]:
    """Create --out and its marker (after `check_out_folder`); with `overwrite`, first remove what a previous
    run wrote there (RUN_FILES and checkpoints, nothing else). Returns the names removed."""
    try:
        os.makedirs(out, exist_ok=True)
        if read_marker(out) is None:
            write_json_atomic(os.path.join(out, MARKER), {"kind": kind, "written_by": "drpt_ref"})
    except OSError as err:
        raise ValueError(f"--out {out!r} cannot be written ({err.strerror or err}): choose a writable "
                         "folder.") from None
    removed = []
    if overwrite:
        removed = remove_checkpoints(out)
        for name in RUN_FILES:
            if os.path.lexists(os.path.join(out, name)):
                remove_path(os.path.join(out, name))
                removed.append(name)
    return removed


def check_resumed_config(run_dir: str, config: dict, defaults: dict | None = None) -> str:
    """Refuse to resume with a config that differs from the stored one (RESUME_FREE aside; the model is
    compared by its resolved path); return the run's id (RUN_ID of config.json, which its checkpoints carry).
    A setting the stored config lacks (a field added to drpt after the run was made) counts as its value in
    `defaults`: a new field at its default keeps the old behaviour, so the run resumes."""
    path = os.path.join(run_dir, CONFIG)
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"--resume: {path} cannot be read ({err}); start a new run with --overwrite.") from None
    if not isinstance(stored, dict):
        raise ValueError(f"--resume: {path} is not a config object; start a new run with --overwrite.")
    same = lambda k, a, b: os.path.realpath(a) == os.path.realpath(b) if k == "model" else a == b  # noqa: E731
    stored = {**{k: v for k, v in (defaults or {}).items() if k not in stored}, **stored}
    diff = {k: (stored.get(k), v) for k, v in config.items()
            if k not in RESUME_FREE and not same(k, stored.get(k), v)}
    if diff:
        raise ValueError(f"--resume with a different config than the run in {run_dir!r}: {diff}; "
                         "use the same flags (only --steps and --progress may change) or a new --out.")
    if not isinstance(stored.get(RUN_ID), str) or not stored[RUN_ID]:
        raise ValueError(f"--resume: {path} has no {RUN_ID!r} (a run of an older drpt, or an edited config), so its "
                         "checkpoint cannot be matched to it; start a new run with --overwrite.")
    return stored[RUN_ID]


def new_run_id(config: dict) -> str:
    """The id of a new run: a hash of its config (place fields aside) and a random part."""
    fields = {k: v for k, v in config.items() if k not in RESUME_FREE}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return f"{digest}-{uuid.uuid4().hex[:12]}"


def write_config(run_dir: str, config: dict, run_id: str) -> None:
    """Store the config of the run and its id (replaced in one rename)."""
    write_json_atomic(os.path.join(run_dir, CONFIG), {**config, RUN_ID: run_id})


# ---- metrics ------------------------------------------------------------------------------------------------

def _records(path: str, lines: list[str]) -> list[dict]:
    """The records of metrics lines; a torn last line (no newline, or not JSON) is dropped with a message."""
    records = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line) if line.endswith("\n") else None
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            if i == len(lines) - 1:
                print(f"{path}: dropped a torn last line ({len(line)} characters), left by an interrupted write")
                break
            raise ValueError(f"{path}: line {i + 1} is not a metrics record; the log is damaged, start a new run "
                             "with --overwrite.")
        records.append(rec)
    return records


class MetricsLog:
    """Append-only JSON lines. On resume the lines after the checkpoint's step go, and `drop` keys go from the
    record of that step (an evaluation logged only because a shorter run ended there)."""

    def __init__(self, run_dir: str, resume_step: int | None = None, drop: tuple[str, ...] = ()):
        self.path = os.path.join(run_dir, METRICS)
        if resume_step is None:
            write_bytes_atomic(self.path, b"")
            return
        lines = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                lines = [line for line in f if line.strip()]
        kept = [r for r in _records(self.path, lines) if r["step"] <= resume_step]
        if [r["step"] for r in kept] != list(range(1, resume_step + 1)):
            raise ValueError(f"{self.path} holds steps {[r['step'] for r in kept][-3:]}... up to the checkpoint's "
                             f"step {resume_step}, not each of 1..{resume_step}: the log does not belong to this "
                             "checkpoint; start a new run with --overwrite.")
        kept[-1:] = [{k: v for k, v in r.items() if k not in drop} for r in kept[-1:]]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        write_bytes_atomic(self.path, text.encode())  # never through a symlink named metrics.jsonl.tmp

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def sync(self) -> None:
        """Make the lines written so far durable (before a checkpoint refers to them)."""
        with open(self.path, "a") as f:
            os.fsync(f.fileno())


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, METRICS)) as f:
        return [json.loads(line) for line in f if line.strip()]


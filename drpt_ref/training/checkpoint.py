"""Atomic checkpoints that are verified before they are resumed, and the atomic publication of a run's final model.

A checkpoint is one folder, `checkpoint-000012/` (the step, six digits or more), holding
    tensors.safetensors   model parameters ("model.NAME"; tied weights once) and optimizer tensors
                          ("optim.PARAM.KEY"); metadata {"step", "run_id"}
    state.json            {"format", "step", "run_id", "optimizer": {"class", "scalars"}, "extra"}: the
                          optimizer's non-tensor state and what the caller stores with it (a weight rule's state)
    manifest.json         written last: the step and every other file with its size and SHA-256

It is written into `checkpoint.tmp/` (files fsynced, manifest last) and published by one rename to its
step's name; only then is the previous checkpoint folder removed. A kill at any moment therefore leaves
the previous checkpoint, the new one, or both (resume takes the newest and removes the rest), never a
mixture. `load_checkpoint` refuses, naming the file and what is wrong, a symlinked checkpoint folder, one
whose manifest does not match its files byte for byte, whose steps disagree (folder name, manifest,
state.json, safetensors metadata), that belongs to another run (run_id, from the run's config.json), or whose
tensors do not fit the model and optimizer (names, shapes, dtypes; every optimizer slot that one step of
this optimizer creates must be there). Nothing is restored until everything is checked.

Checkpoints are safetensors and JSON only (no pickle); model folders are loaded by training/model_folder.py.
Files are created exclusively and deleted without following symlinks (training/run_files.py).
`save_final` publishes a run's final/ model by renames, like a checkpoint (a LoRA run's: its peft adapter).

Shapes: no new tensors; parameters and optimizer buffers keep their own shapes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from drpt_ref.training import run_files
from drpt_ref.training.checkpoint_checks import check_tensors
from drpt_ref.training.model_folder import is_peft_model
from drpt_ref.training.run_files import remove_path

TENSORS = "tensors.safetensors"
STATE = "state.json"
MANIFEST = "manifest.json"
PREFIX = "checkpoint-"
TMP = "checkpoint.tmp"
RETIRED = "checkpoint.old-"  # a checkpoint being removed: renamed first, so it is never half a checkpoint
FINAL = "final"
FORMAT = 1  # the layout above; a checkpoint of another format is refused
_NAME = re.compile(r"checkpoint-(\d{6,})")


# ---- file operations (training/run_files.py): every write of a save goes through these names, which tests
# replace one at a time to interrupt a save at each of them
_write, _make_dir, _rename, _sync_dir = run_files.write_new, run_files.make_dir, run_files.rename, run_files.sync_dir


# ---- save ---------------------------------------------------------------------------------------------------

def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def _tensors_and_scalars(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():  # tied weights (GPT-2's wte = lm_head) are stored once
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            tensors[f"model.{k}"] = v.detach().contiguous().cpu()
    names = {id(p): n for n, p in model.named_parameters()}
    scalars: dict[str, dict] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"optim.{names[id(p)]}.{key}"] = value.detach().contiguous().cpu()
                else:
                    scalars.setdefault(names[id(p)], {})[key] = value
    return tensors, scalars


def manifest_of(folder: str, step: int) -> dict:
    """The manifest of the files in `folder` (all but the manifest itself): size and SHA-256 of each."""
    files = {}
    for name in sorted(os.listdir(folder)):
        if name != MANIFEST:
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return {"format": FORMAT, "step": step, "files": files}


def save_checkpoint(run_dir: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict | None = None, run_id: str = "") -> str:
    """Write the checkpoint of `step` atomically (see the module docstring); return its folder. `run_id` binds
    it to its run: stored in state.json and, with the step, in the safetensors metadata."""
    tensors, scalars = _tensors_and_scalars(model, optimizer)
    state = {"format": FORMAT, "step": step, "extra": extra or {}, "run_id": run_id,
             "optimizer": {"class": type(optimizer).__name__, "scalars": scalars}}
    blobs = {TENSORS: save_tensors(tensors, metadata={"step": str(step), "run_id": run_id}),
             STATE: json.dumps(state, sort_keys=True).encode()}
    manifest = {"format": FORMAT, "step": step,
                "files": {n: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in blobs.items()}}
    tmp, dest = os.path.join(run_dir, TMP), os.path.join(run_dir, checkpoint_name(step))
    if os.path.lexists(tmp):
        remove_path(tmp)  # left by a save that was interrupted
    _make_dir(tmp)
    for name, data in blobs.items():
        _write(os.path.join(tmp, name), data)
    _write(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())  # last
    _sync_dir(tmp)
    if os.path.lexists(dest):  # a checkpoint of this very step (never in a normal run)
        _rename(dest, _retired(dest))
    _rename(tmp, dest)  # the publication: one rename
    _sync_dir(run_dir)
    remove_checkpoints(run_dir, keep=dest)
    return dest


# ---- find, verify, load -------------------------------------------------------------------------------------

def checkpoint_folders(run_dir: str) -> list[str]:
    """The published checkpoint folders of a run, oldest first (a half-written checkpoint.tmp is not one)."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(run_dir)
             if (m := _NAME.fullmatch(name)) and os.path.isdir(os.path.join(run_dir, name))]
    return [os.path.join(run_dir, name) for _, name in sorted(found)]


def find_checkpoint(run_dir: str) -> str | None:
    """The newest published checkpoint folder of the run, or None."""
    folders = checkpoint_folders(run_dir)
    return folders[-1] if folders else None


def _retired(path: str) -> str:
    """checkpoint-000012 -> checkpoint.old-000012: the name a checkpoint takes before it is deleted."""
    return os.path.join(os.path.dirname(path), RETIRED + os.path.basename(path)[len(PREFIX):])


def remove_checkpoints(run_dir: str, keep: str | None = None) -> list[str]:
    """Remove every checkpoint folder of the run but `keep`, and what interrupted saves and removals left;
    return their names. A checkpoint is first renamed out of the checkpoint names, then deleted: a kill in
    between leaves a leftover, never a partly deleted folder that --resume would take for a damaged one."""
    gone = []
    for path in checkpoint_folders(run_dir):
        if path != keep:
            _rename(path, _retired(path))
            gone.append(os.path.basename(path))
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        if name == TMP or name.startswith(RETIRED):
            remove_path(os.path.join(run_dir, name))
    return gone


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: the checkpoint is incomplete.") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not the {what} object.")
    return obj


def _need(obj: dict, path: str, key: str, kind: type):
    if key not in obj:
        raise ValueError(f"{path} has no {key!r}.")
    if not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):
        raise ValueError(f"{path}: {key!r} is {obj[key]!r}, not a {kind.__name__}.")
    return obj[key]


def _verified_files(folder: str) -> tuple[int, dict[str, bytes]]:
    """(step, {file: bytes}) of a checkpoint folder whose files match its manifest byte for byte."""
    step = int(_NAME.fullmatch(os.path.basename(folder)).group(1))
    mpath = os.path.join(folder, MANIFEST)
    manifest = _read_json(mpath, "manifest")
    if _need(manifest, mpath, "format", int) != FORMAT:
        raise ValueError(f"{mpath}: format {manifest['format']}, this drpt reads format {FORMAT}.")
    if _need(manifest, mpath, "step", int) != step:
        raise ValueError(f"{mpath}: step {manifest['step']}, but the folder is named for step {step}.")
    listed = _need(manifest, mpath, "files", dict)
    present = set(os.listdir(folder)) - {MANIFEST}
    if set(listed) != {TENSORS, STATE} or present != set(listed):
        raise ValueError(f"{mpath} lists {sorted(listed)}; the folder holds {sorted(present)}; a checkpoint is "
                         f"exactly {[TENSORS, STATE]}.")
    blobs = {}
    for name, entry in listed.items():
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            data = f.read()
        if not isinstance(entry, dict) or len(data) != entry.get("size") or \
                hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            said = entry if not isinstance(entry, dict) else f"{entry.get('size')} bytes, SHA-256 " \
                f"{str(entry.get('sha256'))[:12]}..."
            raise ValueError(f"{path}: {len(data)} bytes that do not match {mpath} ({said}): the file was damaged "
                             "or changed after it was written; restore it or start a new run with --overwrite.")
        blobs[name] = data
    return step, blobs


def _tensor_metadata(path: str, data: bytes) -> dict:
    """The __metadata__ of a safetensors file (its header is checked by the load before)."""
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def load_checkpoint(run_dir: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    run_id: str | None = None) -> tuple[int, dict]:
    """Verify the newest checkpoint of run_dir against its manifest, the model, the optimizer and (unless None)
    the run's id; restore the parameters and optimizer state in place; remove older checkpoints; return
    (step, extra).

    FileNotFoundError when the run has no checkpoint; ValueError naming the file when it cannot be resumed."""
    folder = find_checkpoint(run_dir)
    if folder is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir!r} (no {PREFIX}NNNNNN folder); "
                                "start it again with --overwrite instead of --resume.")
    if os.path.islink(folder):
        raise ValueError(f"{folder} is a symlink, not a checkpoint folder of this run; remove the link (or copy "
                         "the folder in) or start a new run with --overwrite.")
    step, blobs = _verified_files(folder)
    spath, tpath = os.path.join(folder, STATE), os.path.join(folder, TENSORS)
    try:
        state = json.loads(blobs[STATE])
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{spath} is not valid JSON ({err}).") from None
    if not isinstance(state, dict):
        raise ValueError(f"{spath} holds a JSON {type(state).__name__}, not the checkpoint state object.")
    if _need(state, spath, "step", int) != step or _need(state, spath, "format", int) != FORMAT:
        raise ValueError(f"{spath}: step {state['step']} (format {state['format']}), but the checkpoint is of step "
                         f"{step} (format {FORMAT}).")
    _need(state, spath, "optimizer", dict)
    extra = _need(state, spath, "extra", dict)
    try:
        tensors = load_tensors(blobs[TENSORS])
    except Exception as err:  # safetensors raises its own error type for a bad header
        raise ValueError(f"{tpath} is not a readable safetensors file ({err}).") from None
    model_state = check_tensors(tpath, tensors, spath, state, model, optimizer)
    meta = _tensor_metadata(tpath, blobs[TENSORS])
    if meta.get("step") != str(step):
        raise ValueError(f"{tpath} records step {meta.get('step')!r}, but the checkpoint is of step {step} "
                         f"({spath}): the checkpoint was edited; start a new run with --overwrite.")
    if run_id is not None and (state.get("run_id") != run_id or meta.get("run_id") != run_id):
        raise ValueError(f"{spath}: the checkpoint belongs to run {state.get('run_id')!r}, not to this run "
                         f"({run_id!r}, {os.path.join(run_dir, 'config.json')}): a checkpoint copied from another "
                         "run; resume that run in its own folder, or start a new run with --overwrite.")
    model.load_state_dict(model_state, strict=False)  # tied weights: the one stored copy fills both names
    names = {id(p): n for n, p in model.named_parameters()}
    scalars = state["optimizer"]["scalars"]
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            slot = {key.rsplit(".", 1)[-1]: v.to(p.device) for key, v in tensors.items()
                    if key.startswith(f"optim.{name}.") and key.count(".") == name.count(".") + 2}
            slot.update(scalars.get(name, {}))
            if slot:
                optimizer.state[p] = slot
    remove_checkpoints(run_dir, keep=folder)
    return step, extra


# ---- the final model ------------------------------------------------------------------------------------------

def save_final(run_dir: str, model, tok) -> str:
    """Publish the run's final model (safetensors, config, tokenizer) as final/, written beside it first.

    A peft model (a LoRA run) is saved as its adapter: adapter_model.safetensors and adapter_config.json, whose
    base_model_name_or_path is the absolute path of the base model folder, beside the tokenizer; `drpt eval
    --model RUN/final` and `drpt train --model RUN/final` load it on that base (training/model_folder.py)."""
    dest, tmp, old = (os.path.join(run_dir, FINAL + s) for s in ("", ".tmp", ".old"))
    for path in (tmp, old):
        if os.path.lexists(path):
            remove_path(path)
    if is_peft_model(model):  # the adapter only; the base embeddings are never saved (drpt never resizes them)
        model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if os.path.lexists(dest):
        _rename(dest, old)
    _rename(tmp, dest)
    if os.path.lexists(old):
        remove_path(old)
    return dest

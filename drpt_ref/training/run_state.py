"""Checkpoints and metrics of a training run: safetensors state, JSON-lines metrics, exact resume.

A run directory holds
    config.json               the TrainConfig of the run (a resumed run must match it, RESUME_FREE aside)
    metrics.jsonl             one JSON object per logged step
    checkpoint.safetensors    model parameters and optimizer state tensors, at the last checkpoint
    checkpoint.json           the step of that checkpoint and the optimizer's non-tensor state

Resume is bitwise: every random draw of a step is seeded from (seed, step) (see `step_generator`),
so the checkpoint needs no global RNG state; the metrics file is cut back to the checkpoint's
step so the resumed run appends exactly what the uninterrupted one would have written (an evaluation
logged only because a shorter run ended at that step is dropped). A new run in a folder that holds an
old one first removes the old checkpoint (`start_fresh`), so --resume never mixes two runs.
Loading uses safetensors only (no pickle).

Shapes: no new tensors; parameters and optimizer buffers keep their own shapes.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

CKPT_TENSORS = "checkpoint.safetensors"
CKPT_META = "checkpoint.json"
METRICS = "metrics.jsonl"
CONFIG = "config.json"


def step_generator(seed: int, step: int, stream: int = 0, device: str = "cpu") -> torch.Generator:
    """The generator for the random draws of one step: a function of (seed, step, stream) only."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 101 + stream)
    return g


def save_checkpoint(run_dir: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write parameters and optimizer state; the JSON file is written last, so a torn write is never read."""
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
                slot = f"optim.{names[id(p)]}.{key}"
                if torch.is_tensor(value):
                    tensors[slot] = value.detach().contiguous().cpu()
                else:
                    scalars.setdefault(names[id(p)], {})[key] = value
    tmp = os.path.join(run_dir, CKPT_TENSORS + ".tmp")
    save_file(tensors, tmp)
    os.replace(tmp, os.path.join(run_dir, CKPT_TENSORS))
    with open(os.path.join(run_dir, CKPT_META + ".tmp"), "w") as f:
        json.dump({"step": step, "optimizer_scalars": scalars}, f)
    os.replace(os.path.join(run_dir, CKPT_META + ".tmp"), os.path.join(run_dir, CKPT_META))


def load_checkpoint(run_dir: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore parameters and optimizer state in place; return the step the checkpoint was taken after."""
    meta = _read_meta(run_dir)
    tensors = load_file(os.path.join(run_dir, CKPT_TENSORS))
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    stored = {model.state_dict()[k].data_ptr() for k in model_state}
    untied = [k for k in missing if model.state_dict()[k].data_ptr() not in stored]
    if untied or unexpected:
        raise ValueError(f"checkpoint in {run_dir!r} does not match the model: missing {untied}, "
                         f"unexpected {unexpected}; resume with the same --model.")
    params = dict(model.named_parameters())
    for name, p in params.items():
        state = {key.rsplit(".", 1)[-1]: v.to(p.device) for key, v in tensors.items()
                 if key.startswith(f"optim.{name}.") and key.count(".") == name.count(".") + 2}
        state.update(meta["optimizer_scalars"].get(name, {}))
        if state:
            optimizer.state[p] = state
    return int(meta["step"])


# TrainConfig fields that do not change what a run computes: where it is written, its bar, the resume flag
PLACE_FIELDS = ("out", "progress", "resume")
# config fields that may differ on --resume: those, and the steps (a resumed run may go further)
RESUME_FREE = PLACE_FIELDS + ("steps",)


def _read_meta(run_dir: str) -> dict:
    """checkpoint.json of run_dir (FileNotFoundError with the fix when there is none)."""
    meta_path = os.path.join(run_dir, CKPT_META)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir!r} ({CKPT_META} missing); "
                                "start without --resume.")
    with open(meta_path) as f:
        return json.load(f)


def checkpoint_step(run_dir: str) -> int:
    """The step of the checkpoint in run_dir (FileNotFoundError with the fix when there is none)."""
    return int(_read_meta(run_dir)["step"])


def start_fresh(run_dir: str, stale: tuple[str, ...]) -> list[str]:
    """A new run in an existing folder: remove the previous run's checkpoint and the given extra files
    or folders, so a later --resume can never continue from another run's weights. Returns what went."""
    removed = []
    for name in (CKPT_TENSORS, CKPT_META, *stale):
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    return removed


def write_config(run_dir: str, config: dict, resume: bool) -> None:
    """Store the config; on resume, refuse a config that differs from the stored one (RESUME_FREE aside;
    the model is compared by its resolved path)."""
    path = os.path.join(run_dir, CONFIG)
    if resume and os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        same = lambda k, a, b: os.path.realpath(a) == os.path.realpath(b) if k == "model" else a == b  # noqa: E731
        diff = {k: (stored.get(k), v) for k, v in config.items()
                if k not in RESUME_FREE and not same(k, stored.get(k), v)}
        if diff:
            raise ValueError(f"--resume with a different config than the run in {run_dir!r}: {diff}; "
                             "use the same flags (only --steps and --progress may change) or a new --out.")
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


class MetricsLog:
    """Append-only JSON lines; on resume, drops the lines logged after the checkpoint's step."""

    def __init__(self, run_dir: str, resume_step: int | None = None):
        self.path = os.path.join(run_dir, METRICS)
        if resume_step is None:
            open(self.path, "w").close()
        elif os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)

    def drop_keys(self, step: int, keys: tuple[str, ...]) -> None:
        """Remove keys from the record of `step` (an evaluation logged only because a shorter run ended there)."""
        with open(self.path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        with open(self.path, "w") as f:
            for rec in records:
                if rec["step"] == step:
                    rec = {k: v for k, v in rec.items() if k not in keys}
                f.write(json.dumps(rec, sort_keys=True) + "\n")

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, METRICS)) as f:
        return [json.loads(line) for line in f if line.strip()]

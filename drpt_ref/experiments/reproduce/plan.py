"""The plan of `drpt reproduce`: its config, and every run it makes (method, paradigm, seed, knob).

`plan(cfg)` lists the runs of `drpt train` in a fixed order; `train_config` turns one into a
TrainConfig; `run_config` is what a stored run must match to be reused (run.py); the report (report.py)
reads the spectrum and the retention tasks from here.

Shapes: no tensors here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from drpt_ref.experiments.build_model import LARGE_MODEL
from drpt_ref.training.run_state import PLACE_FIELDS

DR_METHODS = ("target", "mean", "mix", "ball", "topk", "capped_simplex", "simplex", "softmax", "cone", "subspace")
PER_LAYER = ("ball", "topk", "capped_simplex", "simplex", "softmax", "cone", "subspace")  # endpoints: same either way
BASELINES = ("random", "less", "rds", "adapt", "adapt_softmax")
# The spectrum: each knob from the standard-training end (first) to the target-only end (last).
SPECTRUM = {
    "k": ("capped_simplex", [16.0, 8.0, 4.0, 2.0, 1.0]),
    "tau_rel": ("softmax", [100.0, 3.0, 1.0, 0.3, 0.1]),
    "ridge_rel": ("subspace", [100.0, 10.0, 1.0, 0.1, 0.0]),
    "radius_rel": ("ball", [0.0, 0.25, 0.5, 0.75, 1.0]),
}
RETENTION_TASKS = ("add2", "carry", "copy")  # the helpful general tasks


@dataclass
class ReproduceConfig:
    mode: str = "quick"  # quick (CPU, minutes) | full (GPU scale)
    out: str = "runs/reproduce_quick"  # where runs, tables and plots go (full: runs/reproduce_full; git ignores runs/)
    device: str = "cpu"  # cpu | cuda
    workers: int = 2  # parallel runs (processes), one torch thread each
    seeds: int = 3  # seeds per setting (full: 5)
    steps: int = 20  # optimizer steps per run (full: 300)
    n_general: int = 16  # general units per step
    m_target: int = 4  # target units per step
    eval_n: int = 100  # held-out target prompts per evaluation
    retention_n: int = 60  # held-out prompts per helpful task for the retention check
    model: str = "small_models/gpt2-tiny"  # the starting model (full: LARGE_MODEL, `drpt build-model --config large`)
    progress: bool = True  # a progress bar over runs
    keep_checkpoints: bool = False  # keep each run's checkpoint and final/ model (~10 MB a quick run) once summarized
    overwrite: bool = False  # replace runs in --out made with other settings (without it such a run is refused)


FULL = dict(seeds=5, steps=300, eval_n=500, retention_n=300, n_general=32, m_target=8, workers=1,
            model=LARGE_MODEL, out="runs/reproduce_full")
# Settings that must be whole numbers >= 1 (0 would train nothing, leave a table without rows or a pool
# without workers).
POSITIVE_INTS = ("workers", "seeds", "steps", "n_general", "m_target", "eval_n", "retention_n")


@dataclass(frozen=True)
class RunSpec:
    paradigm: str
    method: str
    seed: int
    per_layer: bool = False
    knobs: tuple = ()  # ((name, value), ...) overrides of TrainConfig
    sweep: str = ""  # the spectrum knob this run belongs to ("" for the main table)
    label: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        parts = [self.paradigm, self.method + ("-pl" if self.per_layer else "")]
        parts += [f"{k}={v:g}" for k, v in self.knobs]
        return "_".join(parts) + f"_s{self.seed}"


def plan(cfg: ReproduceConfig) -> list[RunSpec]:
    """Every run of the reproduction, in a fixed order."""
    runs = []
    for seed in range(cfg.seeds):
        for paradigm in ("sft", "dpo", "grpo"):
            runs += [RunSpec(paradigm, m, seed) for m in DR_METHODS]
            runs += [RunSpec(paradigm, m, seed, per_layer=True) for m in PER_LAYER]
            runs += [RunSpec(paradigm, m, seed) for m in BASELINES]
        runs.append(RunSpec("hpt", "hpt", seed))
        sweep_paradigms = ("sft",) if cfg.mode == "quick" else ("sft", "dpo", "grpo")
        for paradigm in sweep_paradigms:
            for knob, (method, values) in SPECTRUM.items():  # the default value is the main-table run
                runs += [RunSpec(paradigm, method, seed, knobs=((knob, v),), sweep=knob) for v in values
                         if v != knob_default(knob)]
    return runs


def knob_default(knob: str) -> float:
    from drpt_ref.training.train import TrainConfig

    return getattr(TrainConfig(), knob)


def train_config(cfg: ReproduceConfig, spec: RunSpec):
    from drpt_ref.training.train import TrainConfig

    base = TrainConfig(paradigm=spec.paradigm, method=spec.method, per_layer=spec.per_layer, seed=spec.seed,
                       steps=cfg.steps, n_general=cfg.n_general, m_target=cfg.m_target, eval_n=cfg.eval_n,
                       eval_every=max(cfg.steps // 5, 1), checkpoint_every=max(cfg.steps // 3, 1),
                       device=cfg.device, model=cfg.model, out=os.path.join(cfg.out, "runs", spec.name),
                       progress=False, reward="partial" if spec.paradigm in ("grpo", "hpt") else "exact")
    return dataclasses.replace(base, **dict(spec.knobs))


def run_config(cfg: ReproduceConfig, tcfg) -> dict:
    """Everything a run's summary depends on, in its JSON form: the TrainConfig (PLACE_FIELDS aside) and the
    retention check. Stored in summary.json; a stored run is reused only if this matches exactly."""
    train_fields = {k: v for k, v in dataclasses.asdict(tcfg).items() if k not in PLACE_FIELDS}
    config = {"train": train_fields, "retention_tasks": list(RETENTION_TASKS), "retention_n": cfg.retention_n}
    return json.loads(json.dumps(config))  # tuples as lists: the form read back from disk

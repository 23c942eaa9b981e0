"""The plan of `drpt reproduce`: the comparison fixed before anything runs, and every run it makes.

The headline is decided here, not after the fact: the regime (steps, learning rate, units per step, the
scarce target set), the rows of each paradigm's table, the seeds, and the primary metric. The held-out
target prompts are split in two halves (data/task_base.py): "select", on which the best Dr method, the best
baseline and the early-stopping step of target-only are chosen, and "report", on which every number of the
headline is measured. `plan(cfg)` lists the runs of `drpt train` in a fixed order; `train_config` turns one
into a TrainConfig; `run_config` is what a stored run must match to be reused (run.py).

Rows of a paradigm (ROWS): the endpoints (target-only on the scarce set, standard training `mean`), the
oracle (target-only on `oracle_size` fresh target samples: what more target data would buy), the Dr
methods, and the baselines (selection: random, LESS, RDS; reweighting: ADAPT; HPT's gate on its paradigm).
The early-stopped target-only row is read from the target-only runs (report value at the step best on
select), not trained again. The spectrum (SPECTRUM) walks each knob from standard training to target-only.

Shapes: no tensors here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from drpt_ref.experiments.build_model import LARGE_MODEL
from drpt_ref.training.run_state import PLACE_FIELDS

# (method, per layer) of each row kind, per paradigm. "oracle" is target-only on fresh target samples (SFT: the
# evidence that accuracy can move in this step budget); the other paradigms keep fewer rows for the CPU budget.
ENDPOINTS = (("target", False), ("mean", False))
DR_ROWS = (("capped_simplex", True), ("simplex", True), ("capped_simplex", False), ("simplex", False),
           ("softmax", False), ("cone", True))
BASELINE_ROWS = (("random", False), ("less", False), ("rds", False), ("adapt", False))
ROWS = {
    "sft": ENDPOINTS + (("oracle", False),) + DR_ROWS + BASELINE_ROWS,
    "dpo": ENDPOINTS + DR_ROWS[:2] + BASELINE_ROWS[:2],
    "grpo": ENDPOINTS + DR_ROWS[:2] + BASELINE_ROWS[:2],
    "hpt": ENDPOINTS + DR_ROWS[:1] + (("hpt", False),),
}
DR_METHODS = ("ball", "topk", "capped_simplex", "simplex", "softmax", "cone", "subspace")  # neither endpoint
BASELINES = ("random", "less", "rds", "adapt", "adapt_softmax", "hpt")
# The spectrum: each knob from the standard-training end (first) to the target-only end (last); SFT only.
SPECTRUM = {
    "k": ("capped_simplex", [16.0, 8.0, 4.0, 2.0, 1.0]),
    "tau_rel": ("softmax", [100.0, 3.0, 1.0, 0.3, 0.1]),
    "ridge_rel": ("subspace", [100.0, 10.0, 1.0, 0.1, 0.0]),
    "radius_rel": ("ball", [0.0, 0.25, 0.5, 0.75, 1.0]),
}
RETENTION_TASKS = ("add2", "carry", "copy")  # the helpful general tasks
# What differs by paradigm (TrainConfig fields): fixed before the runs, not searched (theory/reproduction.md §3).
PARADIGM_SETTINGS = {
    "sft": {},
    "dpo": {"beta": 0.1},
    "grpo": {"reward": "partial", "group_size": 4},
    "hpt": {"reward": "partial", "group_size": 4},
}


@dataclass
class ReproduceConfig:
    mode: str = "quick"  # quick | headline | full (--quick, --headline, --full)
    out: str = "runs/reproduce_quick"  # where runs, tables and plots go (git ignores runs/)
    device: str = "cpu"  # cpu | cuda
    workers: int = 2  # parallel runs (processes), one torch thread each
    seeds: int = 2  # seeds of every main-table row
    spectrum_seeds: int = 1  # seeds of each spectrum point, SFT only (0 = no spectrum)
    paradigms: str = "sft"  # the paradigms of the plan, comma-separated
    steps: int = 300  # optimizer steps per run
    lr: float = 1e-4  # AdamW learning rate of every run but the oracle (constant)
    n_general: int = 16  # general units per step
    m_target: int = 4  # target units per step
    target_size: int = 32  # the scarce target training set
    oracle_size: int = 2000  # the oracle's target set: fresh target samples
    oracle_m_target: int = 64  # the oracle's target units per step (context, not a competitor: its fastest setting)
    oracle_lr: float = 2e-3  # the oracle's learning rate, reached after oracle_warmup steps
    oracle_warmup: int = 30  # the oracle's linear warmup steps
    eval_every: int = 30  # steps between held-out evaluations (select and report halves)
    eval_n: int = 250  # held-out target prompts of each half per evaluation
    retention_n: int = 60  # held-out prompts per helpful task for the retention check (report half)
    primary: str = "loss"  # picks best rows and early stopping: loss (answer NLL) | accuracy; both get verdicts
    model: str = "small_models/gpt2-tiny"  # the starting model (a folder written by `drpt build-model`)
    progress: bool = True  # a progress bar over runs
    keep_checkpoints: bool = False  # keep each run's checkpoint and final/ model once summarized
    keep_metrics: bool = False  # keep each run's metrics.jsonl (~0.7 MB; its summary holds what the report uses)
    overwrite: bool = False  # replace runs in --out made with other settings (without it such a run is refused)


HEADLINE = dict(seeds=5, spectrum_seeds=2, paradigms="sft,dpo,grpo,hpt", out="runs/reproduce_headline")
FULL = dict(seeds=5, spectrum_seeds=3, paradigms="sft,dpo,grpo,hpt", steps=600, eval_n=1000, retention_n=300,
            n_general=32, m_target=8, model=LARGE_MODEL, out="runs/reproduce_full")
MODES = {"quick": {}, "headline": HEADLINE, "full": FULL}
# Settings that must be whole numbers >= 1 (0 would train nothing, leave a table without rows or a pool
# without workers).
POSITIVE_INTS = ("workers", "seeds", "steps", "n_general", "m_target", "target_size",
                 "oracle_size", "oracle_m_target", "eval_every", "eval_n", "retention_n")
PRIMARY = ("accuracy", "loss")


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
    def row(self) -> str:
        """The table row: method, '-pl' when per layer."""
        return self.method + ("-pl" if self.per_layer else "")

    @property
    def name(self) -> str:
        parts = [self.paradigm, self.row] + [f"{k}={v:g}" for k, v in self.knobs]
        return "_".join(parts) + f"_s{self.seed}"


def paradigms_of(cfg: ReproduceConfig) -> list[str]:
    names = [p.strip() for p in cfg.paradigms.split(",") if p.strip()]
    unknown = [p for p in names if p not in ROWS]
    if not names or unknown:
        raise ValueError(f"--paradigms {cfg.paradigms!r}: name one or more of {', '.join(ROWS)}, comma-separated.")
    return list(dict.fromkeys(names))


def plan(cfg: ReproduceConfig) -> list[RunSpec]:
    """Every run of the reproduction, in a fixed order: seed by seed, so an interrupted job has whole seeds."""
    runs = []
    for seed in range(max(cfg.seeds, cfg.spectrum_seeds)):
        for paradigm in paradigms_of(cfg):
            if seed < cfg.seeds:
                runs += [RunSpec(paradigm, m, seed, per_layer=pl) for m, pl in ROWS[paradigm]]
            if paradigm == "sft" and seed < cfg.spectrum_seeds:
                for knob, (method, values) in SPECTRUM.items():
                    runs += [RunSpec(paradigm, method, seed, knobs=((knob, v),), sweep=knob) for v in values
                             if not in_main_table(cfg, paradigm, method, seed, knob, v)]
    return runs


def in_main_table(cfg: ReproduceConfig, paradigm: str, method: str, seed: int, knob: str, value: float) -> bool:
    """Is this spectrum point a main-table run already (the global row of `method`, the knob at its default, a
    seed the table has)? Then it is not run twice: the spectrum plot reads the main-table run (report.py)."""
    return seed < cfg.seeds and (method, False) in ROWS[paradigm] and value == knob_default(knob)


def knob_default(knob: str) -> float:
    from drpt_ref.training.train import TrainConfig

    return getattr(TrainConfig(), knob)


def train_config(cfg: ReproduceConfig, spec: RunSpec):
    from drpt_ref.training.train import TrainConfig

    oracle = spec.method == "oracle"
    base = TrainConfig(paradigm=spec.paradigm, method="target" if oracle else spec.method, per_layer=spec.per_layer,
                       seed=spec.seed, steps=cfg.steps, lr=cfg.oracle_lr if oracle else cfg.lr,
                       warmup=cfg.oracle_warmup if oracle else 0, n_general=cfg.n_general,
                       m_target=cfg.oracle_m_target if oracle else cfg.m_target,
                       target_size=cfg.oracle_size if oracle else cfg.target_size, eval_n=cfg.eval_n,
                       eval_every=cfg.eval_every, eval_split="select", report_split="report",
                       checkpoint_every=max(cfg.steps // 4, 1), device=cfg.device, model=cfg.model,
                       out=os.path.join(cfg.out, "runs", spec.name), progress=False)
    return dataclasses.replace(base, **PARADIGM_SETTINGS[spec.paradigm], **dict(spec.knobs))


def run_config(cfg: ReproduceConfig, tcfg) -> dict:
    """Everything a run's summary depends on, in its JSON form: the TrainConfig (PLACE_FIELDS aside) and the
    retention check. Stored in summary.json; a stored run is reused only if this matches exactly."""
    train_fields = {k: v for k, v in dataclasses.asdict(tcfg).items() if k not in PLACE_FIELDS}
    config = {"train": train_fields, "retention_tasks": list(RETENTION_TASKS), "retention_n": cfg.retention_n}
    return json.loads(json.dumps(config))  # tuples as lists: the form read back from disk

"""`drpt reproduce`: the comparison fixed in plan.py, run over seeds, summarized, and reported.

    drpt reproduce --quick        # the README's main job: SFT, 2 seeds, on a 2-core CPU, into runs/reproduce_quick
    drpt reproduce --headline --out results/reproduce_headline   # how the committed 5-seed run was written
    drpt reproduce --full --device cuda   # GPU scale on the larger GPT-2 small_models/gpt2-large-repro (LARGE_MODEL
                                          # of experiments/build_model.py: `drpt build-model --config large`)

The plan (plan.py) is a list of runs of `drpt train`: per paradigm the endpoints (target-only, standard
training), the oracle (SFT), the Dr rows and the baselines, then the SFT spectrum along each knob. Each run
writes its own folder; a finished run is skipped and an interrupted one resumed, so the whole command resumes
after an interruption (Ctrl-C cancels the queued runs; rerun the same command to continue). A run is reused
only if it was made with the same settings (`run_config`, stored in summary.json and compared exactly). A run
folder left by other settings is refused before anything runs, unless --overwrite, which replaces its run files
(as `drpt train --overwrite`) with a log line; a folder without drpt's marker is always refused, never deleted.
Every planned run's settings are checked (train.check_settings) before the output folder is claimed. Runs go
to `workers` processes, one torch thread each.

The output folder is marked as a reproduction (drpt_run.json, kind "reproduce"): a new or empty folder, or one
of its own, never the --model folder nor a folder holding other files. The default is under runs/, which git
ignores, so the committed results/ change only with an explicit --out. Once a run's summary is written its
checkpoint, final model and metrics.jsonl are removed (--keep-checkpoints, --keep-metrics keep them).

Every run ends with the held-out target evaluation of `drpt train` on both halves (select, report) and a
general-task retention check (the helpful tasks, report half). timing.json records the wall clock and the load
of the last call. Statistics: stats.py; tables, verdicts and figures: report.py.

Shapes: no tensors here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

from tqdm import tqdm

from drpt_ref.data.tasks import TARGET
from drpt_ref.experiments.build_model import LARGE_MODEL
from drpt_ref.experiments.reproduce.plan import (
    MODES,
    POSITIVE_INTS,
    PRIMARY,
    RETENTION_TASKS,
    ReproduceConfig,
    RunSpec,
    paradigms_of,
    plan,
    run_config,
    train_config,
)
from drpt_ref.experiments.reproduce.report import write_report
from drpt_ref.flags import check_device, check_positive_ints, field_comments, parse_bool
from drpt_ref.training.checkpoint import FINAL, find_checkpoint, remove_checkpoints
from drpt_ref.training.host_memory import retain_freed_memory
from drpt_ref.training.model_folder import check_model_folder
from drpt_ref.training.run_files import read_json_or_none, remove_path, write_json_atomic
from drpt_ref.training.run_state import PLACE_FIELDS, check_out_folder, claim_folder, read_marker

log = logging.getLogger(__name__)

def train_defaults() -> dict:
    """TrainConfig's defaults in their JSON form (PLACE_FIELDS aside)."""
    from drpt_ref.training.train import TrainConfig

    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k not in PLACE_FIELDS}))


def config_changes(stored: dict | None, wanted: dict) -> list[str]:
    """'name: stored -> wanted' for each setting that differs (train fields by their own name); [] if equal. A
    train field the stored config lacks (added to drpt after the run was made) counts as its default: a new
    field at its default keeps the old behaviour, so the run is reused."""
    if not stored:
        return ["no settings stored (a summary from before they were)"]
    flat = lambda c: {**c.get("train", {}), **{k: v for k, v in c.items() if k != "train"}}  # noqa: E731
    old, new = flat(stored), flat(wanted)
    old = {**{k: v for k, v in train_defaults().items() if k not in old}, **old}  # fields added since: their default
    keys = sorted(old.keys() | new.keys())
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def stale_run(run_dir: str, config: dict) -> list[str]:
    """Why what run_dir holds was made with other settings than `config` ([] when it is this run's own, or
    empty): the summary of a finished run is compared whole, the config.json of an interrupted one by its
    train fields (PLACE_FIELDS aside)."""
    summary = read_json_or_none(os.path.join(run_dir, "summary.json"))
    if summary is not None:
        return config_changes(summary.get("config"), config)
    stored = read_json_or_none(os.path.join(run_dir, "config.json"))
    if stored is None:
        return []
    fields = train_defaults()
    stored = {"train": {k: v for k, v in stored.items() if k in fields}}  # TrainConfig's own fields
    return config_changes(stored, {"train": config["train"]})


def run_problem(cfg: ReproduceConfig, spec: RunSpec) -> str | None:
    """Why the run's folder may not be used as it is: it holds files but no drpt marker (never touched), or a
    run made with other settings while --overwrite is not given; None when it is new, empty, or this run's."""
    tcfg = train_config(cfg, spec)
    if not os.path.isdir(tcfg.out) or not os.listdir(tcfg.out):
        return None
    if read_marker(tcfg.out) is None:
        return (f"{tcfg.out!r} holds files that drpt did not write and no drpt_run.json; drpt never deletes "
                "them: move them away or choose another --out.")
    changes = stale_run(tcfg.out, run_config(cfg, tcfg))
    if changes and not cfg.overwrite:
        return (f"{tcfg.out!r} holds run {spec.name} made with other settings ({'; '.join(changes)}); pass "
                "--overwrite to replace the runs made with other settings, or choose another --out.")
    return None


def run_one(cfg: ReproduceConfig, spec: RunSpec) -> dict:
    """Train (or resume, or skip) one run, then the retention check; returns and stores its summary.

    Skipped: a summary made with the same settings (run_config) is returned as is. Resumed: an interrupted
    run with the same settings continues from its checkpoint. A run made with other settings is replaced (its
    run files only, as `drpt train --overwrite`) with cfg.overwrite and refused without; a folder without the
    drpt marker is always refused, never deleted (`run_problem`). Unless cfg.keep_checkpoints, the checkpoint
    and final/ go once the summary is written.
    """
    import torch
    from transformers.utils import logging as hf_logging

    from drpt_ref.training.evaluate import evaluate_tasks, load
    from drpt_ref.training.run_state import read_metrics
    from drpt_ref.training.train import train

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()  # one bar over runs is enough
    problem = run_problem(cfg, spec)
    if problem is not None:
        raise ValueError(problem)
    tcfg = train_config(cfg, spec)
    config = run_config(cfg, tcfg)
    summary_path = os.path.join(tcfg.out, "summary.json")
    changes = stale_run(tcfg.out, config)
    if changes:  # cfg.overwrite (run_problem): train --overwrite removes the old run's files, nothing else
        log.warning("run %s in %s was made with other settings (%s); --overwrite: training it again",
                    spec.name, tcfg.out, "; ".join(changes))
    summary = read_json_or_none(summary_path) if not changes else None
    if summary is not None:
        drop_bulk(cfg, tcfg.out)  # a run summarized just before an interruption
        return summary
    resume = not changes and find_checkpoint(tcfg.out) is not None
    start = time.perf_counter()
    train(dataclasses.replace(tcfg, resume=resume, overwrite=not resume and os.path.isdir(tcfg.out)))
    wall = time.perf_counter() - start
    model, tok = load(os.path.join(tcfg.out, FINAL), cfg.device, flag=f"the final model of run {spec.name}")
    retention = evaluate_tasks(model, tok, list(RETENTION_TASKS), n=cfg.retention_n, seed=0, split="report")
    metrics = read_metrics(tcfg.out)
    step_seconds = [sum(r["seconds"].values()) for r in metrics]
    evals = [eval_record(r) for r in metrics if "eval_loss" in r]
    summary = {
        **dataclasses.asdict(spec), "name": spec.name, "row": spec.row, "config": config,
        "final": evals[-1], "evals": evals,
        "retention": sum(r["accuracy"] for r in retention) / len(retention),
        "weights": weights_by_source(metrics, tcfg.eval_every),
        "seconds_per_step": sum(step_seconds) / len(step_seconds), "wall_seconds": wall, "resumed": resume,
    }
    write_json_atomic(summary_path, summary)  # a summary is whole or absent
    drop_bulk(cfg, tcfg.out)
    return json.loads(json.dumps(summary))  # the same form as a summary read back on a rerun


def eval_record(r: dict) -> dict:
    """A metrics record's held-out evaluation: the select half (logged as eval_*) and the report half."""
    return {"step": r["step"], **{f"select_{k}": r[f"eval_{k}"] for k in ("accuracy", "loss", "partial")},
            **{f"report_{k}": r[f"report_{k}"] for k in ("accuracy", "loss", "partial")}}


def weight_source(task: str, corrupted: bool) -> str:
    """The label a general unit's weight is reported under: its task, add3_noisy split by its flag."""
    return task + (" (wrong)" if corrupted else " (right)") if task == "add3_noisy" else task


def weights_by_source(metrics: list[dict], window: int) -> dict:
    """Relative weight of a general unit by source, averaged over windows of `window` steps: w_i over the
    uniform weight sum_j |w_j| / n (1 = standard training's share; per-layer weights averaged over layers).
    Steps whose weights are all 0 (target-only) are left out. Returns {"steps": [window ends], source:
    [value or None per window]}."""
    import numpy as np

    sums: dict[int, dict[str, list[float]]] = {}
    last = max((r["step"] for r in metrics), default=0)
    for r in metrics:
        w = np.asarray(r["weights"], dtype=np.float64).reshape(-1, len(r["sources"])).mean(axis=0)  # (n,)
        scale = np.abs(w).sum() / w.size
        if scale <= 0:
            continue
        end = min(-(-r["step"] // window) * window, last)  # the window's last step (the run's last at most)
        for wi, task, bad in zip(w / scale, r["sources"], r.get("corrupted", [False] * w.size)):
            sums.setdefault(end, {}).setdefault(weight_source(task, bad), []).append(float(wi))
    steps = sorted(sums)
    sources = sorted({k for v in sums.values() for k in v})
    out = {"steps": steps}
    for src in sources:
        out[src] = [float(np.mean(sums[e][src])) if src in sums[e] else None for e in steps]
    return out


def start_eval(cfg: ReproduceConfig) -> dict:
    """The starting model on both held-out halves (the step-0 point of every curve), stored as start.json."""
    import torch

    from drpt_ref.training.evaluate import evaluate_task, load

    path = os.path.join(cfg.out, "start.json")
    stored = read_json_or_none(path)
    if stored is not None and stored.get("model") == cfg.model and stored.get("eval_n") == cfg.eval_n:
        return stored
    torch.set_num_threads(1)
    model, tok = load(cfg.model, cfg.device)
    out = {"model": cfg.model, "eval_n": cfg.eval_n, "step": 0}
    for split in ("select", "report"):
        ev = evaluate_task(model, tok, TARGET, n=cfg.eval_n, seed=0, split=split)
        out.update({f"{split}_{k}": ev[k] for k in ("accuracy", "loss", "partial")})
    write_json_atomic(path, out)
    return out


def drop_bulk(cfg: ReproduceConfig, run_dir: str) -> None:
    """Remove a summarized run's metrics.jsonl (its summary holds what the report uses) unless --keep-metrics
    or --keep-checkpoints (a checkpoint resumes with its log), and its checkpoint and final/ model unless
    --keep-checkpoints."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not (cfg.keep_metrics or cfg.keep_checkpoints) and os.path.lexists(metrics):
        remove_path(metrics)
    if not cfg.keep_checkpoints:
        remove_checkpoints(run_dir)
        if os.path.lexists(os.path.join(run_dir, FINAL)):
            remove_path(os.path.join(run_dir, FINAL))  # a symlink is unlinked, never followed


def check_config(cfg: ReproduceConfig) -> None:
    """Refuse settings that cannot make a reproduction, naming the flag, before any worker starts."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode={cfg.mode!r} must be one of {', '.join(MODES)} (--quick, --headline or --full).")
    check_positive_ints(cfg, POSITIVE_INTS)
    if not isinstance(cfg.spectrum_seeds, int) or cfg.spectrum_seeds < 0:
        raise ValueError(f"--spectrum-seeds must be >= 0 (0: no spectrum), got {cfg.spectrum_seeds!r}.")
    for name in ("lr", "oracle_lr"):
        if not (0 < getattr(cfg, name) <= 10):
            raise ValueError(f"--{name.replace('_', '-')} must be in (0, 10], got {getattr(cfg, name)}.")
    if not isinstance(cfg.oracle_warmup, int) or not 0 <= cfg.oracle_warmup < cfg.steps:
        raise ValueError(f"--oracle-warmup must be in [0, --steps) (steps; the oracle must reach its lr), got "
                         f"{cfg.oracle_warmup!r} with --steps {cfg.steps}.")
    if cfg.oracle_m_target > cfg.oracle_size:
        raise ValueError(f"--oracle-m-target {cfg.oracle_m_target} must be <= --oracle-size {cfg.oracle_size}.")
    if cfg.primary not in PRIMARY:
        raise ValueError(f"--primary {cfg.primary!r} must be one of {PRIMARY}.")
    if cfg.m_target > cfg.target_size:
        raise ValueError(f"--m-target {cfg.m_target} must be <= --target-size {cfg.target_size} (units are drawn "
                         "without replacement).")
    paradigms_of(cfg)
    check_device(cfg.device)
    if not os.path.isdir(cfg.model):
        raise ValueError(f"--model {cfg.model!r} is not a folder; build it with `drpt build-model` (for --full: "
                         f"`drpt build-model --config large --device cuda`, which writes {LARGE_MODEL}).")
    check_model_folder(cfg.model, "--model")
    check_out_folder(cfg.out, "reproduce", model=cfg.model, reuse=True)


def reproduce(cfg: ReproduceConfig) -> list[dict]:
    check_config(cfg)
    specs = plan(cfg)
    from drpt_ref.training.train import check_settings  # torch: not imported for --help

    for tcfg in {json.dumps(dataclasses.asdict(t)): t for t in (train_config(cfg, s) for s in specs)}.values():
        try:  # every planned run, before the folder is claimed (e.g. --n-general above the general pool)
            check_settings(tcfg)
        except ValueError as err:
            raise ValueError(f"a planned run ({tcfg.paradigm} {tcfg.method}) cannot train: {err} (reproduce uses "
                             f"drpt train's defaults for what it does not set: --pool-size {tcfg.pool_size})") from None
    problems = [p for p in (run_problem(cfg, spec) for spec in specs) if p is not None]
    if problems:  # refused before any run is trained or removed
        raise ValueError(f"--out {cfg.out!r}: {len(problems)} of its runs cannot be reused: {problems[0]}")
    claim_folder(cfg.out, "reproduce")
    os.makedirs(os.path.join(cfg.out, "runs"), exist_ok=True)
    write_json_atomic(os.path.join(cfg.out, "reproduce_config.json"), dataclasses.asdict(cfg))
    began, load_start = time.perf_counter(), os.getloadavg()[0]
    start_eval(cfg)
    summaries = run_all(cfg, specs)
    order = {spec.name: i for i, spec in enumerate(specs)}
    summaries.sort(key=lambda s: order[s["name"]])
    write_json_atomic(os.path.join(cfg.out, "summaries.json"), summaries)
    write_json_atomic(os.path.join(cfg.out, "timing.json"), {
        "wall_seconds": time.perf_counter() - began, "load_start": load_start, "load_end": os.getloadavg()[0],
        "cpus": os.cpu_count(), "workers": cfg.workers, "runs": len(specs),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}".strip()})
    return summaries


def run_all(cfg: ReproduceConfig, specs: list[RunSpec]) -> list[dict]:
    """Every run on cfg.workers processes, with a progress bar; on Ctrl-C the queued runs are cancelled and the
    running ones stopped, and the command says how to continue (a rerun resumes)."""
    # each worker keeps freed host blocks mapped as drpt train does (training/host_memory.py), however it was started
    pool = ProcessPoolExecutor(max_workers=cfg.workers, initializer=retain_freed_memory)
    futures = {pool.submit(run_one, cfg, spec): spec for spec in specs}
    summaries = []
    try:
        for fut in tqdm(as_completed(futures), total=len(futures), desc="runs", disable=not cfg.progress):
            summaries.append(fut.result())
    except KeyboardInterrupt:
        for fut in futures:
            fut.cancel()
        for proc in list(getattr(pool, "_processes", {}).values()):  # the running runs stop at once
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise KeyboardInterrupt(f"interrupted after {len(summaries)} of {len(specs)} runs; run the same command "
                                "again to resume (finished runs are kept, interrupted ones resume from their "
                                "last checkpoint).") from None
    pool.shutdown()
    return summaries


def mode_defaults(name: str) -> str:
    """'; --headline: V; --full: V' for a setting a mode changes, '' otherwise (shown in --help)."""
    return "".join(f"; --{mode}: {values[name]}" for mode, values in MODES.items() if name in values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="the default: SFT only, 2 seeds, on the CPU, <= 15 min on an idle 2-core machine")
    mode.add_argument("--headline", dest="mode", action="store_const", const="headline",
                      help="SFT, DPO, GRPO and HPT, 5 seeds, on the CPU: the run committed in "
                           "results/reproduce_headline (135 worker-minutes: about 70 min on 2 idle cores)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="GPU scale: needs --device cuda and the larger model (build it first with `drpt "
                           f"build-model --config large --device cuda`, which writes {LARGE_MODEL})")
    parser.set_defaults(mode="quick")
    parser.epilog = ("Writes into --out: results.md (what was fixed, verdicts, bias-variance checks, tables), "
                     "results.csv, curves.png, spectrum.png, weights.png, summaries.json (one summary per run), "
                     "start.json, reproduce_config.json, timing.json (wall clock, load), and runs/ (one folder per "
                     "run of `drpt train`).")
    comments = field_comments(ReproduceConfig)
    for f in dataclasses.fields(ReproduceConfig):
        if f.name == "mode":
            continue
        kind = {"int": int, "str": str, "float": float, "bool": parse_bool}[f.type]
        extra = dict(nargs="?", const=True, metavar="BOOL") if f.type == "bool" else {}
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                            help=f"{comments.get(f.name, '')} (default: {f.default}{mode_defaults(f.name)})", **extra)


def run(args: argparse.Namespace) -> int:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ReproduceConfig)
             if f.name != "mode" and getattr(args, f.name) is not None}
    cfg = ReproduceConfig(mode=args.mode, **{**MODES[args.mode], **given})
    if cfg.seeds < 2:
        print(f"note: --seeds {cfg.seeds}: every verdict will read 'unsupported' (a paired t-test needs 2 seeds).",
              file=sys.stderr)
    try:
        summaries = reproduce(cfg)
    except KeyboardInterrupt as err:
        print(f"drpt reproduce: {err or 'interrupted'}", file=sys.stderr)
        return 130
    print(write_report(cfg, summaries, start_eval(cfg), read_json_or_none(os.path.join(cfg.out, "timing.json"))))
    return 0

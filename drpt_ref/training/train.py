"""`drpt train`: SFT, DPO or GRPO on the task suite, every step a Dr. Post-Training step.

    drpt train --paradigm sft --method simplex --steps 50 --seed 0 --out runs/sft-simplex
    drpt train --paradigm grpo --method capped_simplex --k 4 --per-layer --out runs/grpo-capped
    drpt train --paradigm sft --method less --less-mode offline --out runs/sft-less   # a selection baseline
    drpt train --paradigm hpt --method hpt --hpt-gamma 0 --out runs/hpt                 # Hybrid Post-Training
    drpt train --model M --target-data t.jsonl --general-data g.jsonl --eval-data e.jsonl   # your own data
    drpt train ... --resume            # continue an interrupted run: ends bitwise equal to an uninterrupted one
    drpt train ... --overwrite         # a new run into the folder of an old one (never done without the flag)

The loop reads top to bottom: config, data, model, then for each step: draw the units (seeded by
the step), build the unit batches of the paradigm, take the Dr step (training/dr_step.py), log, evaluate
the held-out target task at intervals, checkpoint. The paradigms differ only in their unit loss
and how a batch is built (training/step_batches.py); the method only in how (alpha, w) is chosen: a
projection onto its feasible set (core/methods.py), or a weight rule looked up by name in the registry
(training/rules.py: random, less, rds, adapt, adapt_softmax, hpt). A rule's state (LESS's offline subset,
ADAPT's anchor centroid) is saved inside each checkpoint, so --resume stays exact.

Outputs in --out (training/run_state.py): drpt_run.json (the marker of a run folder), config.json,
metrics.jsonl (step, losses, objective, alpha, weights per general unit with its source task, group and corrupted flag,
time per phase, held-out target accuracy and loss at intervals, method_info of a weight rule, batch_info:
HPT's gate counts), checkpoint-NNNNNN/ (the last checkpoint, atomic, verified on --resume:
training/checkpoint.py), final/ (the model and tokenizer, safetensors; a LoRA run: the peft adapter),
drpt_run.lock while the run is written (a second process into the same --out is refused). Nothing is written
before every flag, the --model folder (safetensors only) and, on --resume, the checkpoint are checked; --out may not
overlap --model nor hold anything but a drpt run.

Shapes: see training/train_data.py and training/dr_step.py.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from drpt_ref.distributed.ranks import COMMS, check_run, current_ranks, sync_model, torchrun_group
from drpt_ref.flags import add_config_arguments, check_device, check_finite, check_positive_ints
from drpt_ref.gram.checkpointing import enable_checkpointing
from drpt_ref.gram.precision import AUTOCAST, DTYPES
from drpt_ref.losses.dpo import DPOLoss
from drpt_ref.losses.grpo import GRPOLoss
from drpt_ref.losses.sft import SFTLoss
from drpt_ref.training import dr_step as dr
from drpt_ref.training.checkpoint import STATE, find_checkpoint, load_checkpoint, save_checkpoint, save_final
from drpt_ref.training.coverage import format_coverage, uncovered_trainable
from drpt_ref.training.hpt import HPTLoss
from drpt_ref.training.lora import add_lora, check_lora_settings
from drpt_ref.training.model_folder import check_model_folder, load_model_folder
from drpt_ref.training.optimizer import OPTIMIZERS, make_optimizer
from drpt_ref.training.rules import RuleEnv, check_method_config, make_rule
from drpt_ref.training.run_files import acquire_lock, release_lock
from drpt_ref.training.run_state import (
    MetricsLog,
    check_out_folder,
    check_resumed_config,
    claim_folder,
    new_run_id,
    step_generator,
    write_config,
)
from drpt_ref.training.step_batches import batch_info, build_batch, make_batches  # noqa: F401 (make_batches: API)
from drpt_ref.training.train_data import check_data_flags, data_fingerprint, data_source

PARADIGMS = ("sft", "dpo", "grpo", "hpt")
LR_MAX = 10.0  # a larger step only diverges (and 1e300 would overflow on the first step)
EVAL_KEYS = ("eval_accuracy", "eval_loss", "eval_partial",  # the held-out evaluation of a metrics record
             "report_accuracy", "report_loss", "report_partial", "eval_reward")  # eval_reward: GRPO on files
HELD_OUT = ("eval", "select", "report")  # the held-out splits (data/task_base.py)
DATA_SHA256 = "data_sha256"  # config.json: {flag: sha256} of the data files and the reward module (train_data.py)


@dataclass
class TrainConfig:
    paradigm: str = "sft"  # sft | dpo | grpo | hpt (HPT units: SFT or RL per prompt, training/hpt.py)
    method: str = "simplex"  # a feasible set of drpt_ref.METHODS, or a weight rule of rules.RULES
    per_layer: bool = False  # one feasible set per covered linear layer, solved as one batch
    solver: str = "batched"  # batched (torch) | compiled (QP as one torch.compile graph, slow to build) | exact | cvxpy
    gram: str = "ghost"  # ghost (exact, from hooks) | exact (per-unit autograd) | sketch (random projections)
    sketch_dim: int = 64  # sketch only: the dimension a and e are projected to
    steps: int = 50  # optimizer steps
    seed: int = 0  # data sets, per-step draws and GRPO sampling all follow from it
    n_general: int = 16  # general units per step (the columns of G)
    m_target: int = 4  # target units per step (their mean gradient is g_T)
    target_size: int = 32  # the scarce target training set (suite; a --target-data file is used whole)
    pool_size: int = 2000  # the general pool (suite; a --general-data file is used whole)
    optimizer: str = "adamw"  # adamw (torch's fused kernel where it has one, training/optimizer.py) | sgd
    lr: float = 1e-3  # learning rate of the covered parameters (0 < lr <= 10)
    warmup: int = 0  # steps of linear lr warmup: step s uses lr * min(1, s / warmup) (0 = constant lr throughout)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    k: float = 4.0  # topk / capped_simplex: units selected
    tau_rel: float = 0.5  # softmax: temperature relative to the spread of b
    ridge_rel: float = 0.0  # subspace: ridge relative to the mean diagonal of K
    radius_rel: float = 0.5  # ball: radius relative to ||g_T - mean||
    lam: float = 0.5  # mix: the weight of g_T
    beta: float = 0.1  # DPO temperature
    group_size: int = 4  # GRPO completions per prompt
    temperature: float = 1.0  # GRPO sampling temperature
    reward: str = "exact"  # GRPO reward on the suite: exact (0/1) | partial (fraction of correct characters)
    std_normalize: bool = False  # GRPO: divide advantages by the group std
    clip_eps: float = 0.0  # GRPO PPO clip (0 = none; the step is on-policy, so the ratio is 1 anyway)
    kl_coef: float = 0.0  # GRPO k3 KL to the initial model (0 = none)
    max_new_tokens: int = 8  # GRPO completion length limit
    eval_every: int = 10  # steps between held-out evaluations (and at the last step)
    eval_n: int = 200  # held-out target prompts per evaluation
    eval_split: str = "eval"  # held-out prompts of the evaluation: eval | select | report (the halves of eval)
    report_split: str = ""  # a second held-out split evaluated at the same steps, logged as report_* ('' = none)
    checkpoint_every: int = 10  # steps between checkpoints (and at the last step)
    dtype: str = "float32"  # the weights: float32 | float64 (solver-equivalence runs) | bfloat16 | float16 (GPU only)
    autocast: str = ""  # '' (none) | bfloat16 | float16: the capture under torch.autocast over float32 weights
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward (non-reentrant)
    comm: str = "auto"  # under torchrun, what ranks gather per layer: auto (the smaller) | tokens (a, e) | units
    device: str = "cpu"  # cpu | cuda
    model: str = "small_models/gpt2-tiny"  # the starting checkpoint (a local folder; nothing is downloaded)
    out: str = "runs/default"  # run directory (new, empty, or a drpt run; never inside --model)
    resume: bool = False  # continue the run in --out from its last checkpoint (verified first)
    overwrite: bool = False  # replace the drpt run in --out (checkpoint, metrics, final/); without it, refused
    progress: bool = True  # show a progress bar and, at the start, the table of what is trained (training/coverage.py)
    # ---- LoRA and what is trained (training/lora.py, training/coverage.py, theory/lora.md) ---------------------------
    lora_r: int = 0  # LoRA rank: train new peft adapters of this rank, the base frozen (0 = no LoRA; drpt_ref[lora])
    lora_alpha: float = 0.0  # LoRA: adapter outputs scaled by lora_alpha / lora_r (0 = lora_r, scale 1)
    lora_targets: str = ""  # LoRA: module names, comma-separated (q_proj,v_proj), all-linear, or '' (peft's default)
    train_uncovered: bool = False  # also train what the Gram leaves out by the gradient of alpha L_T + sum_i w_i l_i
    # ---- weight rules (training/rules.py): selection baselines, ADAPT, HPT -------------------------------------------
    less_mode: str = "online"  # less: online (top-k of each batch) | offline (a subset of the pool chosen once)
    less_dim: int = 16  # less: projection dimension per side of the Kronecker sketch (dim^2 numbers per layer)
    less_fraction: float = 0.05  # less offline: fraction of the pool kept (at least n_general units)
    rds_pool: str = "last"  # rds: last (hidden state of each row's last token, as LESS's RDS) | mean (answer mean)
    adapt_tau: float = 1.0  # adapt: gate temperature, sigmoid(score / tau) (softmax variant: softmax(score / tau))
    adapt_refresh: int = 10  # adapt: R, steps between re-encodings of the anchors (the target set)
    adapt_ramp: float = 1.0  # adapt: pooling weights ∝ (1 - r) + r t / N (1: ∝ t, as reported; 0: plain mean)
    adapt_tokens: str = "answer"  # adapt: pooled positions, answer | all (every real token)
    adapt_score: str = "mean_cosine"  # adapt: mean_cosine (phi . mean anchor phi) | centroid_cosine
    adapt_reduction: str = "sum"  # adapt: weights / sum (sum) | / n (mean) | raw (none)
    adapt_w_max: float = 10.0  # adapt: upper clip of a gate weight
    hpt_gamma: int = 0  # hpt: SFT on the demonstration when at most gamma of the group are correct, else RL
    hpt_sft_coef: float = 1.0  # hpt: the coefficient of the SFT term
    # ---- your own data: local files in TRL's conventions (data/files.py, theory/own_data.md; drpt_ref[data]) ---------
    target_data: str = ""  # target set file, .jsonl/.parquet/.csv in TRL's columns ('' = the built-in suite)
    general_data: str = ""  # general pool file: the same columns, plus a source label per row
    eval_data: str = ""  # held-out target file: greedy exact match, loss; GRPO: reward ('' = no evaluation)
    source_column: str = "source"  # the general file's column of source labels (weights are logged by source)
    reward_fn: str = ""  # grpo on files: package.module:function, called f(prompt, completion) -> float
    max_length: int = 0  # files: tokens per row; prompt cut from the left, completion from the right (0 = model's)


def check_config(cfg: TrainConfig) -> dict:
    """Refuse a TrainConfig that cannot train, naming the flag: its settings (check_settings), then --out; returns
    check_settings' data files."""
    files = check_settings(cfg)
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them.")
    check_out_folder(cfg.out, "train", model=cfg.model, reuse=cfg.resume or cfg.overwrite)
    return files


def check_settings(cfg: TrainConfig) -> dict:
    """Refuse settings that cannot train, naming the flag: everything but the --out folder (which `drpt
    reproduce` checks itself before any of its runs starts). Returns {flag: DataFile} of the --target-data,
    --general-data and --eval-data files, each read once ({} on the suite: training/train_data.py)."""
    if cfg.paradigm not in PARADIGMS:
        raise ValueError(f"paradigm={cfg.paradigm!r} is unknown; use one of {PARADIGMS}.")
    check_method_config(cfg)  # the method name and its rule's parameters
    dr.check_step_args(cfg.method, cfg.solver, cfg.gram, rule=cfg.method not in dr.METHODS)
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={cfg.optimizer!r} must be one of {OPTIMIZERS}.")
    dr.check_precision(cfg.dtype, cfg.autocast, cfg.device, cfg.optimizer)  # theory/precision.md
    positive_ints = ("steps", "n_general", "m_target", "target_size", "pool_size", "sketch_dim", "eval_every",
                     "eval_n", "checkpoint_every", "max_new_tokens")
    check_positive_ints(cfg, positive_ints)
    if not cfg.target_data and (cfg.m_target > cfg.target_size or cfg.n_general > cfg.pool_size):
        raise ValueError("--m-target must be <= --target-size and --n-general <= --pool-size (units are drawn "
                         "without replacement).")
    files = check_data_flags(cfg)  # --target-data and the other file flags, read once (training/train_data.py)
    if cfg.paradigm in ("grpo", "hpt") and cfg.group_size < 2:
        raise ValueError(f"--group-size must be >= 2 for {cfg.paradigm} (with one completion every group-relative "
                         "advantage is 0 and nothing trains).")
    check_finite(cfg)
    if cfg.eval_split not in HELD_OUT or cfg.report_split not in HELD_OUT + ("",):
        raise ValueError(f"--eval-split {cfg.eval_split!r} / --report-split {cfg.report_split!r}: each must be one of "
                         f"{HELD_OUT} (--report-split may be '' for none); training data never come from them.")
    checks = [("lr", 0 < cfg.lr <= LR_MAX, f"in (0, {LR_MAX:g}]"), ("weight-decay", cfg.weight_decay >= 0, ">= 0"),
              ("warmup", cfg.warmup >= 0, ">= 0 (steps)"),
              ("k", cfg.k >= 1, ">= 1 (units selected; it is clipped to n at each step)"),
              ("tau-rel", cfg.tau_rel > 0, "> 0"), ("ridge-rel", cfg.ridge_rel >= 0, ">= 0"),
              ("radius-rel", cfg.radius_rel >= 0, ">= 0"), ("lam", 0 <= cfg.lam <= 1, "in [0, 1]"),
              ("beta", cfg.beta > 0, "> 0"), ("temperature", cfg.temperature > 0, "> 0"),
              ("clip-eps", cfg.clip_eps >= 0, ">= 0"), ("kl-coef", cfg.kl_coef >= 0, ">= 0")]
    for flag, ok, rule in checks:
        if not ok:
            raise ValueError(f"--{flag} must be {rule}, got {getattr(cfg, flag.replace('-', '_'))}.")
    if cfg.kl_coef and cfg.paradigm != "grpo":
        raise ValueError(f"--kl-coef is a GRPO term; paradigm {cfg.paradigm!r} would ignore it: leave it at 0.")
    if cfg.weight_decay and cfg.optimizer != "adamw":
        raise ValueError("--weight-decay is AdamW's decoupled decay; --optimizer sgd would ignore it: leave it at 0.")
    check_device(cfg.device)
    check_model_folder(cfg.model, "--model")
    check_lora_settings(cfg)  # --lora-*, --train-uncovered (training/lora.py)
    if cfg.comm not in COMMS:
        raise ValueError(f"--comm {cfg.comm!r} is unknown; use one of {COMMS} (theory/distributed.md, section 2).")
    return files


def unit_loss_of(cfg: TrainConfig):
    if cfg.paradigm == "sft":
        return SFTLoss()
    if cfg.paradigm == "dpo":
        return DPOLoss(cfg.beta)
    if cfg.paradigm == "hpt":
        return HPTLoss(cfg.group_size, sft_coef=cfg.hpt_sft_coef, clip_eps=cfg.clip_eps or None,
                       std_normalize=cfg.std_normalize)
    return GRPOLoss(cfg.group_size, clip_eps=cfg.clip_eps or None, kl_coef=cfg.kl_coef)


def setup_rule(cfg: TrainConfig, tok, model, ref_model, unit_loss, target_set, pool, resumed: dict | None):
    """The weight rule of cfg.method (None for a projection), prepared or resumed from the checkpoint's extra
    state `resumed` (None for a new run); and the pool to draw from."""
    gen = step_generator(cfg.seed, 0, 2)  # step 0: the offline work before training
    env = RuleEnv(cfg, tok, model, unit_loss, target_set, pool,
                  lambda units: build_batch(cfg, tok, model, ref_model, units, gen))
    rule = make_rule(cfg.method, env)
    if rule is None:
        return None, pool
    if resumed is None:
        rule.prepare(env)
        return rule, rule.restrict_pool(pool)
    path = os.path.join(find_checkpoint(cfg.out), STATE)
    if not isinstance(resumed.get("rule_state"), dict):
        raise ValueError(f"{path}: the checkpoint holds no state of the weight rule {cfg.method!r}; start a new "
                         "run with --overwrite.")
    try:
        rule.load_state_dict(resumed["rule_state"])
        centroid = getattr(rule, "centroid", None)  # ADAPT: one number per hidden dimension of the model
        hidden = model.get_input_embeddings().embedding_dim  # n_embd, hidden_size: each architecture's name
        if torch.is_tensor(centroid) and tuple(centroid.shape) != (hidden,):
            raise ValueError(f"the ADAPT centroid has shape {tuple(centroid.shape)}, the model's hidden size is "
                             f"{hidden}")
        return rule, rule.restrict_pool(pool)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: the state of the weight rule {cfg.method!r} does not fit this run ({err}); "
                         "start a new run with --overwrite.") from None


def train(cfg: TrainConfig) -> str:
    """Run (or resume) the training; return the run directory. Everything is checked (flags, --model, --out,
    on resume the config and the checkpoint) before anything is written. Under torchrun (WORLD_SIZE > 1) every
    rank runs this with the same flags: each draws the same units and steps on its share, rank 0 alone writes
    (theory/distributed.md, section 4)."""
    with torchrun_group(cfg.device) as ranks:  # the process group of torchrun's environment (gloo / nccl), or None
        files = check_config(cfg)  # the data files, read once: their rows and sha256 serve _train
        if cfg.resume:
            if find_checkpoint(cfg.out) is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {cfg.out!r} (the run stopped before its first "
                                        "checkpoint, or never started); start it again with --overwrite instead of "
                                        "--resume.")
        check_run(ranks, cfg.n_general, cfg.m_target, None if cfg.method in dr.METHODS else cfg.method)
        lock = acquire_lock(cfg.out) if ranks is None or ranks.main else None  # one drpt process per run folder
        try:
            return _train(cfg, files)
        finally:
            if lock is not None:
                release_lock(lock)


def _train(cfg: TrainConfig, files: dict | None = None) -> str:
    config = {**dataclasses.asdict(cfg), DATA_SHA256: data_fingerprint(cfg, files)}  # changed data refuse --resume
    defaults = {**dataclasses.asdict(TrainConfig()), DATA_SHA256: {}}  # a field the stored config lacks
    run_id = check_resumed_config(cfg.out, config, defaults=defaults) if cfg.resume else new_run_id(config)
    torch.manual_seed(cfg.seed)
    dtype = DTYPES[cfg.dtype]  # half precision: theory/precision.md
    # ---- model: dropout off (eval mode) so per-unit gradients are deterministic -------------------------------
    model, tok = load_model_folder(cfg.model, "--model", trainable=True)  # a LoRA adapter folder: trained on
    model = model.to(cfg.device, dtype).eval()
    model = add_lora(model, cfg)  # --lora-r: new peft adapters, the base frozen (training/lora.py)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)  # active during each capture (gram/checkpointing.py)
    ranks = current_ranks()  # under torchrun: rank 0 alone writes files (theory/distributed.md, section 4)
    main = ranks is None or ranks.main
    sync_model(model, ranks)  # several ranks: refuse DDP/FSDP/DTensor, every rank starts from rank 0's weights
    ref_model = copy.deepcopy(model).requires_grad_(False) if cfg.paradigm in ("dpo", "grpo") else None
    outside = uncovered_trainable(model)  # trainable but outside the Gram: frozen, or --train-uncovered
    params = dr.freeze_uncovered(model, train_uncovered=cfg.train_uncovered)
    uncovered = outside if cfg.train_uncovered else []
    params = params + [dict(model.named_parameters())[name] for name in uncovered]
    if cfg.progress and main:
        print(format_coverage(model, outside, cfg.train_uncovered), flush=True)
    optimizer = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)  # fused AdamW where torch has it
    start, resumed = load_checkpoint(cfg.out, model, optimizer, run_id) if cfg.resume else (0, None)
    if cfg.steps < start:
        raise ValueError(f"--steps {cfg.steps} is below the step of the checkpoint in {cfg.out!r} ({start}); "
                         f"resume with --steps >= {start}.")
    # ---- data and the weight rule (its resumed state checked): before anything in --out changes ------------------
    data = data_source(cfg, tok, model, files)  # the suite, or --target-data files (training/train_data.py)
    target_set, pool = data.sets()
    unit_loss = unit_loss_of(cfg)
    rule, pool = setup_rule(cfg, tok, model, ref_model, unit_loss, target_set, pool, resumed)
    # ---- the run folder: claimed only now, after every check ------------------------------------------------------
    if not cfg.resume and main:
        removed = claim_folder(cfg.out, "train", overwrite=cfg.overwrite)
        if removed:
            print(f"--overwrite: removed the previous run's {', '.join(removed)} from {cfg.out}")
    stale_eval = cfg.resume and start % cfg.eval_every != 0 and start != cfg.steps  # evaluated as a run ended there
    log = None
    if main:
        log = MetricsLog(cfg.out, resume_step=start if cfg.resume else None, drop=EVAL_KEYS if stale_eval else ())
        write_config(cfg.out, config, run_id)
    knobs = dr.Knobs(cfg.k, cfg.tau_rel, cfg.ridge_rel, cfg.radius_rel, cfg.lam)
    # ---- loop ------------------------------------------------------------------------------------------------
    bar = tqdm(range(start + 1, cfg.steps + 1), desc=f"{cfg.paradigm}/{cfg.method}",
               disable=not (cfg.progress and main))
    for step in bar:
        for group in optimizer.param_groups:  # a function of the step alone, so --resume stays exact
            group["lr"] = cfg.lr * min(1.0, step / cfg.warmup) if cfg.warmup else cfg.lr
        t0 = time.perf_counter()
        general, target, units = make_batches(cfg, step, tok, model, ref_model, target_set, pool)
        t_data = time.perf_counter() - t0
        rec = dr.dr_step(model, optimizer, unit_loss, general, target, cfg.method, knobs, per_layer=cfg.per_layer,
                         solver=cfg.solver, gram=cfg.gram, sketch_dim=cfg.sketch_dim, seed=cfg.seed * 7919 + step,
                         rule=rule, step=step, autocast=cfg.autocast, uncovered=uncovered, comm=cfg.comm)
        rec.update(step=step, sources=[u.task for u in units], groups=[u.group for u in units],
                   corrupted=[bool(getattr(u, "corrupted", False)) for u in units],  # a wrong shown answer
                   batch_info=batch_info(general, target))
        rec["seconds"]["data"] = t_data
        if main and (step % cfg.eval_every == 0 or step == cfg.steps):  # the ranks hold the same weights
            rec.update(data.evaluate(model, tok))  # eval_* (and report_*) keys of the held-out target set
            bar.set_postfix(acc=f"{rec.get('eval_accuracy', float('nan')):.3f}", loss=f"{rec['loss_target']:.3f}")
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise ValueError(f"step {step}: the parameters are no longer finite (the run diverged); lower --lr "
                             f"(now {cfg.lr:g}).")
        if not main:
            continue
        log.write(rec)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            log.sync()  # the log the checkpoint refers to is on disk first
            save_checkpoint(cfg.out, step, model, optimizer,
                            extra={} if rule is None else {"rule_state": rule.state_dict()}, run_id=run_id)
    if main:
        save_final(cfg.out, model, tok)
    return cfg.out


# ---- command line ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from drpt_ref.training.rules import ALL_METHODS

    choices = {"paradigm": PARADIGMS, "method": ALL_METHODS, "solver": dr.SOLVERS, "gram": dr.GRAMS,
               "optimizer": ("adamw", "sgd"), "dtype": tuple(DTYPES), "autocast": AUTOCAST,
               "reward": ("exact", "partial"), "comm": COMMS}
    add_config_arguments(parser, TrainConfig, choices)


def run(args: argparse.Namespace) -> int:
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    out = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 alone writes the run, and says so
        print(f"run written to {out}")
    return 0

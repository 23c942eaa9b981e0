"""Build small_models/gpt2-tiny from nothing: a GPT-2 pre-trained on the general pool.

The model sees a seeded stream of the general pool (data/tasks.py) plus a little target-format text
(`add3` at a small weight), with the loss on the answer and <eos> only (prompts are random digits:
there is nothing to learn from them). It ends up good at the helpful tasks and weak but not
hopeless on the target, which is the starting point the post-training experiments need: SFT has
room to improve and GRPO gets non-zero reward from the first step.

    drpt build-model --overwrite                      # rebuild the shipped checkpoint (CPU, a few minutes)
    drpt build-model --config large --device cuda     # 6 layers x 256 for GPU reproductions: writes
                                                      # small_models/gpt2-large-repro, the model of `reproduce --full`
    drpt build-model --steps 40 --out /tmp/m          # any field of BuildConfig is a --key value

Deterministic: seeds python and torch, deterministic torch algorithms, a fixed thread count;
same config and same machine type -> bitwise the same weights. Writes model.safetensors,
config.json, the tokenizer files, card.json (config, accuracies, time) and README.md (the card).
--out must be new, empty, or a folder built by `drpt build-model` (its card.json), which only --overwrite
replaces; anything else is refused before training (`check_build_out`).

Shapes:
    input_ids, attention_mask, labels   (B, T)   one training batch, right-padded
    logits                              (B, T, V) V = vocabulary size (50)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from drpt_ref.data.tasks import general_pool, get_task, parse_weights
from drpt_ref.data.tokenizer import build_tokenizer, encode_sft, save_tokenizer
from drpt_ref.flags import check_out_path, field_comments, parse_bool
from drpt_ref.training.evaluate import answer_nll, evaluate_tasks, format_table
from drpt_ref.training.run_files import read_json_or_none, write_bytes_atomic

# Default mixture: the general pool at equal weight, plus the target's format at a small weight.
DEFAULT_MIX = "add2:1,carry:0.5,copy:1,reverse:1,sort:1,add3_rev:0.8,add3_noisy:0.3,add3:0.25"


@dataclass
class BuildConfig:
    config: str = "tiny"  # preset: 'tiny' (the shipped CPU model) or 'large' (6 x 256 for GPUs, into gpt2-large-repro)
    n_layer: int = 3  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # width of the residual stream
    n_positions: int = 64  # longest sequence the model can read (tasks use < 24)
    steps: int = 4500  # optimizer steps
    batch_size: int = 64  # sequences per step
    lr: float = 3e-3  # peak AdamW learning rate, reached after warmup, then cosine to lr / 10
    warmup: int = 100  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only)
    grad_clip: float = 1.0  # global gradient-norm clip
    mix: str = DEFAULT_MIX  # 'task:weight,...' mixture of the pre-training stream
    seed: int = 0  # seeds the data stream, the initialization and everything else
    device: str = "cpu"  # 'cpu' or 'cuda'
    threads: int = 1  # torch CPU threads: fixed for bitwise reproducibility; 1 is fastest on a shared CPU
    eval_n: int = 500  # held-out prompts per task for the card
    eval_seed: int = 0  # which held-out prompts the card uses
    out: str = "small_models/gpt2-tiny"  # output folder ('' = do not write)
    progress: bool = True  # show the tqdm bar


# Where the 'large' preset writes its model, and where `drpt reproduce --full` reads it (one name for both).
LARGE_MODEL = "small_models/gpt2-large-repro"

PRESETS = {  # fields a preset changes; explicit --key value overrides still win
    "tiny": {},
    "large": {"n_layer": 6, "n_head": 8, "n_embd": 256, "steps": 10000, "batch_size": 128, "lr": 1e-3,
              "out": LARGE_MODEL},
}


def make_config(overrides: dict | None = None) -> BuildConfig:
    """BuildConfig from a preset plus overrides; unknown keys or presets are ValueErrors."""
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(BuildConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys: {', '.join(sorted(known))}")
    preset = overrides.get("config", "tiny")
    if preset not in PRESETS:
        raise ValueError(f"config={preset!r} is not a preset; use one of {', '.join(PRESETS)}")
    cfg = BuildConfig(**{**PRESETS[preset], **overrides})
    parse_weights(cfg.mix)  # fail early on a bad mixture
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd={cfg.n_embd} must be divisible by n_head={cfg.n_head}")
    return cfg


def seed_everything(cfg: BuildConfig) -> None:
    random.seed(cfg.seed)  # the task generators use their own seeded random.Random streams
    torch.manual_seed(cfg.seed)  # initialization (numpy draws no random numbers here)
    torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    torch.use_deterministic_algorithms(True)


def make_model(cfg: BuildConfig, tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    gcfg = GPT2Config(vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return GPT2LMHeadModel(gcfg)


def lr_at(step: int, cfg: BuildConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr / 10 at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac)))


def train(cfg: BuildConfig):
    """Pre-train from scratch; returns (model, tokenizer, final mean loss of the last 100 steps)."""
    seed_everything(cfg)
    tok = build_tokenizer()
    model = make_model(cfg, tok).to(cfg.device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    stream = general_pool(cfg.steps * cfg.batch_size, seed=cfg.seed, split="train",
                          weights=parse_weights(cfg.mix))
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="pre-training", disable=not cfg.progress)
    for step in bar:
        chunk = stream[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        batch = encode_sft(tok, [s.prompt for s in chunk], [s.answer for s in chunk])
        batch = {k: v.to(cfg.device) for k, v in batch.items()}
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = answer_nll(logits, batch["labels"])  # mean NLL over answer + eos tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    return model, tok, float(np.mean(losses[-100:]))


def build(cfg: BuildConfig) -> dict:
    """Train, evaluate on held-out prompts, and (if cfg.out) write the checkpoint and its card."""
    start = time.time()
    model, tok, final_loss = train(cfg)
    train_seconds = time.time() - start
    rows = evaluate_tasks(model, tok, "all", n=cfg.eval_n, seed=cfg.eval_seed)
    card = {"config": dataclasses.asdict(cfg), "parameters": sum(p.numel() for p in model.parameters()),
            "final_train_loss": final_loss, "train_seconds": round(train_seconds, 1),
            "torch": torch.__version__, "eval": {"n": cfg.eval_n, "seed": cfg.eval_seed, "split": "eval"},
            "accuracy": {r["task"]: r["accuracy"] for r in rows},
            "partial": {r["task"]: r["partial"] for r in rows},
            "loss": {r["task"]: r["loss"] for r in rows}, "groups": {r["task"]: r["group"] for r in rows}}
    if cfg.out:
        write_checkpoint(cfg, model, card, rows)
    return {"model": model, "tokenizer": tok, "card": card, "rows": rows}


def write_checkpoint(cfg: BuildConfig, model, card: dict, rows: list[dict]) -> None:
    os.makedirs(cfg.out, exist_ok=True)
    model.save_pretrained(cfg.out, safe_serialization=True)
    save_tokenizer(cfg.out)
    write_bytes_atomic(os.path.join(cfg.out, "README.md"),
                       render_card(card, format_table(rows), command_line(cfg)).encode())
    write_bytes_atomic(os.path.join(cfg.out, "card.json"),  # last: the card marks a finished build
                       json.dumps(card, indent=2, sort_keys=True).encode())


def command_line(cfg: BuildConfig) -> str:
    """The shortest `python -m drpt_ref build-model ...` that recreates cfg."""
    base = dataclasses.asdict(make_config({"config": cfg.config}))
    diff = [f"--{k.replace('_', '-')} {v}" for k, v in dataclasses.asdict(cfg).items()
            if v != base[k] and k != "progress"]
    parts = ["python -m drpt_ref build-model"] + ([f"--config {cfg.config}"] if cfg.config != "tiny" else [])
    return " ".join(parts + [d for d in diff if not d.startswith("--config ")])


def render_card(card: dict, table: str, command: str) -> str:
    """The README.md model card, from card.json's numbers (so the two cannot disagree)."""
    c = card["config"]
    mix = parse_weights(c["mix"])
    total = sum(mix.values())
    mix_lines = "\n".join(f"| {k} | {card['groups'][k]} | {w / total:.1%} |" for k, w in mix.items())
    return f"""# gpt2-tiny: a character-level GPT-2 for the drpt_ref task suite

Built by `drpt_ref/experiments/build_model.py`; nothing here was downloaded. Loads offline with
`AutoModelForCausalLM.from_pretrained("small_models/gpt2-tiny")` and
`AutoTokenizer.from_pretrained("small_models/gpt2-tiny")`.

## Model
`GPT2LMHeadModel`: {c['n_layer']} layers, {c['n_head']} heads, width {c['n_embd']}, context {c['n_positions']},
no dropout, tied input/output embeddings; **{card['parameters']:,} parameters**. Character-level
tokenizer (drpt_ref/data/tokenizer.py): one token per character, `<pad>`=0, `<eos>`=1, `<bos>`=2
(unused), `<unk>`=3. Weights in `model.safetensors`.

## Data (pre-training)
{c['steps']} steps x {c['batch_size']} sequences `prompt + answer + <eos>`, loss on the answer and
`<eos>` only, drawn from the "train" split (drpt_ref/data/tasks.py) with seed {c['seed']}. Mixture
(`--mix {c['mix']}`):

| task | group | share |
|---|---|---|
{mix_lines}

The target task itself (add3) is only a little of the stream; the misaligned tasks use the
target's prompts: add3_rev answers with reversed digits, add3_noisy in the target's format with
{get_task("add3_noisy").p_wrong:.0%} wrong answers. So the model meets the target's prompts in two
conflicting formats, which is why its zero-shot target accuracy is low.

## Training
AdamW (betas 0.9, 0.98), peak lr {c['lr']}, {c['warmup']} warmup steps, cosine to lr/10, weight decay
{c['weight_decay']} on matrices, gradient clip {c['grad_clip']}, seed {c['seed']}, {c['threads']} CPU threads,
deterministic algorithms, torch {card['torch']}. Final training loss (mean of the last 100 steps)
{card['final_train_loss']:.4f}; training took {card['train_seconds']} s on the build machine.

## Held-out accuracy
Greedy decoding on n={card['eval']['n']} prompts per task from the "eval" split (prompts no training
stream draws), seed {card['eval']['seed']}; accuracy = the task's exact verifier, partial = mean
fraction of correct characters, loss = NLL per answer token of the correct answer. The same
numbers are in `card.json`.

```
{table}
```

Reproduce: `drpt eval --model small_models/gpt2-tiny --task all --n {card['eval']['n']} --seed {card['eval']['seed']}`

## Rebuild
```
{command}
```
Same seed and thread count on the same kind of machine gives the same weights.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per BuildConfig field, spelled with hyphens like every other command (--n-layer); the
    underscore spelling (--n_layer) of earlier model cards is kept as an alias."""
    comments = field_comments(BuildConfig)
    for f in dataclasses.fields(BuildConfig):
        kind = parse_bool if f.type in (bool, "bool") else type(f.default)
        flags = ["--" + f.name.replace("_", "-")] + (["--" + f.name] if "_" in f.name else [])
        parser.add_argument(*flags, dest=f.name, type=kind, default=None,
                            help=f"{comments.get(f.name, '')} (default {f.default!r}, or the preset's value)")


    parser.add_argument("--overwrite", type=parse_bool, nargs="?", const=True, default=None, metavar="BOOL",
                        help="replace a model that `drpt build-model` wrote in --out (default: False: refused)")


def _is_build_card(path: str) -> bool:
    card = read_json_or_none(path)
    return isinstance(card, dict) and {"config", "parameters", "accuracy"} <= card.keys()


def check_build_out(out: str, overwrite: bool) -> None:
    """Refuse an --out that build-model must not write: a file, a folder holding files it did not write (no
    build-model card.json), or an earlier build without --overwrite. Writes nothing."""
    check_out_path(out, "--out")
    if not os.path.isdir(out) or not os.listdir(out):
        return
    if not _is_build_card(os.path.join(out, "card.json")):
        raise ValueError(f"--out {out!r} holds files that `drpt build-model` did not write (no card.json of its "
                         "own); drpt writes a model only into a new or empty folder or one it built: choose "
                         "another --out.")
    if not overwrite:
        raise ValueError(f"--out {out!r} holds a model built by `drpt build-model` already; replace it with "
                         "--overwrite, or choose another --out.")


def run(args) -> int:
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    overwrite = bool(overrides.pop("overwrite", False))
    cfg = make_config(overrides)
    if cfg.out:
        check_build_out(cfg.out, overwrite)
    result = build(cfg)
    print(format_table(result["rows"]))
    print(f"parameters {result['card']['parameters']:,}; trained in {result['card']['train_seconds']} s")
    return 0

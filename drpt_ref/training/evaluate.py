"""Evaluation on held-out prompts: greedy exact-match accuracy, partial credit and answer loss.

Held out means the task's "eval" split (data/task_base.py): prompts whose stable hash falls in the
10% eval bucket, which no training stream of any task ever draws. `seed` picks which eval
prompts (with replacement) are drawn, so (task, n, seed) fixes the set exactly.

    greedy_generate(model, tok, prompts)          batched greedy decoding with left padding
    answer_loss(model, tok, prompts, answers)     mean NLL per answer token (eos included)
    evaluate_task(model, tok, task, n, seed)      -> {"task", "group", "n", "accuracy", "partial", "loss"}
    evaluate_tasks(...), format_table(rows)       several tasks, and the printed table
    evaluate_units(model, tok, units, max_new)    held-out units of a data file (data/files.py IdsPrompt):
                                                  exact match and loss of the reference, and the reward

    drpt eval --model small_models/gpt2-tiny --task all

Accuracy is the task's own verifier on the completion (text before the first <eos>); "partial"
is the mean partial-credit reward; "loss" is teacher-forced on the task's correct answers (for
add3_noisy, the true sums, not its corrupted labels).

For a data file the accuracy is the exact match of greedy decoding with the row's reference completion (and
<eos>), computed by teacher forcing in the same forward pass as the loss: greedy decoding reproduces the
reference exactly when every reference token is the argmax after its prefix (eq. (5) in theory/own_data.md).
With a reward function (GRPO) the greedy completions are generated and scored.

Shapes:
    input_ids, attention_mask, position_ids   (B, T) prompts, left-padded
    logits                                    (B, T, V) on the first pass, (B, 1, V) after
    generated                                 (B, S) S <= max_new_tokens
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from drpt_ref.data.sampling import cache_keyword
from drpt_ref.data.tasks import get_task, task_names
from drpt_ref.data.tokenizer import IGNORE, encode_prompts, encode_sft, encode_sft_ids, prepare_tokenizer
from drpt_ref.flags import check_device, check_out_path, check_positive_ints
from drpt_ref.training.model_folder import load_model_folder
from drpt_ref.training.run_files import read_json_or_none, write_json_atomic

MAX_NEW_TOKENS = 8  # longest answer (6 characters) + <eos>, plus one to see a missing stop


def greedy_generate(model, tok, prompts: list, max_new_tokens: int = MAX_NEW_TOKENS,
                    batch_size: int = 256) -> list[str]:
    """Greedy completion of each prompt (text or token ids), cut at the first <eos> (kept whole if none comes),
    decoded without special tokens."""
    return [tok.decode(row, skip_special_tokens=True)
            for row in greedy_ids(model, tok, prompts, max_new_tokens, batch_size)]


@torch.no_grad()
def greedy_ids(model, tok, prompts: list, max_new_tokens: int = MAX_NEW_TOKENS,
               batch_size: int = 256) -> list[list[int]]:
    """The greedy completion's ids of each prompt (text or token ids), before the first <eos>."""
    device = next(model.parameters()).device
    eos, cache = tok.eos_token_id, cache_keyword(model)  # the KV cache's keyword: 'cache' (transformers 5.x) or not
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = {k: v.to(device) for k, v in encode_prompts(tok, prompts[start:start + batch_size]).items()}
        ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
        past, steps = None, []
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)  # (B,)
        for _ in range(max_new_tokens):
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache: past})
            nxt = res.logits[:, -1].argmax(dim=-1)  # (B,)
            steps.append(nxt)
            done |= nxt == eos
            if bool(done.all()):
                break
            past = getattr(res, cache)
            ids = nxt[:, None]  # (B, 1)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)  # (B, T + s)
            pos = pos[:, -1:] + 1  # (B, 1)
        generated = torch.stack(steps, dim=1).tolist()  # (B, S)
        out.extend(row[:row.index(eos)] if eos in row else row for row in generated)
    return out


def answer_nll(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token NLL on the labelled positions (answer + eos); labels -100 elsewhere."""
    shifted = labels[:, 1:]  # (B, T-1): token t is predicted at position t-1
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), shifted,
                                             ignore_index=IGNORE, reduction=reduction)


@torch.no_grad()
def answer_loss(model, tok, prompts: list[str], answers: list[str], batch_size: int = 256) -> float:
    """Mean negative log-likelihood per answer token (answer characters and <eos>), in nats."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        batch = encode_sft(tok, prompts[start:start + batch_size], answers[start:start + batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += float(answer_nll(logits, batch["labels"], reduction="sum"))
        count += int((batch["labels"] != IGNORE).sum())
    return total / count


def evaluate_task(model, tok, task: str, n: int = 1000, seed: int = 0, split: str = "eval",
                  batch_size: int = 256) -> dict:
    """Accuracy, mean partial credit and answer loss of `model` on n prompts of `task`."""
    t = get_task(task)
    items = t.grpo(n, seed=seed, split=split)
    prompts = [it.prompt for it in items]
    completions = greedy_generate(model, tok, prompts, batch_size=batch_size)
    exact = [t.reward_exact(p, c) for p, c in zip(prompts, completions)]
    partial = [t.reward_partial(p, c) for p, c in zip(prompts, completions)]
    loss = answer_loss(model, tok, prompts, [it.reference for it in items], batch_size=batch_size)
    return {"task": t.name, "group": t.group, "n": n, "seed": seed, "split": split,
            "accuracy": sum(exact) / max(n, 1), "partial": sum(partial) / max(n, 1), "loss": loss}


@torch.no_grad()
def reference_match(model, tok, units: list, batch_size: int = 64) -> tuple[float, float]:
    """(exact match, loss) of the units' reference completions: the fraction of units whose every reference
    token and final <eos> is the model's argmax after its prefix (greedy decoding reproduces it, eq. (5) in
    theory/own_data.md), and the mean NLL per reference token (<eos> included), in nats."""
    device = next(model.parameters()).device
    hits, total, count = 0, 0.0, 0
    for start in range(0, len(units), batch_size):
        chunk = units[start:start + batch_size]
        batch = encode_sft_ids(tok, [u.prompt for u in chunk], [u.reference for u in chunk])
        labels = batch["labels"].to(device)  # (B, T)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits  # (B, T, V)
        total += float(answer_nll(logits, labels, reduction="sum"))
        count += int((labels != IGNORE).sum())
        scored = labels[:, 1:] != IGNORE  # (B, T - 1): position t predicts token t + 1
        right = logits[:, :-1].argmax(-1) == labels[:, 1:]  # (B, T - 1)
        hits += int((right | ~scored).all(dim=1).sum())
    return hits / len(units), total / count


def evaluate_units(model, tok, units: list, max_new_tokens: int, batch_size: int = 64) -> dict:
    """Held-out units of a data file (IdsPrompt): {"accuracy", "loss"} over the units with a reference
    completion (reference_match), and {"reward"}, the mean reward of greedy completions of at most
    max_new_tokens tokens, when the units carry a reward function (GRPO)."""
    out = {}
    with_reference = [u for u in units if u.reference]
    if with_reference:
        out["accuracy"], out["loss"] = reference_match(model, tok, with_reference, batch_size)
    if units and units[0].reward_fn is not None:
        texts = greedy_generate(model, tok, [u.prompt for u in units], max_new_tokens, batch_size)
        out["reward"] = sum(u.reward(t) for u, t in zip(units, texts)) / len(units)
    return out


def evaluate_tasks(model, tok, tasks: str | list[str] = "all", n: int = 1000, seed: int = 0,
                   split: str = "eval", batch_size: int = 256) -> list[dict]:
    names = task_names(tasks) if isinstance(tasks, str) else list(tasks)
    was_training = model.training
    model.eval()
    rows = [evaluate_task(model, tok, name, n, seed, split, batch_size) for name in names]
    model.train(was_training)
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width table; 'se' is the binomial standard error of the accuracy."""
    lines = [f"{'task':<11} {'group':<10} {'n':>5} {'accuracy':>8} {'se':>6} {'partial':>7} {'loss':>7}"]
    for r in rows:
        se = math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / max(r["n"], 1))
        lines.append(f"{r['task']:<11} {r['group']:<10} {r['n']:>5} {r['accuracy']:>8.3f} {se:>6.3f} "
                     f"{r['partial']:>7.3f} {r['loss']:>7.3f}")
    return "\n".join(lines)


def load(path: str, device: str = "cpu", flag: str = "--model"):
    """A saved model folder (safetensors + config + tokenizer), from the local disk only, no pickle, no remote
    code (training/model_folder.py); a tokenizer without a pad token pads with eos (data/tokenizer.py)."""
    model, tok = load_model_folder(path, flag)
    return model.to(device).eval(), prepare_tokenizer(tok)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="small_models/gpt2-tiny",
                        help="a local model folder (default: small_models/gpt2-tiny)")
    parser.add_argument("--task", default="all",
                        help="a task name, 'a,b', a group (target/helpful/unrelated/misaligned), or 'all' (default)")
    parser.add_argument("--n", type=int, default=500, help="held-out prompts per task (default: 500, as the card)")
    parser.add_argument("--seed", type=int, default=0, help="which held-out prompts are drawn (default: 0)")
    parser.add_argument("--split", default="eval", help="'eval' (held out, the default) or 'train'")
    parser.add_argument("--batch-size", type=int, default=256, help="prompts per generation batch (default: 256)")
    parser.add_argument("--device", default="cpu", help="'cpu' (default) or 'cuda'")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--json", default="", help="also write the rows to this file (new, or an earlier "
                        "`drpt eval --json` table; never inside --model)")


def run(args) -> int:
    check_positive_ints(args, ("n", "batch_size", "threads"))
    if args.split not in ("eval", "train"):
        raise ValueError(f"--split {args.split!r} must be 'eval' (held out) or 'train'.")
    check_device(args.device)
    if args.json:
        check_json_out(args.json, args.model)
    torch.set_num_threads(args.threads)
    model, tok = load(args.model, args.device)
    rows = evaluate_tasks(model, tok, args.task, args.n, args.seed, args.split, args.batch_size)
    print(format_table(rows))
    if args.json:
        write_json_atomic(args.json, rows)  # replaces the name (a symlink too), never writes through it
    return 0


def _is_eval_table(path: str) -> bool:
    """Whether `path` holds what `drpt eval --json` writes: a JSON list of rows with task, n and accuracy."""
    rows = read_json_or_none(path)
    return isinstance(rows, list) and all(isinstance(r, dict) and {"task", "n", "accuracy"} <= r.keys()
                                          for r in rows)


def check_json_out(path: str, model: str) -> None:
    """Refuse a --json path inside the --model folder, a folder, or an existing file that is not an earlier
    eval table (drpt replaces only what it wrote)."""
    check_out_path(os.path.dirname(os.path.abspath(path)), "--json")
    real, folder = os.path.realpath(path), os.path.realpath(model)
    if real == folder or real.startswith(folder.rstrip(os.sep) + os.sep):
        raise ValueError(f"--json {path!r} lies inside the --model folder {model!r}; drpt never writes into a "
                         "model folder: choose another --json.")
    if os.path.isdir(path):
        raise ValueError(f"--json {path!r} is a folder; name a file to write the rows to.")
    if os.path.lexists(path) and not _is_eval_table(path):
        raise ValueError(f"--json {path!r} exists and is not a table written by `drpt eval --json`; drpt does "
                         "not overwrite it: choose another --json or remove the file.")

"""The data of a training run: a scarce target set, a general pool, and per-step batches of units.

A data source (`DataSource`) gives the target set, the general pool (every unit labelled by source)
and the held-out evaluation. Two implement it: the built-in task suite (`SuiteData`: `target_size`
units of the target task's train split, `pool_size` units of every non-target task, the task's verifier
on held-out prompts) and local files in TRL's conventions (`FileData`, data/files.py, chosen by
--target-data; theory/own_data.md). Each step draws m target units and n general units without
replacement, from a generator seeded by (seed, step) (run_state.step_generator), so a step's batch
depends on nothing but the step. Suite units hold text, file units token ids; the batch builders
below take either, and GRPO builds its rows from the ids as sampled (never decoded and re-encoded).

Units per paradigm (theory/losses.md):
    sft    one (prompt, answer) row                          RowBatch(rows_per_unit=1)
    dpo    (prompt + chosen, prompt + rejected) rows          RowBatch(rows_per_unit=2), extras ref_logprob (R,)
    grpo   G sampled completions of one prompt                RowBatch(rows_per_unit=G), extras advantages (R,)

Shapes: input_ids, attention_mask, loss_mask (R, T); R = units * rows_per_unit.
"""

from __future__ import annotations

import os

import torch

from drpt_ref.data.files import DataFile, IdsPrompt, check_columns, load_reward_fn, read_data_file, read_units
from drpt_ref.data.sampling import sample_completions
from drpt_ref.data.tasks import TARGET, general_pool, get_task
from drpt_ref.data.tokenizer import IGNORE, encode_sft, encode_sft_ids, encode_text, prepare_tokenizer
from drpt_ref.losses.dpo import sequence_logprob
from drpt_ref.losses.grpo import group_advantages
from drpt_ref.losses.unit_batch import RowBatch, token_logprobs
from drpt_ref.training.evaluate import evaluate_task, evaluate_units


def load_sets(kind: str, target_size: int, pool_size: int, seed: int) -> tuple[list, list]:
    """(target set, general pool) of samples of `kind` ('sft', 'dpo' or 'grpo'), from the train split."""
    target = getattr(get_task(TARGET), kind)(target_size, seed, "train")
    return target, general_pool(pool_size, seed, "train", kind)


def draw(items: list, count: int, generator: torch.Generator) -> list:
    """`count` distinct items, in a random order fixed by the generator."""
    if count > len(items):
        raise ValueError(f"cannot draw {count} units from a set of {len(items)}; lower the batch size or "
                         "raise the set size")
    order = torch.randperm(len(items), generator=generator)[:count].tolist()
    return [items[i] for i in order]


def rows_batch(tok, prompts: list, answers: list, rows_per_unit: int, device) -> RowBatch:
    """Right-padded prompt + answer + <eos> rows; the loss mask is the answer and <eos>.

    A prompt or an answer is a string (encoded), or token ids taken exactly as they are (a sampled
    completion, a file's encoded unit).
    """
    if all(isinstance(x, str) for x in list(prompts) + list(answers)):
        enc = encode_sft(tok, prompts, answers)
    else:
        ids = lambda x: encode_text(tok, x) if isinstance(x, str) else list(x)  # noqa: E731
        enc = encode_sft_ids(tok, [ids(p) for p in prompts], [ids(a) for a in answers])
    return RowBatch(enc["input_ids"].to(device), enc["attention_mask"].to(device),
                    (enc["labels"] != IGNORE).long().to(device), rows_per_unit)


def sft_batch(tok, samples, device="cpu") -> RowBatch:
    return rows_batch(tok, [s.prompt for s in samples], [s.answer for s in samples], 1, device)


@torch.no_grad()
def dpo_batch(tok, pairs, ref_model, device="cpu") -> RowBatch:
    """Rows (chosen, rejected) per pair, with the frozen reference model's sequence log-probs."""
    prompts = [p.prompt for p in pairs for _ in range(2)]
    answers = [a for p in pairs for a in (p.chosen, p.rejected)]
    batch = rows_batch(tok, prompts, answers, 2, device)
    ref_lp = token_logprobs(ref_model, batch.input_ids, batch.attention_mask)  # (R, T - 1)
    batch.extras["ref_logprob"] = sequence_logprob(ref_lp, batch.shifted_loss_mask(ref_lp.dtype))  # (R,)
    return batch


def unit_reward(prompt, completion: str, kind: str) -> float:
    """The reward of one completion: a file prompt's reward function, or the suite task's verifier of `kind`."""
    if isinstance(prompt, IdsPrompt):
        return prompt.reward(completion)
    return get_task(prompt.task).reward(prompt.prompt, completion, kind)


def grpo_batch(tok, model, prompts, group_size: int, generator: torch.Generator, *, max_new_tokens: int = 8,
               temperature: float = 1.0, reward: str = "exact", std_normalize: bool = False,
               device="cpu") -> tuple[RowBatch, torch.Tensor]:
    """Sample G completions per prompt with `model`, reward them, and build the unit batch.

    Returns the batch (extras: advantages (R,)) and the rewards (U, G).
    """
    groups, sampled = sample_completions(model, tok, [p.prompt for p in prompts], group_size, max_new_tokens,
                                         temperature, generator)
    rewards = torch.tensor([[unit_reward(p, c, reward) for c in comps]
                            for p, comps in zip(prompts, groups)], dtype=torch.float64)  # (U, G)
    batch = rows_batch(tok, [p.prompt for p in prompts for _ in range(group_size)],
                       [ids for comps in sampled for ids in comps], group_size, device)  # the ids as sampled
    adv = group_advantages(rewards, std_normalize)  # (U, G) eq. (4) in theory/losses.md
    batch.extras["advantages"] = adv.reshape(-1).to(device)  # (R,)
    return batch, rewards


# ---- data sources: the built-in suite and local files, one interface ----------------------------------------

class DataSource:
    """What a run reads: the target set, the general pool (each unit's source in `.task`, its group in `.group`),
    and the held-out evaluation logged in metrics.jsonl."""

    def sets(self) -> tuple[list, list]:
        """(target set, general pool), lists of units of the run's paradigm."""
        raise NotImplementedError

    def evaluate(self, model, tok) -> dict:
        """The held-out metrics of a metrics record (keys eval_*, report_*); {} when nothing is held out."""
        raise NotImplementedError


class SuiteData(DataSource):
    """The built-in task suite (data/tasks.py): the target task, the labelled general pool, the verifier."""

    def __init__(self, cfg):
        self.cfg = cfg

    def sets(self) -> tuple[list, list]:
        c = self.cfg
        return load_sets("grpo" if c.paradigm == "hpt" else c.paradigm, c.target_size, c.pool_size, c.seed)

    def evaluate(self, model, tok) -> dict:
        """Accuracy (the task's verifier on greedy completions), loss and partial credit on --eval-n held-out
        prompts of --eval-split, and of --report-split as report_* when set."""
        c = self.cfg
        ev = evaluate_task(model, tok, TARGET, n=c.eval_n, seed=0, split=c.eval_split)
        rec = {"eval_accuracy": ev["accuracy"], "eval_loss": ev["loss"], "eval_partial": ev["partial"]}
        if c.report_split:
            rep = evaluate_task(model, tok, TARGET, n=c.eval_n, seed=0, split=c.report_split)
            rec.update(report_accuracy=rep["accuracy"], report_loss=rep["loss"], report_partial=rep["partial"])
        return rec


class FileData(DataSource):
    """Local files in TRL's conventions (data/files.py): --target-data, --general-data (sources from
    --source-column), --eval-data (the first --eval-n rows), GRPO rewards from --reward-fn; every row encoded
    once with the model's tokenizer and cut to `max_length` tokens (None: no cut). `files`: {flag: DataFile} of
    the files already read (check_data_flags), else each is read here."""

    def __init__(self, cfg, tok, max_length: int | None, files: dict[str, DataFile] | None = None):
        reward_fn = load_reward_fn(cfg.reward_fn) if cfg.paradigm == "grpo" else None
        kw = dict(max_length=max_length, source_column=cfg.source_column, reward_fn=reward_fn,
                  max_new_tokens=cfg.max_new_tokens)
        read = {flag: f.table for flag, f in (files or {}).items()}
        self.target = read_units(cfg.target_data, "--target-data", cfg.paradigm, "target", tok,
                                 table=read.get("--target-data"), **kw)
        self.pool = read_units(cfg.general_data, "--general-data", cfg.paradigm, "general", tok,
                               table=read.get("--general-data"), **kw)
        self.held_out = read_units(cfg.eval_data, "--eval-data", cfg.paradigm, "eval", tok,
                                   table=read.get("--eval-data"), **kw)[:cfg.eval_n] if cfg.eval_data else []
        self.max_new_tokens = cfg.max_new_tokens

    def sets(self) -> tuple[list, list]:
        return self.target, self.pool

    def evaluate(self, model, tok) -> dict:
        """eval_accuracy (greedy exact match of the reference), eval_loss (its NLL per token), eval_reward (GRPO:
        the reward function on greedy completions), as far as the held-out rows allow (training/evaluate.py)."""
        if not self.held_out:
            return {}
        return {f"eval_{k}": v for k, v in evaluate_units(model, tok, self.held_out, self.max_new_tokens).items()}


def context_length(model) -> int | None:
    """The model's longest sequence (config.max_position_embeddings, or GPT-2's n_positions); None if unstated."""
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def data_fingerprint(cfg, files: dict[str, DataFile] | None = None) -> dict[str, str]:
    """{flag: sha256 of the file} of the run's data files and of the --reward-fn module's source; {} on the suite.
    Stored in config.json, so that --resume refuses data that changed since the run began. `files`: {flag:
    DataFile} of the data files already read (check_data_flags), whose sha256 is taken as it is."""
    import hashlib
    import importlib.util

    paths = {f"--{name.replace('_', '-')}": getattr(cfg, name) for name in ("target_data", "general_data", "eval_data")
             if getattr(cfg, name)}
    if cfg.reward_fn:
        spec = importlib.util.find_spec(cfg.reward_fn.partition(":")[0])
        if spec is not None and spec.origin and os.path.isfile(spec.origin):
            paths["--reward-fn"] = spec.origin
    out, read = {}, files or {}
    for flag, path in paths.items():
        if flag in read and read[flag].path == path:
            out[flag] = read[flag].sha256
            continue
        with open(path, "rb") as f:
            out[flag] = hashlib.sha256(f.read()).hexdigest()
    return out


def data_source(cfg, tok, model, files: dict[str, DataFile] | None = None) -> DataSource:
    """The run's data: the suite when cfg.target_data is '', else the files. Makes the tokenizer fit first (a
    missing pad token defaults to eos, with a message: data/tokenizer.py prepare_tokenizer). --max-length 0
    means the model's context length. ValueError naming --model when the tokenizer's ids do not fit the model's
    embedding (a tokenizer saved with another model). `files`: the data files already read (check_data_flags)."""
    prepare_tokenizer(tok)
    rows = model.get_input_embeddings().num_embeddings
    special = [i for i in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) if i is not None]
    if len(tok) > rows or max(special, default=0) >= rows:
        raise ValueError(f"--model {cfg.model!r}: its tokenizer has {len(tok)} tokens (special ids {special}) but the "
                         f"model's input embedding has {rows} rows, so some ids have no embedding; save the tokenizer "
                         "the model was built with (or resize the model's embeddings) in the --model folder.")
    if not cfg.target_data:
        return SuiteData(cfg)
    limit = context_length(model)
    if cfg.max_length and limit and cfg.max_length > limit:
        raise ValueError(f"--max-length {cfg.max_length} exceeds the model's context length {limit}; lower it (0 = "
                         "the model's context length).")
    data = FileData(cfg, tok, cfg.max_length or limit, files)
    for flag, count, units, source in (("--m-target", cfg.m_target, data.target, "--target-data"),
                                       ("--n-general", cfg.n_general, data.pool, "--general-data")):
        if count > len(units):
            raise ValueError(f"{flag} {count} exceeds the {len(units)} rows of {source} (units are drawn without "
                             f"replacement); lower {flag}.")
    return data


def check_data_flags(cfg) -> dict[str, DataFile]:
    """Refuse data flags that cannot work, naming the flag and the fix: file flags without --target-data, a
    missing or unreadable file, a missing column, a bad --reward-fn import path, a --max-length too short.
    Reads each file once and checks its columns (not yet its tokens: that needs the model's tokenizer); returns
    {flag: DataFile} ({} on the suite), for data_fingerprint and data_source to use without reading again."""
    if cfg.max_length < 0:
        raise ValueError(f"--max-length must be >= 0 (0 = the model's context length), got {cfg.max_length}.")
    if not cfg.target_data:
        extra = [f for f in ("general_data", "eval_data", "reward_fn", "max_length") if getattr(cfg, f)]
        if extra:
            flags = ", ".join("--" + f.replace("_", "-") for f in extra)
            raise ValueError(f"{flags} apply to local data files, and --target-data is '' (the built-in suite): "
                             "pass --target-data too, or drop them.")
        return {}
    if cfg.paradigm == "hpt":
        raise ValueError("--paradigm hpt runs on the built-in suite only (its gate needs the task's exact "
                         "verifier): drop --target-data, or use --paradigm sft, dpo or grpo.")
    if not cfg.general_data:
        raise ValueError("--target-data needs --general-data (the general pool the target gradient is projected "
                         "on), a file with a source column.")
    if cfg.eval_split != "eval" or cfg.report_split:
        raise ValueError("--eval-split and --report-split choose held-out halves of the suite; with --target-data "
                         "the held-out set is --eval-data: leave them at their defaults.")
    if not cfg.source_column:
        raise ValueError("--source-column must name the general file's column of source labels (default 'source').")
    if cfg.paradigm == "grpo":
        if not cfg.reward_fn:
            raise ValueError("--paradigm grpo on files needs --reward-fn package.module:function, called as "
                             "f(prompt, completion) -> float.")
        if cfg.reward != "exact":
            raise ValueError("--reward chooses the suite's verifier; with --target-data the reward is --reward-fn: "
                             "leave --reward at its default.")
        load_reward_fn(cfg.reward_fn)
        if cfg.max_length and cfg.max_length <= cfg.max_new_tokens + 1:
            raise ValueError(f"--max-length {cfg.max_length} leaves no room for a prompt before --max-new-tokens "
                             f"{cfg.max_new_tokens} and <eos>; raise --max-length or lower --max-new-tokens.")
    elif cfg.reward_fn:
        raise ValueError(f"--reward-fn scores GRPO completions; --paradigm {cfg.paradigm} has none: drop it.")
    if cfg.max_length == 1:
        raise ValueError("--max-length 1 leaves no room for a completion; use >= 2 (0 = the model's context).")
    files = [("--target-data", cfg.target_data, "target"), ("--general-data", cfg.general_data, "general")]
    read = {}
    for flag, path, role in files + ([("--eval-data", cfg.eval_data, "eval")] if cfg.eval_data else []):
        read[flag] = read_data_file(path, flag)
        check_columns(read[flag].table, path, flag, cfg.paradigm, role, cfg.source_column)
    return read

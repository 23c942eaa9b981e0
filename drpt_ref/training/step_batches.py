"""The unit batches of one training step: which units are drawn, and how each paradigm turns them into a batch.

A step draws n general and m target units from generators seeded by (seed, step) (run_state.step_generator),
so a step's batches depend on nothing but the step; then each paradigm builds its RowBatch (train_data.py,
hpt.py): SFT rows, DPO (chosen, rejected) rows with the reference model's log-probabilities, GRPO / HPT groups
sampled from the current model (the general batch first: the sampling order is part of the step).

    make_batches(cfg, step, tok, model, ref_model, target_set, pool) -> (general batch, target batch, units)

`cfg` is a training.train.TrainConfig (not imported here: train.py imports this module).

Shapes: see training/train_data.py (input_ids, attention_mask, loss_mask (R, T); R = units * rows_per_unit).
"""

from __future__ import annotations

import torch

from drpt_ref.distributed.ranks import current_ranks, local_units, rank_generator
from drpt_ref.losses.unit_batch import token_logprobs
from drpt_ref.training.hpt import hpt_batch
from drpt_ref.training.run_state import step_generator
from drpt_ref.training.train_data import dpo_batch, draw, grpo_batch, sft_batch


def build_batch(cfg, tok, model, ref_model, units: list, gen_sample: torch.Generator):
    """The unit batch of the paradigm for the given units (GRPO/HPT sample their groups from gen_sample)."""
    if cfg.paradigm == "sft":
        return sft_batch(tok, units, cfg.device)
    if cfg.paradigm == "dpo":
        return dpo_batch(tok, units, ref_model, cfg.device)
    kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, reward=cfg.reward, device=cfg.device)
    if cfg.paradigm == "hpt":
        return hpt_batch(tok, model, units, cfg.group_size, gen_sample, cfg.hpt_gamma, **kw)[0]
    batch, _ = grpo_batch(tok, model, units, cfg.group_size, gen_sample, std_normalize=cfg.std_normalize, **kw)
    if cfg.kl_coef:
        with torch.no_grad():
            batch.extras["ref_logprobs"] = token_logprobs(ref_model, batch.input_ids, batch.attention_mask)
    return batch


def make_batches(cfg, step: int, tok, model, ref_model, target_set, pool):
    """(general batch, target batch, the general units drawn) of one step.

    Under torch.distributed every rank draws the same n and m units and builds the batches of its own share
    (distributed/ranks.py, eq. (1) in theory/distributed.md; GRPO samples with a stream of its rank); the units
    returned are all n drawn, in the order of the step's weights."""
    ranks = current_ranks()
    gen_draw = step_generator(cfg.seed, step, 0)
    # GRPO / HPT sample on the model's device from a generator there (no host copy per token, data/sampling.py)
    gen_sample = rank_generator(step_generator(cfg.seed, step, 1, device=cfg.device), ranks)
    general = draw(pool, cfg.n_general, gen_draw)
    target = draw(target_set, cfg.m_target, gen_draw)
    g_batch = build_batch(cfg, tok, model, ref_model, local_units(general, ranks), gen_sample)  # general first
    return g_batch, build_batch(cfg, tok, model, ref_model, local_units(target, ranks), gen_sample), general


def batch_info(general, target) -> dict:
    """What the batches say beyond the losses: HPT's gate counts (units sent to SFT); {} for other paradigms."""
    if "sft" not in general.extras:
        return {}
    count = lambda b: int(b.extras["sft"].reshape(b.num_units, -1)[:, 0].sum())  # noqa: E731
    return {"sft_units_general": count(general), "sft_units_target": count(target)}

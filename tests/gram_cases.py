"""Tiny random GPT-2s and random SFT, DPO and GRPO row batches (right padding, uneven lengths) for the
loss and Gram tests. float64 throughout; nothing here depends on the shipped model or task suite."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from drpt_ref.losses.dpo import DPOLoss, sequence_logprob
from drpt_ref.losses.grpo import GRPOLoss, group_advantages
from drpt_ref.losses.sft import SFTLoss
from drpt_ref.losses.unit_batch import RowBatch, token_logprobs

VOCAB = 40
GROUP = 3  # GRPO completions per prompt
BETA = 0.5


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).double().eval()


def random_rows(R: int, T: int, gen: torch.Generator) -> RowBatch:
    """R rows of random tokens; lengths in [T // 2, T], a prompt of >= 1 token, an answer of >= 1 token.

    Padded positions hold random tokens too: the masks alone must keep them out.
    """
    ids = torch.randint(0, VOCAB, (R, T), generator=gen)
    length = torch.randint(T // 2, T + 1, (R,), generator=gen)
    length[0] = T  # at least one full-length row
    prompt = torch.stack([torch.randint(1, int(n), (1,), generator=gen)[0] for n in length])
    pos = torch.arange(T)
    attention = (pos[None] < length[:, None]).long()
    answer = ((pos[None] >= prompt[:, None]) & (pos[None] < length[:, None])).long()
    return RowBatch(ids, attention, answer, 1)


def with_units(rows: RowBatch, rows_per_unit: int, extras=None) -> RowBatch:
    return RowBatch(rows.input_ids, rows.attention_mask, rows.loss_mask, rows_per_unit, extras or {})


def make_batch(paradigm: str, units: int, T: int, seed: int, ref_model=None) -> RowBatch:
    """A batch of `units` units of the paradigm; DPO and GRPO extras come from ref_model."""
    gen = torch.Generator().manual_seed(seed)
    if paradigm == "sft":
        return random_rows(units, T, gen)
    k = 2 if paradigm == "dpo" else GROUP
    rows = random_rows(units * k, T, gen)
    with torch.no_grad():
        ref_lp = token_logprobs(ref_model, rows.input_ids, rows.attention_mask)  # (R, T - 1)
    mask = rows.loss_mask[:, 1:].double()
    if paradigm == "dpo":
        return with_units(rows, 2, {"ref_logprob": sequence_logprob(ref_lp, mask)})
    rewards = torch.rand(units, GROUP, generator=gen, dtype=torch.float64)
    old = ref_lp + 0.3 * torch.randn(ref_lp.shape, generator=gen, dtype=torch.float64)  # ratios away from 1
    extras = {"advantages": group_advantages(rewards, std_normalize=True).reshape(-1),
              "old_logprobs": old, "ref_logprobs": ref_lp}
    return with_units(rows, GROUP, extras)


def unit_loss(paradigm: str):
    return {"sft": SFTLoss(), "dpo": DPOLoss(BETA), "grpo": GRPOLoss(GROUP, clip_eps=0.2, kl_coef=0.1)}[paradigm]


def problem(paradigm: str, n: int = 5, m: int = 3, T: int = 12, T_target: int = 9, seed: int = 0):
    """(model, unit loss, general batch, target batch) with different T for general and target."""
    model = tiny_gpt2(seed)
    ref = tiny_gpt2(seed + 100) if paradigm != "sft" else None
    general = make_batch(paradigm, n, T, seed + 1, ref)
    target = make_batch(paradigm, m, T_target, seed + 2, ref)
    return model, unit_loss(paradigm), general, target

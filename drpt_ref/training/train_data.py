"""The data of a training run: a scarce target set, a general pool, and per-step batches of units.

The target set is small and fixed (`target_size` units of the target task's train split); the
general pool is large (`pool_size` units of every non-target task, labelled by source). Each step
draws m target units and n general units without replacement, from a generator seeded by
(seed, step) (run_state.step_generator), so a step's batch depends on nothing but the step.

Units per paradigm (theory/losses.md):
    sft    one (prompt, answer) row                          RowBatch(rows_per_unit=1)
    dpo    (prompt + chosen, prompt + rejected) rows          RowBatch(rows_per_unit=2), extras ref_logprob (R,)
    grpo   G sampled completions of one prompt                RowBatch(rows_per_unit=G), extras advantages (R,)

Shapes: input_ids, attention_mask, loss_mask (R, T); R = units * rows_per_unit.
"""

from __future__ import annotations

import torch

from drpt_ref.data.sampling import sample_completions
from drpt_ref.data.tasks import TARGET, general_pool, get_task
from drpt_ref.data.tokenizer import IGNORE, encode_sft, encode_sft_ids, encode_text
from drpt_ref.losses.dpo import sequence_logprob
from drpt_ref.losses.grpo import group_advantages
from drpt_ref.losses.unit_batch import RowBatch, token_logprobs


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


def rows_batch(tok, prompts: list[str], answers: list, rows_per_unit: int, device) -> RowBatch:
    """Right-padded prompt + answer + <eos> rows; the loss mask is the answer and <eos>.

    An answer is a string, or a list of token ids taken exactly as they are (a sampled completion).
    """
    if all(isinstance(a, str) for a in answers):
        enc = encode_sft(tok, prompts, answers)
    else:
        answer_ids = [encode_text(tok, a) if isinstance(a, str) else list(a) for a in answers]
        enc = encode_sft_ids(tok, [encode_text(tok, p) for p in prompts], answer_ids)
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


def grpo_batch(tok, model, prompts, group_size: int, generator: torch.Generator, *, max_new_tokens: int = 8,
               temperature: float = 1.0, reward: str = "exact", std_normalize: bool = False,
               device="cpu") -> tuple[RowBatch, torch.Tensor]:
    """Sample G completions per prompt with `model`, reward them, and build the unit batch.

    Returns the batch (extras: advantages (R,)) and the rewards (U, G).
    """
    groups, sampled = sample_completions(model, tok, [p.prompt for p in prompts], group_size, max_new_tokens,
                                         temperature, generator)
    rewards = torch.tensor([[get_task(p.task).reward(p.prompt, c, reward) for c in comps]
                            for p, comps in zip(prompts, groups)], dtype=torch.float64)  # (U, G)
    batch = rows_batch(tok, [p.prompt for p in prompts for _ in range(group_size)],
                       [ids for comps in sampled for ids in comps], group_size, device)  # the ids as sampled
    adv = group_advantages(rewards, std_normalize)  # (U, G) eq. (4) in theory/losses.md
    batch.extras["advantages"] = adv.reshape(-1).to(device)  # (R,)
    return batch, rewards

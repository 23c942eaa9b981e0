"""Hybrid Post-Training (HPT, arXiv 2509.04419): per prompt, SFT on the demonstration or RL on its rollouts.

For each prompt q with demonstration y* (the task's reference answer), sample G completions from the
current model and count the correct ones (the task's exact verifier). Then (eq. (8) in
theory/unified_view.md, the official code's `switch_gate`):

    num_correct(q) <= gamma   ->  SFT unit:  sft_coef * (the unified estimator's sft instance on y*)
    num_correct(q) >  gamma   ->  RL unit:   GRPO without std normalisation and without clip
                                             (the official HPT script: grpo_use_std=False, loss_remove_clip=True)

Both branches are instances of the unified estimator (losses/unified_pg.py); the gate only picks the
instance and the rows. A unit is one prompt with G rows either way: an RL unit holds its G
completions, an SFT unit the demonstration G times (the token mean over G identical rows equals
the demonstration's token-mean NLL gradient, so this only costs compute, and keeps units uniform).

The value of a unit loss (what `drpt train` logs, averaged over units, as loss_general / loss_target):
sft_coef * the demonstration's token-mean NLL for an SFT unit (the sft instance reports the NLL, not its
surrogate's constant -1: losses/unified_pg.py, eq. (6') of theory/unified_view.md); for an RL unit the GRPO
surrogate as in the grpo paradigm (on-policy: minus the token mean of the advantages, not a likelihood).
The gradient is the estimator's either way; only the reported value was chosen.

Deviations from the official code (all documented in theory/unified_view.md, section 4): each prompt
weighs the same (token mean within a unit, mean over units) where the official loss sums GRPO's
(sum of tokens / max length) over RL rows and adds sft_coef * token-mean NLL over SFT rows; the
entropy bonus (0.001) is left out; the gate counts exact-match correctness while the RL advantage
uses the run's reward (exact or partial).

In `drpt train --paradigm hpt`, general and target units are both HPT units (general prompts from
the pool with their references as demonstrations); `--method hpt` is the Dr step with alpha = 1,
w = 0, i.e. training on the target task's HPT units only, the general pool ignored (training/rules.py).

Shapes:
    rewards, correct (U, G); num_correct, is_sft (U,); batch rows R = U * G
    extras: "rewards" (R,) the run's reward per row; "sft" (R,) 1.0 on the rows of SFT units
"""

from __future__ import annotations

import torch

from drpt_ref.data.sampling import sample_completions
from drpt_ref.data.tasks import get_task
from drpt_ref.losses import unified_pg as pg
from drpt_ref.losses.unit_batch import RowBatch
from drpt_ref.training.train_data import rows_batch


def hpt_gate(num_correct: torch.Tensor, gamma: int) -> torch.Tensor:
    """True where the prompt gets SFT: num_correct <= gamma (eq. (8)). (U,) -> (U,) bool"""
    if isinstance(gamma, bool) or not isinstance(gamma, int):
        raise ValueError(f"gamma must be an int (a count of correct rollouts), got {gamma!r}")
    return num_correct <= gamma


def hpt_batch(tok, model, prompts, group_size: int, generator: torch.Generator, gamma: int, *,
              max_new_tokens: int = 8, temperature: float = 1.0, reward: str = "exact",
              device="cpu") -> tuple[RowBatch, dict]:
    """Sample, gate and build the unit batch of HPT units. -> (batch, {"num_correct" (U,), "is_sft" (U,)})"""
    groups, sampled = sample_completions(model, tok, [p.prompt for p in prompts], group_size, max_new_tokens,
                                         temperature, generator)
    correct = torch.tensor([[get_task(p.task).reward(p.prompt, c, "exact") for c in comps]
                            for p, comps in zip(prompts, groups)], dtype=torch.float64)  # (U, G) in {0, 1}
    rewards = torch.tensor([[get_task(p.task).reward(p.prompt, c, reward) for c in comps]
                            for p, comps in zip(prompts, groups)], dtype=torch.float64)  # (U, G)
    num_correct = correct.sum(-1).long()  # (U,)
    is_sft = hpt_gate(num_correct, gamma)  # (U,)
    answers = [c for p, ids, s in zip(prompts, sampled, is_sft.tolist())  # RL rows: the ids as sampled
               for c in ([p.reference] * group_size if s else ids)]
    batch = rows_batch(tok, [p.prompt for p in prompts for _ in range(group_size)], answers, group_size, device)
    batch.extras["rewards"] = rewards.reshape(-1).to(device)  # (R,)
    batch.extras["sft"] = is_sft.repeat_interleave(group_size).to(device, torch.float64)  # (R,)
    return batch, {"num_correct": num_correct, "is_sft": is_sft}


class HPTLoss:
    """Per HPT unit: sft_coef * sft instance if the unit is SFT, else the RL instance. -> (U,)

    Value: sft_coef * token-mean NLL of the demonstration (SFT units), the GRPO surrogate (RL units).
    """

    def __init__(self, group_size: int, sft_coef: float = 1.0, clip_eps: float | None = None,
                 std_normalize: bool = False):
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if sft_coef < 0:
            raise ValueError(f"sft_coef must be >= 0, got {sft_coef}")
        self.rows_per_unit = group_size
        self.sft_coef = sft_coef
        self.sft = pg.sft()
        self.rl = pg.grpo(eps=clip_eps, std_normalize=std_normalize)  # HPT: no clip, no std

    def __call__(self, logprobs: torch.Tensor, batch: RowBatch) -> torch.Tensor:
        G = self.rows_per_unit
        if batch.rows_per_unit != G:
            raise ValueError(f"batch.rows_per_unit={batch.rows_per_unit} differs from group_size={G}")
        for key in ("rewards", "sft"):
            if key not in batch.extras:
                raise ValueError(f"batch.extras[{key!r}] (R,) is missing; build the batch with hpt.hpt_batch")

        def group(x):  # (R, ...) -> (U, G, ...)
            return None if x is None else x.to(logprobs.dtype).reshape(-1, G, *x.shape[1:])

        lp, mask = group(logprobs), group(batch.shifted_loss_mask(logprobs.dtype))  # (U, G, T - 1)
        rewards, old = group(batch.extras["rewards"]), group(batch.extras.get("old_logprobs"))  # (U, G), None
        is_sft = group(batch.extras["sft"])[:, 0].bool()  # (U,)
        loss_sft = self.sft_coef * self.sft.unit_loss(lp, mask, rewards)  # (U,)
        loss_rl = self.rl.unit_loss(lp, mask, rewards, old)  # (U,)
        return torch.where(is_sft, loss_sft, loss_rl)  # (U,) eq. (8)

"""GRPO per-unit loss: one prompt with its G sampled completions is one unit (eqs. (4)-(8) in theory/losses.md).

Advantages are group-relative (eq. (4)): A_g = r_g - mean(r), optionally / (std(r) + eps), with the
unbiased std (correction 1, as TRL). They are constants of the step (no gradient).
Per completion token t of completion g, with ratio rho = exp(log pi - log pi_old) (eq. (5)):

    l_{g,t} = -rho A_g                                   no clip
    l_{g,t} = -min(rho A_g, clip(rho, 1-eps, 1+eps) A_g)  PPO clip (eq. (6))
            + kl_coef * (exp(q) - q - 1), q = log pi_ref - log pi   (k3 KL estimator, eq. (7))

Mask: the completion tokens of each row (prompt and padding excluded). Normaliser: the number of
completion tokens in the whole group, so the unit loss is the token mean over the group (eq. (8));
each prompt weighs the same whatever its completions' lengths. With old = current (detached, the
on-policy case) rho = 1 and the gradient is A_g grad log pi.

Shapes:
    rewards (U, G) -> advantages (U, G)
    logprobs, mask, old_logprobs, ref_logprobs (U, G, T - 1), advantages (U, G) -> loss (U,)
    batch.extras: "advantages" (R,); optional "old_logprobs", "ref_logprobs" (R, T - 1)
"""

from __future__ import annotations

import torch

from drpt_ref.deferred import require
from drpt_ref.losses.unit_batch import RowBatch


def group_advantages(rewards: torch.Tensor, std_normalize: bool, eps: float = 1e-4) -> torch.Tensor:
    """A = r - mean_g r, or (r - mean) / (std + eps) (unbiased std), eq. (4) in theory/losses.md. (U, G) -> (U, G)"""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (U, G), got shape {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(-1, keepdim=True)  # (U, G)
    if not std_normalize:
        return centred
    if rewards.shape[1] < 2:
        raise ValueError("std_normalize needs a group size G >= 2 (the std of one reward is undefined)")
    return centred / (rewards.std(-1, keepdim=True) + eps)  # (U, G)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(q) - q - 1, q = log pi_ref - log pi, eq. (7). >= 0"""
    q = ref_logprobs - logprobs
    return torch.exp(q) - q - 1.0


def grpo_unit_loss(logprobs, mask, advantages, old_logprobs=None, *, clip_eps: float | None = None,
                   kl_coef: float = 0.0, ref_logprobs=None) -> torch.Tensor:
    """Token-mean policy-gradient loss per prompt group, eqs. (5)-(8) in theory/losses.md. -> (U,)

    old_logprobs=None means on-policy: old = logprobs.detach() (ratio 1, gradient A grad log pi).
    """
    if logprobs.dim() != 3 or mask.shape != logprobs.shape:
        raise ValueError(f"logprobs and mask must both be (U, G, T - 1); got {tuple(logprobs.shape)}, "
                         f"{tuple(mask.shape)}")
    if tuple(advantages.shape) != tuple(logprobs.shape[:2]):
        raise ValueError(f"advantages must be (U, G) = {tuple(logprobs.shape[:2])}, got {tuple(advantages.shape)}")
    if clip_eps is not None and not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1) or None, got {clip_eps}")
    if kl_coef and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs (the reference model's token log-probs)")
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    mask = mask.bool()
    adv = advantages.to(logprobs.dtype)[..., None]  # (U, G, 1)
    # Outside the mask (prompt, padding: old/ref log-probs there may be padding zeros) the log-ratios are
    # set to 0 before exp, so no overflow can turn into inf * 0 = nan in the value or the gradient.
    ratio = torch.exp(torch.where(mask, logprobs - old_logprobs, 0.0))  # (U, G, T - 1), eq. (5)
    surrogate = ratio * adv
    if clip_eps is not None:  # eq. (6): the pessimistic of the plain and the clipped surrogate
        surrogate = torch.minimum(surrogate, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)
    per_token = -surrogate
    if kl_coef:
        kl = k3_kl(torch.where(mask, logprobs, 0.0), torch.where(mask, ref_logprobs, 0.0))  # eq. (7); 0 off the mask
        per_token = per_token + kl_coef * kl
    count = mask.sum((1, 2)).to(logprobs.dtype)  # (U,) completion tokens of the group: the normaliser of eq. (8)
    require(count != 0, "a group has no completion tokens (mask all zero); drop it or fix its loss_mask")
    return torch.where(mask, per_token, 0.0).sum((1, 2)) / count  # (U,)


class GRPOLoss:
    """The engine-facing form: (token log-probs of a RowBatch, the batch) -> one loss per prompt group."""

    def __init__(self, group_size: int, clip_eps: float | None = None, kl_coef: float = 0.0):
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.rows_per_unit = group_size
        self.clip_eps, self.kl_coef = clip_eps, kl_coef

    def __call__(self, logprobs: torch.Tensor, batch: RowBatch) -> torch.Tensor:
        G = self.rows_per_unit
        if batch.rows_per_unit != G:
            raise ValueError(f"batch.rows_per_unit={batch.rows_per_unit} differs from group_size={G}")
        if "advantages" not in batch.extras:
            raise ValueError("batch.extras['advantages'] (R,) is missing; compute it with group_advantages")

        def group(x):  # (R, ...) -> (U, G, ...)
            return None if x is None else x.to(logprobs.dtype).reshape(-1, G, *x.shape[1:])

        return grpo_unit_loss(group(logprobs), group(batch.shifted_loss_mask(logprobs.dtype)),
                              group(batch.extras["advantages"]), group(batch.extras.get("old_logprobs")),
                              clip_eps=self.clip_eps, kl_coef=self.kl_coef,
                              ref_logprobs=group(batch.extras.get("ref_logprobs")))

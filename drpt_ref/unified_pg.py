"""The unified policy-gradient estimator (UPGE, arXiv 2509.04419): SFT and RL as one formula, four parts.

Per completion token t (eq. (5) in theory/unified_view.md):

    grad_uni = 1_stable * (1 / pi_ref) * A * grad pi_theta

realised as the surrogate loss whose gradient is exactly that (the mask and pi_ref are constants):

    s_t = - 1_stable,t * A * pi_theta(y_t) / pi_ref(y_t).detach()
        = - 1_stable,t * A * exp(log pi_theta - log pi_ref.detach())                        eq. (6)

The four exchangeable parts, each a small function:

    stabilization mask   stable_none            1
                         stable_ppo_clip(eps)   0 where PPO's clip is active: A > 0, rho > 1 + eps or A < 0,
                                                rho < 1 - eps (rho = pi_theta / pi_old); 1 elsewhere   eq. (7)
    denominator pi_ref   ref_pi_theta           pi_theta, detached   -> 1/pi grad pi = grad log pi (SFT, REINFORCE)
                         ref_pi_old             pi_old               -> the importance ratio (PPO, GRPO)
                         ref_one                1                    -> grad pi_theta itself (LUFFY/SRFT off-policy)
    advantage A          adv_one                1                     (SFT)
                         adv_reward             r                     (REINFORCE)
                         adv_group(std)         r - mean_g r [/ std]  (GRPO; loss_grpo.group_advantages)
    likelihood gradient  the surrogate pi_theta / pi_ref.detach() of eq. (6) (`upge_token_surrogate`)

Named instances (`INSTANCES`): sft, reinforce, ppo_clip, grpo, off_policy. The reduction is the token
mean over each unit's rows (one prompt with its G rows; the normaliser is the unit's completion
token count, as eq. (8) in theory/losses.md), so every instance gives one loss per unit.

Shapes:
    logprobs, mask, old_logprobs (U, G, T - 1); rewards (U, G) -> advantages (U, G) -> loss (U,)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from drpt_ref.loss_grpo import group_advantages

# ---- the stabilization mask: (ratio (U, G, T-1), advantages (U, G, 1)) -> {0, 1} (U, G, T-1), no gradient ----


def stable_none(ratio: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(ratio).detach()


def stable_ppo_clip(eps: float) -> Callable:
    """The gradient mask of PPO's clipped surrogate -min(rho A, clip(rho, 1-eps, 1+eps) A), eq. (7)."""
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")

    def stable(ratio: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        r = ratio.detach()
        clipped = ((adv > 0) & (r > 1 + eps)) | ((adv < 0) & (r < 1 - eps))  # where min() picks the constant
        return (~clipped).to(ratio.dtype)

    return stable


# ---- the reference-policy denominator: (logprobs, old_logprobs) -> log pi_ref (U, G, T-1), detached ----------


def ref_pi_theta(logprobs: torch.Tensor, old_logprobs) -> torch.Tensor:
    return logprobs.detach()


def ref_pi_old(logprobs: torch.Tensor, old_logprobs) -> torch.Tensor:
    return logprobs.detach() if old_logprobs is None else old_logprobs.detach()  # None: on-policy, old = current


def ref_one(logprobs: torch.Tensor, old_logprobs) -> torch.Tensor:
    return torch.zeros_like(logprobs).detach()  # log 1 = 0


# ---- the advantage estimate: rewards (U, G) -> advantages (U, G), constants of the step ----------------------


def adv_one(rewards: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(rewards)


def adv_reward(rewards: torch.Tensor) -> torch.Tensor:
    return rewards.clone()


def adv_group(std_normalize: bool) -> Callable:
    def adv(rewards: torch.Tensor) -> torch.Tensor:
        return group_advantages(rewards, std_normalize)  # eq. (4) in theory/losses.md

    return adv


# ---- the likelihood gradient and the reduction ------------------------------------------------------------------


def upge_token_surrogate(logprobs, mask, advantages, log_ref, stable) -> torch.Tensor:
    """Per-token s_t of eq. (6); 0 off the mask. logprobs, mask, log_ref (U, G, T-1), advantages (U, G)."""
    mask = mask.bool()
    adv = advantages.to(logprobs.dtype)[..., None]  # (U, G, 1)
    # where before exp: off the mask log_ref may be padding, and nothing may overflow into inf * 0 = nan
    ratio = torch.exp(torch.where(mask, logprobs - log_ref.detach(), 0.0))  # pi_theta / pi_ref, eq. (6)
    one = stable(ratio, adv)  # (U, G, T-1) the stabilization mask
    return torch.where(mask, -one * adv * ratio, 0.0)


def token_mean_per_unit(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum over the unit's masked tokens / their count. (U, G, T-1) -> (U,)"""
    count = mask.bool().sum((1, 2)).to(per_token.dtype)  # (U,) the normaliser
    if bool((count == 0).any()):
        raise ValueError("a unit has no completion tokens (mask all zero); drop it or fix its loss_mask")
    return per_token.sum((1, 2)) / count


@dataclass(frozen=True)
class Estimator:
    """One instance of the unified estimator: a choice of each of the four parts."""

    name: str
    stable: Callable  # stabilization mask
    denominator: Callable  # log pi_ref
    advantage: Callable  # rewards -> advantages

    def unit_loss(self, logprobs, mask, rewards, old_logprobs=None) -> torch.Tensor:
        """The surrogate's per-unit value; its gradient is eq. (5) token-averaged. -> (U,)"""
        if logprobs.dim() != 3 or mask.shape != logprobs.shape:
            raise ValueError(f"logprobs and mask must both be (U, G, T - 1); got {tuple(logprobs.shape)}, "
                             f"{tuple(mask.shape)}")
        if tuple(rewards.shape) != tuple(logprobs.shape[:2]):
            raise ValueError(f"rewards must be (U, G) = {tuple(logprobs.shape[:2])}, got {tuple(rewards.shape)}")
        adv = self.advantage(rewards.to(logprobs.dtype)).detach()  # (U, G)
        per_token = upge_token_surrogate(logprobs, mask, adv, self.denominator(logprobs, old_logprobs), self.stable)
        return token_mean_per_unit(per_token, mask)


def sft(_=None) -> Estimator:
    return Estimator("sft", stable_none, ref_pi_theta, adv_one)


def reinforce(_=None) -> Estimator:
    return Estimator("reinforce", stable_none, ref_pi_theta, adv_reward)


def ppo_clip(eps: float = 0.2) -> Estimator:
    """PPO with the advantages given as the 'rewards' input (e.g. from GAE): adv_reward passes them through."""
    return Estimator("ppo_clip", stable_ppo_clip(eps), ref_pi_old, adv_reward)


def grpo(eps: float | None = 0.2, std_normalize: bool = True) -> Estimator:
    return Estimator("grpo", stable_ppo_clip(eps) if eps else stable_none, ref_pi_old, adv_group(std_normalize))


def off_policy(std_normalize: bool = True) -> Estimator:
    """LUFFY/SRFT-style term on demonstrations: pi_ref = 1, so the gradient is A grad pi_theta (no 1/pi)."""
    return Estimator("off_policy", stable_none, ref_one, adv_group(std_normalize))


INSTANCES: dict[str, Callable[..., Estimator]] = {
    "sft": sft, "reinforce": reinforce, "ppo_clip": ppo_clip, "grpo": grpo, "off_policy": off_policy,
}

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
                         adv_group(std)         r - mean_g r [/ std]  (GRPO; losses.grpo.group_advantages)
    likelihood gradient  the surrogate pi_theta / pi_ref.detach() of eq. (6) (`upge_token_surrogate`)

Named instances (`INSTANCES`): sft, reinforce, ppo_clip, grpo, off_policy. The reduction is the token
mean over each unit's rows (one prompt with its G rows; the normaliser is the unit's completion
token count, as eq. (8) in theory/losses.md), so every instance gives one loss per unit.

The value a unit loss reports (what `drpt train` logs as loss_general / loss_target) is the surrogate's,
except where the surrogate's value says nothing: with pi_ref = pi_theta detached (sft, reinforce) the
ratio of eq. (6) is 1, so s_t = -A whatever the model (the sft instance would always read -1). Those
instances report the score-function loss -A log pi_theta instead (eq. (6') in theory/unified_view.md):
for sft the demonstration's token-mean NLL, for reinforce -r log pi. Its gradient is the same, and the
gradient is taken from the surrogate all the same (`with_value`), so the update is bit-identical.

Shapes:
    logprobs, mask, old_logprobs (U, G, T - 1); rewards (U, G) -> advantages (U, G) -> loss (U,)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from drpt_ref.losses.grpo import group_advantages

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


def score_function_value(logprobs, mask, advantages) -> torch.Tensor:
    """Per-token -A log pi_theta, 0 off the mask (eq. (6')): the loss whose gradient equals that of eq. (6)
    when pi_ref = pi_theta detached; for A = 1 the NLL. logprobs, mask (U, G, T-1), advantages (U, G)."""
    adv = advantages.to(logprobs.dtype)[..., None]  # (U, G, 1)
    return torch.where(mask.bool(), -adv * logprobs, 0.0)


def with_value(surrogate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """value's value with surrogate's gradient, both exact: value + (s - s) is value (s - s = 0 in floating
    point), and autograd passes the incoming gradient to s unchanged (add and sub scale by 1), so the
    gradient is bit-identical to that of the surrogate alone. Any shape; value is detached."""
    return value.detach() + (surrogate - surrogate.detach())


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
    value: Callable | None = None  # (logprobs, mask, advantages) -> the reported per-token value; None: s_t itself

    def unit_loss(self, logprobs, mask, rewards, old_logprobs=None) -> torch.Tensor:
        """One loss per unit whose gradient is eq. (5) token-averaged (always the surrogate's, eq. (6)); its
        value is the token mean of `value` where the instance has one (sft: the NLL), else of s_t. -> (U,)"""
        if logprobs.dim() != 3 or mask.shape != logprobs.shape:
            raise ValueError(f"logprobs and mask must both be (U, G, T - 1); got {tuple(logprobs.shape)}, "
                             f"{tuple(mask.shape)}")
        if tuple(rewards.shape) != tuple(logprobs.shape[:2]):
            raise ValueError(f"rewards must be (U, G) = {tuple(logprobs.shape[:2])}, got {tuple(rewards.shape)}")
        adv = self.advantage(rewards.to(logprobs.dtype)).detach()  # (U, G)
        per_token = upge_token_surrogate(logprobs, mask, adv, self.denominator(logprobs, old_logprobs), self.stable)
        loss = token_mean_per_unit(per_token, mask)  # (U,)
        if self.value is None:
            return loss
        return with_value(loss, token_mean_per_unit(self.value(logprobs.detach(), mask, adv), mask))  # eq. (6')


def sft(_=None) -> Estimator:
    """The SFT gradient on the rows; reports the token-mean NLL (its surrogate would read -1)."""
    return Estimator("sft", stable_none, ref_pi_theta, adv_one, value=score_function_value)


def reinforce(_=None) -> Estimator:
    """r grad log pi; reports the token mean of -r log pi (its surrogate would read -r)."""
    return Estimator("reinforce", stable_none, ref_pi_theta, adv_reward, value=score_function_value)


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

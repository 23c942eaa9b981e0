"""The registry of training methods that are weight rules, not projections: name -> a small factory.

`drpt train --method NAME` takes the Dr step with either a projection (a method of core/methods.py,
solved by dr_step.solve) or the weight rule built here. Every rule returns (alpha, w) for the same
update assembly, so all methods train the same covered parameters with the same optimizer and log
the same metrics (theory/unified_view.md has the table).

    random          baselines.RandomRule     k uniformly random general units, w = 1/k
    less            baselines.LessRule       top-k by projected-gradient cosine; --less-mode online | offline
    rds             baselines.RdsRule        top-k by hidden-state cosine to the target units
    adapt           adapt.AdaptRule          sigmoid(score / tau) gate on every unit, anchors re-encoded every R steps
    adapt_softmax   adapt.AdaptRule          softmax(score / tau) over the batch
    hpt             TargetRule               alpha = 1, w = 0 under --paradigm hpt: HPT on the target task's units

Shapes: none here; see dr_step.StepContext.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from drpt_ref.core.methods import METHODS
from drpt_ref.data.task_base import Pair, RLPrompt, Sample
from drpt_ref.losses.unit_batch import RowBatch
from drpt_ref.training.adapt import AdaptConfig, AdaptRule
from drpt_ref.training.baselines import LessRule, RandomRule, RdsRule
from drpt_ref.training.dr_step import StepContext, WeightRule
from drpt_ref.training.train_data import rows_batch


@dataclass
class RuleEnv:
    """What a factory (and a rule's offline `prepare`) may use; built once by drpt train."""

    cfg: object  # train.TrainConfig
    tok: object
    model: torch.nn.Module
    unit_loss: Callable
    target_set: list
    pool: list
    build: Callable[[list], RowBatch]  # units -> the paradigm's unit batch (seeded sampling for grpo/hpt)


class TargetRule(WeightRule):
    """alpha = 1, w = 0: the target units' own gradient. Under --paradigm hpt that is HPT itself."""

    def __call__(self, ctx: StepContext):
        return torch.ones(1), torch.zeros(1, ctx.b.shape[-1]), {}


def demonstration(item) -> str:
    """The correct answer shown for a target item: an SFT answer, a DPO chosen, a GRPO/HPT reference."""
    if isinstance(item, Sample):
        return item.answer
    if isinstance(item, Pair):
        return item.chosen
    if isinstance(item, RLPrompt):
        return item.reference
    raise ValueError(f"item of type {type(item).__name__} has no demonstration")


def anchor_batch(env: RuleEnv) -> RowBatch:
    """The target set as (prompt, demonstration) rows: ADAPT's anchors."""
    items = env.target_set
    return rows_batch(env.tok, [x.prompt for x in items], [demonstration(x) for x in items], 1, env.cfg.device)


def adapt_config(c, softmax: bool) -> AdaptConfig:
    """ADAPT's parameters from a TrainConfig (AdaptConfig checks them)."""
    return AdaptConfig(tau=c.adapt_tau, refresh=c.adapt_refresh, ramp=c.adapt_ramp, tokens=c.adapt_tokens,
                       score=c.adapt_score, reduction=c.adapt_reduction, w_max=c.adapt_w_max, softmax=softmax)


def _less(c) -> LessRule:
    return LessRule(c.less_mode, c.less_dim, seed=c.seed, fraction=c.less_fraction, min_size=c.n_general)


def _adapt(env: RuleEnv, softmax: bool) -> AdaptRule:
    return AdaptRule(adapt_config(env.cfg, softmax), anchor_batch(env))


RULES: dict[str, Callable[[RuleEnv], WeightRule]] = {
    "random": lambda env: RandomRule(),
    "less": lambda env: _less(env.cfg),
    "rds": lambda env: RdsRule(env.cfg.rds_pool),
    "adapt": lambda env: _adapt(env, softmax=False),
    "adapt_softmax": lambda env: _adapt(env, softmax=True),
    "hpt": lambda env: TargetRule(),
}

ALL_METHODS = tuple(METHODS) + tuple(RULES)  # everything --method accepts


def check_method_config(cfg) -> None:
    """Refuse an unknown method, or bad parameters of its rule, before anything is built (ValueError)."""
    if cfg.method not in ALL_METHODS:
        raise ValueError(f"method={cfg.method!r} is unknown; use one of {ALL_METHODS}.")
    if cfg.method == "hpt" and cfg.paradigm != "hpt":
        raise ValueError("method='hpt' runs under paradigm='hpt' only (its units are HPT units).")
    if cfg.method == "less":
        _less(cfg)
    if cfg.method == "rds":
        RdsRule(cfg.rds_pool)
    if cfg.method.startswith("adapt"):
        adapt_config(cfg, softmax=False)


def make_rule(method: str, env: RuleEnv) -> WeightRule | None:
    """The weight rule of `method`, or None when it is a projection of the Dr family."""
    return None if method in METHODS else RULES[method](env)

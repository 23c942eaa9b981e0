"""ADAPT (arXiv 2605.05227): online reweighting that keeps every sample, weights from representation similarity.

The method as reported by third parties (notes/adapt_hpt.md, section 1; the official code was not
available), eqs. (9)-(11) in theory/unified_view.md:

    phi(x)  = L2-normalise( sum_t omega_t h_t ),  omega_t ∝ (1 - r) + r t / N     the model's own last hidden
                                                                                  states, later tokens weigh more
    s(x)    = phi(x) . c,  c = mean_v phi(v) over the anchors (the target set)    eq. (10) "mean_cosine"
            | cos(phi(x), c)                                                      "centroid_cosine"
    w(x)    = min(sigmoid(s(x) / max(tau, eps)), w_max)    (no gradient)          eq. (11) sigmoid gate
            | softmax_i(s / tau) over the general batch                           the softmax variant
    then w <- w / sum w ("sum"), w / n ("mean"), or w ("none")                   the reduction

The anchors are re-encoded with the current model every R steps (`refresh`; first at the first step).
Every uncertain choice is a parameter (AdaptConfig): the ramp r, the pooled tokens (answer only or all
real tokens), the score form, tau, the clip, the reduction. Our defaults: r = 1 (omega_t = t / sum j,
as reported), answer tokens, mean_cosine (the reported Eq. 10), tau = 1 (reported default), w_max = 10
(a reimplementation's clip; inactive for the sigmoid), reduction "sum" (so that the weights sum to one
like every other method's and the comparison is at equal step size; "mean" is the reimplementation's
per-sample learning-rate multiplier, "none" the paper's Eq. 7 sum).

In the framework ADAPT is a reweighting (alpha = 0, w >= 0 on the general batch) whose signal is a
representation similarity instead of b = G^T g_T; the softmax variant is the `softmax` method's closed
form (theory/softmax.md) with that signal in place of b. It solves no program of the framework for
this G and g_T; its projection objective is logged like everyone's.

Shapes: hidden (R, T, d); features (U, d); scores, weights (n,); centroid (d,).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drpt_ref.losses.unit_batch import RowBatch
from drpt_ref.training.dr_step import StepContext, WeightRule
from drpt_ref.training.rep_features import last_hidden_states, pool_ramp, unit_features

TAU_EPS = 1e-8  # max(tau, eps) in the gate, as reported
SCORES = ("mean_cosine", "centroid_cosine")
REDUCTIONS = ("sum", "mean", "none")
TOKENS = ("answer", "all")


@dataclass
class AdaptConfig:
    tau: float = 1.0  # temperature of the gate (or of the softmax variant)
    refresh: int = 10  # R: steps between re-encodings of the anchors
    ramp: float = 1.0  # r: 1 = omega_t ∝ t (reported), 0 = plain mean
    tokens: str = "answer"  # pooled positions: the answer tokens, or all real tokens
    score: str = "mean_cosine"  # mean_cosine (phi . mean phi_v) | centroid_cosine (cos to the centroid)
    reduction: str = "sum"  # sum (w / sum w) | mean (w / n) | none (w)
    w_max: float = 10.0  # upper clip of the gate's weight
    softmax: bool = False  # the batch-softmax variant instead of the sigmoid gate

    def __post_init__(self):
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if not isinstance(self.refresh, int) or self.refresh < 1:
            raise ValueError(f"refresh must be an int >= 1 (steps between anchor re-encodings), got {self.refresh}")
        for name, value, allowed in (("score", self.score, SCORES), ("reduction", self.reduction, REDUCTIONS),
                                     ("tokens", self.tokens, TOKENS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} must be one of {allowed}")
        if self.w_max <= 0:
            raise ValueError(f"w_max must be > 0, got {self.w_max}")
        if not 0.0 <= self.ramp <= 1.0:
            raise ValueError(f"ramp must lie in [0, 1] (1: weights ∝ t, 0: plain mean), got {self.ramp}")


def adapt_features(hidden: torch.Tensor, batch: RowBatch, cfg: AdaptConfig) -> torch.Tensor:
    """phi of every unit of the batch: ramped pool of each row, mean over the unit's rows, unit norm. -> (U, d)"""
    positions = batch.loss_mask if cfg.tokens == "answer" else batch.attention_mask  # (R, T)
    return unit_features(pool_ramp(hidden, positions, cfg.ramp), batch.rows_per_unit)


def anchor_centroid(anchor_features: torch.Tensor, score: str) -> torch.Tensor:
    """c = mean_v phi(v) (mean_cosine: not re-normalised) or its direction (centroid_cosine). (a, d) -> (d,)"""
    c = anchor_features.mean(0)
    return c if score == "mean_cosine" else c / c.norm().clamp_min(1e-12)


def adapt_weights(scores: torch.Tensor, cfg: AdaptConfig) -> torch.Tensor:
    """Scores (n,) -> weights (n,), eq. (11); detached: the weights are constants of the step."""
    s = scores.detach()
    if cfg.softmax:
        return torch.softmax(s / cfg.tau, dim=-1)
    w = torch.sigmoid(s / max(cfg.tau, TAU_EPS)).clamp(max=cfg.w_max)
    if cfg.reduction == "sum":
        return w / w.sum()
    if cfg.reduction == "mean":
        return w / w.shape[-1]
    return w


class AdaptRule(WeightRule):
    """ADAPT as a weight rule: alpha = 0, w = adapt_weights(phi(x_i) . c); anchors re-encoded every R steps."""

    needs_hidden = True

    def __init__(self, cfg: AdaptConfig, anchors: RowBatch):
        self.cfg, self.anchors = cfg, anchors  # anchors: the target set as (prompt, demonstration) rows
        self.centroid: torch.Tensor | None = None  # (d,)
        self.encoded_at: int | None = None  # the step of the last encoding

    @torch.no_grad()
    def encode(self, model, step: int) -> None:
        """Re-encode the anchors with the current model (one forward without gradient)."""
        with last_hidden_states(model) as h:
            model(input_ids=self.anchors.input_ids, attention_mask=self.anchors.attention_mask)
        self.centroid = anchor_centroid(adapt_features(h["hidden"], self.anchors, self.cfg), self.cfg.score)
        self.encoded_at = step

    def __call__(self, ctx: StepContext):
        if self.encoded_at is None or ctx.step - self.encoded_at >= self.cfg.refresh:
            self.encode(ctx.model, ctx.step)
        n = ctx.cap.n
        phi = adapt_features(ctx.hidden, ctx.cap.batch, self.cfg)[:n]  # (n, d) the general units
        scores = phi @ self.centroid.to(phi)  # (n,) eq. (10)
        w = adapt_weights(scores, self.cfg)
        return torch.zeros(1), w[None], {"scores": scores.tolist(), "anchors_encoded_at": self.encoded_at}

    def state_dict(self) -> dict:
        if self.centroid is None:
            return {}
        return {"centroid": self.centroid.double().tolist(), "encoded_at": self.encoded_at,
                "dtype": str(self.centroid.dtype).removeprefix("torch.")}

    def load_state_dict(self, state: dict) -> None:
        """Restore the anchor centroid; ValueError unless `state` is what state_dict wrote after an encoding
        (a checkpoint is taken after a step, and every step encodes the anchors first)."""
        if set(state) != {"centroid", "encoded_at", "dtype"}:
            raise ValueError(f"the ADAPT rule state has keys {sorted(state)}, not ['centroid', 'dtype', 'encoded_at']")
        c, at, dtype = state["centroid"], state["encoded_at"], state["dtype"]
        if dtype not in ("float32", "float64") or type(at) is not int or at < 0 or not isinstance(c, list) or \
                not c or not all(type(x) in (int, float) for x in c):
            raise ValueError(f"the ADAPT rule state is malformed (dtype {dtype!r}, encoded_at {at!r}, a centroid "
                             "that must be a non-empty list of numbers)")
        self.centroid = torch.tensor(c, dtype=getattr(torch, dtype))  # (d,)
        self.encoded_at = at

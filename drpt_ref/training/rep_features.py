"""Representation features of units: the model's last hidden states, pooled per row, averaged per unit.

Used by the representation-similarity rules (RDS in training/baselines.py, ADAPT in training/adapt.py). The last hidden
state is the input of the output head (after GPT-2's final layer norm, = hidden_states[-1] of
transformers), read by a forward pre-hook during a forward the step already does (the capture), so
it costs no extra pass. It is detached: no gradient ever flows through a feature or a weight made
from it.

Pooling of one row over its selected positions t = 1..N (the answer tokens, or all real tokens):

    last          phi = h_N                                                       (RDS, as LESS's code)
    ramp (r)      phi = sum_t omega_t h_t,  omega_t ∝ (1 - r) + r t / N,  sum omega = 1    eq. (9) in
                  theory/unified_view.md; r = 1 is ADAPT's reported omega_t = t / sum_j j, r = 0 the plain mean

A unit's feature is the mean of its rows' features (one row for SFT; chosen and rejected for DPO; the
G completions for GRPO), then L2-normalised.

Shapes:
    hidden (R, T, d), positions mask (R, T) -> row features (R, d) -> unit features (U, d), unit-norm
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

EPS = 1e-12  # norms below this count as zero: a zero feature stays zero after normalising


@contextmanager
def last_hidden_states(model):
    """Record the input of the output head of every forward inside the block: yields {"hidden": (R, T, d)}."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("model has no output embeddings (get_output_embeddings() is None); cannot read the "
                         "last hidden states")
    store: dict[str, torch.Tensor] = {}

    def pre_hook(module, args):
        store["hidden"] = args[0].detach()  # (R, T, d): detached, so no weight built from it gets a gradient

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield store
    finally:
        handle.remove()


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| along the last dim (0 stays 0). (..., d) -> (..., d)"""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def ramp_weights(mask: torch.Tensor, ramp: float) -> torch.Tensor:
    """omega_t ∝ (1 - r) + r t / N over each row's selected positions (t = 1..N), sum 1, eq. (9). (R, T) -> (R, T)"""
    if not 0.0 <= ramp <= 1.0:
        raise ValueError(f"ramp must be in [0, 1] (0 = plain mean, 1 = weights proportional to t), got {ramp}")
    m = mask.bool()
    t = m.cumsum(-1).to(torch.float64)  # (R, T) 1..N on the selected positions
    N = t[:, -1:].clamp_min(1.0)  # (R, 1)
    raw = torch.where(m, (1.0 - ramp) + ramp * t / N, 0.0)  # (R, T)
    return raw / raw.sum(-1, keepdim=True).clamp_min(EPS)


def pool_ramp(hidden: torch.Tensor, mask: torch.Tensor, ramp: float) -> torch.Tensor:
    """Position-weighted mean of each row's selected hidden states. (R, T, d), (R, T) -> (R, d)"""
    omega = ramp_weights(mask, ramp).to(hidden.dtype)  # (R, T)
    return torch.einsum("rt,rtd->rd", omega, hidden)


def pool_last(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The hidden state at each row's last selected position. (R, T, d), (R, T) -> (R, d)"""
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), pos, -1).amax(-1).clamp_min(0)  # (R,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def unit_features(row_features: torch.Tensor, rows_per_unit: int) -> torch.Tensor:
    """Mean over each unit's rows, then L2-normalised. (R, d) -> (U, d)"""
    R, d = row_features.shape
    return l2_normalize(row_features.reshape(R // rows_per_unit, rows_per_unit, d).mean(1))

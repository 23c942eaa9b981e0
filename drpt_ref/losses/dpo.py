"""DPO per-unit loss: the sigmoid DPO loss of each preference pair (eq. (2)-(3) in theory/losses.md).

One unit = one pair = two rows, chosen (row 2u) then rejected (row 2u + 1). A sequence's log-prob
is the SUM of its answer-token log-probs (mask: answer tokens; no normaliser, as in DPO). The
frozen reference model's sequence log-probs are inputs (computed once, without gradient).

    loss_u = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])

Shapes:
    logprobs (R, T - 1), mask (R, T - 1) -> sequence_logprob (R,)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected (U,) -> loss (U,)
    batch.extras["ref_logprob"] (R,): the reference sequence log-prob of each row
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from drpt_ref.losses.unit_batch import RowBatch


def sequence_logprob(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(y | x) = sum over answer tokens of the token log-probs, eq. (2) in theory/losses.md. -> (R,)"""
    if logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and mask {tuple(mask.shape)} must have the same shape")
    return torch.where(mask.bool(), logprobs, 0.0).sum(-1)  # (R,); where: nothing leaks from outside the mask


def dpo_unit_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:
    """Sigmoid DPO per pair, eq. (3) in theory/losses.md. All inputs (U,) -> (U,)"""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # (U,) implicit reward margin / beta
    return -F.logsigmoid(beta * margin)  # (U,)


class DPOLoss:
    """The engine-facing form: (token log-probs of a RowBatch, the batch) -> one loss per pair."""

    rows_per_unit = 2

    def __init__(self, beta: float = 0.1):
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta = beta

    def __call__(self, logprobs: torch.Tensor, batch: RowBatch) -> torch.Tensor:
        if batch.rows_per_unit != 2:
            raise ValueError(f"DPO units are (chosen, rejected) row pairs; got rows_per_unit={batch.rows_per_unit}")
        if "ref_logprob" not in batch.extras:
            raise ValueError("batch.extras['ref_logprob'] (R,) is missing: the reference model's sequence log-probs")
        seq = sequence_logprob(logprobs, batch.shifted_loss_mask(logprobs.dtype)).view(-1, 2)  # (U, 2)
        ref = batch.extras["ref_logprob"].to(logprobs.dtype).view(-1, 2)  # (U, 2)
        return dpo_unit_loss(seq[:, 0], seq[:, 1], ref[:, 0], ref[:, 1], self.beta)  # (U,)

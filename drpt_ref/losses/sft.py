"""SFT per-unit loss: the token-mean negative log-likelihood of each example's answer (eq. (1) in theory/losses.md).

One unit = one example = one row. Mask: the answer tokens (prompt and padding excluded).
Normaliser: the number of answer tokens of that example, so every example weighs the same
whatever its length (the projection weights examples, not tokens).

Shapes:
    logprobs (U, T - 1), mask (U, T - 1)  ->  loss (U,)
"""

from __future__ import annotations

import torch

from drpt_ref.deferred import require
from drpt_ref.losses.unit_batch import RowBatch


def sft_unit_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-(1 / |answer_u|) sum_{t in answer_u} log p(y_t | y_<t), eq. (1) in theory/losses.md. -> (U,)"""
    if logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and mask {tuple(mask.shape)} must have the same shape")
    mask = mask.bool()
    count = mask.sum(-1).to(logprobs.dtype)  # (U,) answer tokens per example: the normaliser
    require(count != 0, "an example has no answer tokens (mask row all zero); drop it or fix its loss_mask")
    # where, not multiply: a non-finite log-prob outside the mask must not reach the loss or its gradient
    return -torch.where(mask, logprobs, 0.0).sum(-1) / count  # (U,)


class SFTLoss:
    """The engine-facing form: (token log-probs of a RowBatch, the batch) -> one loss per unit."""

    rows_per_unit = 1

    def __call__(self, logprobs: torch.Tensor, batch: RowBatch) -> torch.Tensor:
        if batch.rows_per_unit != 1:
            raise ValueError(f"SFT units are single rows; got rows_per_unit={batch.rows_per_unit}")
        return sft_unit_loss(logprobs, batch.shifted_loss_mask(logprobs.dtype))  # (U,)

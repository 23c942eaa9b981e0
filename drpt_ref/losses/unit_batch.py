"""Rows grouped into units: the batch every per-unit loss and every Gram engine reads.

A *unit* is what the projection weights (theory/losses.md): one SFT example (one row), one DPO pair
(two rows, chosen then rejected) or one GRPO prompt with its G completions (G rows). A `RowBatch`
holds R right-padded token rows and the unit of each row; units are contiguous blocks of
`rows_per_unit` rows, so `unit = arange(R) // rows_per_unit`. Per-row data a loss needs beyond the
tokens (reference log-probs, old log-probs, advantages) lives in `extras`, each with first dim R.

Shapes:
    input_ids (R, T) long, attention_mask (R, T), loss_mask (R, T) (1 on answer tokens), unit (R,) long
    extras: name -> (R,) or (R, T - 1) (token-aligned with the log-probs)
    token_logprobs: (R, T) tokens -> (R, T - 1), entry t = log p(token t+1 | tokens <= t)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from drpt_ref.deferred import require


@dataclass
class RowBatch:
    input_ids: torch.Tensor  # (R, T) long
    attention_mask: torch.Tensor  # (R, T), 1 on real tokens, 0 on right padding
    loss_mask: torch.Tensor  # (R, T), 1 on the answer tokens scored by the loss
    rows_per_unit: int = 1  # 1 (SFT), 2 (DPO: chosen, rejected), G (GRPO)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if self.input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (R, T), got shape {tuple(self.input_ids.shape)}")
        R, T = self.input_ids.shape
        for name in ("attention_mask", "loss_mask"):
            if tuple(getattr(self, name).shape) != (R, T):
                raise ValueError(f"{name} must have the shape of input_ids {(R, T)}, "
                                 f"got {tuple(getattr(self, name).shape)}")
        if self.rows_per_unit < 1 or R % self.rows_per_unit:
            raise ValueError(f"rows_per_unit={self.rows_per_unit} must divide the number of rows R={R}")
        # deferred.require: read now, or once with the Dr step's record (drpt_ref/deferred.py)
        require(~(self.loss_mask.bool() & ~self.attention_mask.bool()),
                "loss_mask marks padding tokens; set loss_mask = 0 wherever attention_mask = 0")
        require(~self.loss_mask[:, 0].bool(),
                "loss_mask[:, 0] must be 0: the first token has no prediction (shift by one)")
        for name, x in self.extras.items():
            if x.shape[0] != R or (x.dim() == 2 and x.shape[1] != T - 1) or x.dim() > 2:
                raise ValueError(f"extras[{name!r}] must be (R,) or (R, T - 1) = {(R, T - 1)}, got {tuple(x.shape)}")

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_units(self) -> int:
        return self.num_rows // self.rows_per_unit

    @property
    def unit(self) -> torch.Tensor:
        """The unit of each row. (R,) long"""
        return torch.arange(self.num_rows, device=self.input_ids.device) // self.rows_per_unit

    def shifted_loss_mask(self, dtype=None) -> torch.Tensor:
        """The answer mask aligned with token_logprobs: entry t scores token t+1. (R, T - 1)"""
        return self.loss_mask[:, 1:].to(dtype or torch.get_default_dtype())

    def select_units(self, units) -> RowBatch:
        """The sub-batch of the given units (renumbered 0..len-1), same T."""
        units = torch.as_tensor(units, dtype=torch.long, device=self.input_ids.device).reshape(-1)
        k = self.rows_per_unit
        rows = (units[:, None] * k + torch.arange(k, device=units.device)).reshape(-1)  # (len * k,)
        return RowBatch(self.input_ids[rows], self.attention_mask[rows], self.loss_mask[rows], k,
                        {name: x[rows] for name, x in self.extras.items()})


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad the token dim (dim 1) of x with zeros to `length`."""
    return F.pad(x, (0, length - x.shape[1])) if x.dim() == 2 else x


def concat_batches(first: RowBatch, second: RowBatch) -> RowBatch:
    """[first; second] as one batch: rows stacked, tokens right-padded to the longer T.

    The units of `second` follow those of `first` (unit ids offset by first.num_units).
    """
    if first.rows_per_unit != second.rows_per_unit:
        raise ValueError(f"rows_per_unit differs ({first.rows_per_unit} vs {second.rows_per_unit}); "
                         "concatenate batches of the same paradigm and group size")
    if set(first.extras) != set(second.extras):
        raise ValueError(f"extras differ: {sorted(first.extras)} vs {sorted(second.extras)}")
    T = max(first.input_ids.shape[1], second.input_ids.shape[1])

    def cat(x, y, length):
        return torch.cat([_pad_tokens(x, length), _pad_tokens(y, length)])

    extras = {name: cat(first.extras[name], second.extras[name], T - 1) for name in first.extras}
    return RowBatch(cat(first.input_ids, second.input_ids, T), cat(first.attention_mask, second.attention_mask, T),
                    cat(first.loss_mask, second.loss_mask, T), first.rows_per_unit, extras)


def logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | tokens <= t). logits (R, T, V), input_ids (R, T) -> (R, T - 1), float32 for half logits.

    Half-precision logits are widened first (as transformers' own causal-LM loss does): in bf16 the gradient
    softmax - onehot of a confident prediction cancels to 0 or 2^-8 (theory/precision.md, section 4)."""
    x = logits[:, :-1]
    x = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    logp = torch.log_softmax(x, dim=-1)  # (R, T - 1, V)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (R, T - 1)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The model's log-prob of each next token (right padding: positions are 0..T-1). -> (R, T - 1)"""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (R, T, V)
    return logprobs_from_logits(logits, input_ids)

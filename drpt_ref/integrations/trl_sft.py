"""DrSFTTrainer: TRL's SFTTrainer whose update is the Dr step (theory/trl.md, sections 1-2).

The program of each step is the Dr step of training/dr_step.py on SFT units: one unit = one example
of TRL's collated batch (a row; its answer tokens are where TRL's labels are not -100, position 0
excluded, as TRL shifts the labels). The unit loss is one of

    tokens    l_u = (n / N) sum_{t in u} -log p(y_t | y_<t),  N = answer tokens of u's batch     eq. (3), theory/trl.md
    sequence  l_u = (1 / |u|) sum_{t in u} -log p(y_t | y_<t)      eq. (1) in theory/losses.md (drpt train's loss)

`tokens` (the default) is TRL's normaliser: the mean of the n general unit losses is TRL's loss, so
dr_method = "mean" takes TRL's step (eq. (2)); `sequence` weighs every example the same whatever its
length. The target batch gets the same normaliser with its own m and N.

Refused (a ValueError naming the setting): packing and padding-free batches (units share a row), loss_type
"dft", label smoothing, compute_loss_func, an MoE auxiliary loss: the unit loss would not be TRL's loss.

Shapes:
    TRL's batch: input_ids, attention_mask, labels (n, T) -> RowBatch (n rows, 1 per unit)
    extras["token_share"] (n,) = n / N: the per-row scale of the `tokens` unit loss
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl import SFTConfig, SFTTrainer

from drpt_ref.integrations.trl_common import DrArguments, DrTrainerMixin
from drpt_ref.losses.dpo import sequence_logprob
from drpt_ref.losses.sft import SFTLoss
from drpt_ref.losses.unit_batch import RowBatch

NORMALISERS = ("tokens", "sequence")
IGNORE = -100  # TRL's label of a position without loss (prompt, padding)


@dataclass
class DrSFTConfig(DrArguments, SFTConfig):
    """TRL's SFTConfig plus the Dr settings (trl_common.DrArguments) and the SFT unit loss's normaliser."""

    dr_sft_normaliser: str = "tokens"  # tokens: TRL's loss, eq. (3) in theory/trl.md | sequence: mean per example

    def __post_init__(self):
        super().__post_init__()
        self.check_dr()
        if self.dr_sft_normaliser not in NORMALISERS:
            raise ValueError(f"dr_sft_normaliser={self.dr_sft_normaliser!r} is unknown; use one of {NORMALISERS}.")


class TokenShareSFTLoss:
    """l_u = -share_u sum_{t in u} log p(y_t | y_<t), share_u = n / N of u's batch, eq. (3) in theory/trl.md. -> (U,)"""

    rows_per_unit = 1

    def __call__(self, logprobs: torch.Tensor, batch: RowBatch) -> torch.Tensor:
        if "token_share" not in batch.extras:
            raise ValueError("batch.extras['token_share'] (R,) is missing: the n / N scale of each row")
        mask = batch.shifted_loss_mask(logprobs.dtype)  # (U, T - 1)
        return -sequence_logprob(logprobs, mask) * batch.extras["token_share"].to(logprobs.dtype)  # (U,)


def sft_rows(inputs: dict, normaliser: str) -> RowBatch:
    """TRL's collated SFT batch as units: one row each, answer = labels != -100 (position 0 excluded)."""
    if "attention_mask" not in inputs or "labels" not in inputs:
        raise ValueError("the SFT batch needs input_ids, attention_mask and labels (padding-free batches have no "
                         "attention mask: set padding_free=False and packing=False)")
    loss_mask = (inputs["labels"] != IGNORE) & inputs["attention_mask"].bool()  # (n, T)
    loss_mask[:, 0] = False  # TRL scores labels[:, 1:]: the first token has no prediction
    extras = {}
    if normaliser == "tokens":
        n, N = loss_mask.shape[0], int(loss_mask.sum())
        extras["token_share"] = torch.full((n,), n / max(N, 1), dtype=torch.float64,
                                           device=loss_mask.device)  # (n,) eq. (3)
    return RowBatch(inputs["input_ids"], inputs["attention_mask"], loss_mask.long(), 1, extras)


class DrSFTTrainer(DrTrainerMixin, SFTTrainer):
    """SFTTrainer whose update is the Dr step of training/dr_step.py on the general batch and a target batch.

    Arguments: those of trl.SFTTrainer, with args a DrSFTConfig, plus target_dataset (a datasets.Dataset in
    the format of train_dataset, prepared by TRL the same way). Raises ValueError for a setting the Dr step
    cannot honour (named in the message). `dr_history` holds every step's alpha, weights and objective.
    """

    dr_name = "DrSFTTrainer"
    dr_section = "section 2"

    def __init__(self, model, args: DrSFTConfig | None = None, *pos, target_dataset=None, **kwargs):
        if not isinstance(args, DrSFTConfig):
            raise ValueError(f"args must be a DrSFTConfig (TRL's SFTConfig plus the Dr settings), got "
                             f"{type(args).__name__}.")
        self._dr_formatting_func = kwargs.get("formatting_func")
        super().__init__(model, args, *pos, **kwargs)
        self.dr_unit_loss = TokenShareSFTLoss() if args.dr_sft_normaliser == "tokens" else SFTLoss()
        self._dr_init(target_dataset)

    def _dr_unsupported(self) -> list[tuple]:
        args = self.args
        bad = [(args.packing, "packing=True", "units would share a row"),
               (self.padding_free, "padding_free=True", "units would share a row"),
               (args.loss_type != "nll", f"loss_type={args.loss_type!r}", "the unit loss is the NLL"),
               (self.label_smoother is not None, f"label_smoothing_factor={args.label_smoothing_factor}",
                "the unit loss is the plain NLL"),
               (self.compute_loss_func is not None, "compute_loss_func", "the unit loss is the NLL"),
               (self.aux_loss_enabled, "an MoE router auxiliary loss", "it has no per-unit form here")]
        return bad

    def _dr_prepare_target(self, dataset):
        if self._skip_prepare_dataset:
            return dataset
        return self._prepare_dataset(dataset, self.processing_class, self.args, self.args.packing,
                                     self._dr_formatting_func, "target")

    def dr_rows(self, inputs: dict) -> RowBatch:
        return sft_rows(inputs, self.args.dr_sft_normaliser)

"""DrDPOTrainer: TRL's DPOTrainer whose update is the Dr step (theory/trl.md, sections 1 and 3).

The program of each step is the Dr step of training/dr_step.py on DPO units: one unit = one preference
pair of TRL's collated batch. TRL stacks the batch as [chosen_1..n; rejected_1..n]; a RowBatch pairs rows
as (chosen_u, rejected_u) at rows 2u, 2u + 1, so the rows are interleaved. The unit loss is the
package's sigmoid DPO loss (eqs. (2)-(3) in theory/losses.md) with TRL's beta; the sequence log-prob is
the sum over completion_mask[:, 1:], as TRL's; the reference log-probs are TRL's (precomputed columns, or
its reference model / disabled adapter through DPOTrainer.compute_ref_log_probs). TRL's loss is the mean
of these unit losses, so dr_method = "mean" takes TRL's step (eq. (4) in theory/trl.md).

Refused (a ValueError naming the setting): loss types other than ["sigmoid"] (or weighted), f-divergences
other than reverse_kl, ld_alpha, use_weighting (WPO), an MoE auxiliary loss: the unit loss would not be TRL's.

Shapes:
    TRL's batch: input_ids, attention_mask, completion_mask (2n, T), chosen rows first
    -> RowBatch (2n rows, 2 per unit), extras["ref_logprob"] (2n,) interleaved like the rows
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl import DPOConfig, DPOTrainer

from drpt_ref.integrations.trl_common import DrArguments, DrTrainerMixin
from drpt_ref.losses.dpo import DPOLoss
from drpt_ref.losses.unit_batch import RowBatch


@dataclass
class DrDPOConfig(DrArguments, DPOConfig):
    """TRL's DPOConfig plus the Dr settings (trl_common.DrArguments)."""

    def __post_init__(self):
        super().__post_init__()
        self.check_dr()


def interleave_pairs(n: int, device=None) -> torch.Tensor:
    """Row order [c_1, r_1, c_2, r_2, ...] from TRL's [c_1..c_n; r_1..r_n]. -> (2n,) long"""
    chosen = torch.arange(n, device=device)
    return torch.stack([chosen, chosen + n], dim=1).reshape(-1)  # (2n,)


def dpo_rows(inputs: dict, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> RowBatch:
    """TRL's collated DPO batch as units: pairs of rows, the completion tokens scored, reference log-probs attached."""
    n = inputs["input_ids"].shape[0] // 2
    order = interleave_pairs(n, inputs["input_ids"].device)  # (2n,)
    loss_mask = inputs["completion_mask"].clone()  # (2n, T)
    loss_mask[:, 0] = 0  # TRL scores completion_mask[:, 1:]
    ref = torch.stack([ref_chosen, ref_rejected], dim=1).reshape(-1)  # (2n,) interleaved
    return RowBatch(inputs["input_ids"][order], inputs["attention_mask"][order], loss_mask[order], 2,
                    {"ref_logprob": ref.detach()})


class DrDPOTrainer(DrTrainerMixin, DPOTrainer):
    """DPOTrainer whose update is the Dr step of training/dr_step.py on the general pairs and target pairs.

    Arguments: those of trl.DPOTrainer, with args a DrDPOConfig, plus target_dataset (a datasets.Dataset of
    prompt/chosen/rejected, prepared by TRL the same way). Raises ValueError for a setting the Dr step cannot
    honour (named in the message). `dr_history` holds every step's alpha, weights and objective.
    """

    dr_name = "DrDPOTrainer"
    dr_section = "section 3"

    def __init__(self, model, ref_model=None, args: DrDPOConfig | None = None, *pos, target_dataset=None, **kwargs):
        if not isinstance(args, DrDPOConfig):
            raise ValueError(f"args must be a DrDPOConfig (TRL's DPOConfig plus the Dr settings), got "
                             f"{type(args).__name__}.")
        super().__init__(model, ref_model, args, *pos, **kwargs)
        self.dr_unit_loss = DPOLoss(beta=self.beta)
        self._dr_init(target_dataset)

    def _dr_unsupported(self) -> list[tuple]:
        weights = self.loss_weights
        bad = [(list(self.loss_types) != ["sigmoid"] or list(weights) != [1.0],
                f"loss_type={self.loss_types} with loss_weights={self.args.loss_weights}",
                "the unit loss is the sigmoid DPO loss with weight 1"),
               (self.f_divergence_type != "reverse_kl", f"f_divergence_type={self.f_divergence_type!r}",
                "the unit loss is standard DPO (reverse_kl)"),
               (self.ld_alpha is not None, f"ld_alpha={self.ld_alpha}", "the sequence log-prob is a plain sum"),
               (self.use_weighting, "use_weighting=True", "WPO weights are not part of the unit loss"),
               (self.aux_loss_enabled, "an MoE router auxiliary loss", "it has no per-unit form here")]
        return bad

    def _dr_prepare_target(self, dataset):
        dataset = self._prepare_dataset(dataset, self.processing_class, self.args, "target")
        if self.precompute_ref_logps:  # as TRL does for train_dataset: the reference is the initial model
            size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
            dataset = self._precompute_ref_logps(dataset, "target", size)
        return dataset

    def dr_rows(self, inputs: dict) -> RowBatch:
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref = self.ref_model if self.ref_model is not None else self.model  # PEFT: the adapter is disabled inside
            ref_chosen, ref_rejected = self.compute_ref_log_probs(ref, inputs)
        return dpo_rows(inputs, ref_chosen, ref_rejected)

"""What DrSFTTrainer and DrDPOTrainer share: the Dr settings, the Dr step inside TRL's training_step, its logs.

The program each step solves is the Dr step of training/dr_step.py (theory/dr_step.md): the per-unit
losses of TRL's general batch (n units) and of a target batch (m units, drawn from the target dataset
through TRL's own preparation and collator) give K, b, c; the projection of g_T gives (alpha, w); the
update d = alpha g_T + G w of the covered weights is left in .grad, and the Trainer's loop does the
rest as it does for TRL: clipping (max_grad_norm), optimizer step, scheduler, logging, saving
(eq. (1) in theory/trl.md). TRL's own loss is computed on the same batch without gradient, so its
loss and metrics are logged as usual; the Dr quantities are added to the same logs (`dr/...`), and the
full weights of every step are appended to `<output_dir>/dr_steps.jsonl`. TRL's autocast (bf16 / fp16) and its
gradient checkpointing wrap the Dr step's capture as they wrap TRL's forward (gram/precision.py, gram/checkpointing.py).

Shapes:
    general RowBatch: n units; target RowBatch: m units (rows: 1 per unit for SFT, 2 for DPO)
    record of one step: alpha (B,), weights (B, n), objective (B,), B = 1 (global) or L (per layer)
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch

from drpt_ref.core.methods import METHODS
from drpt_ref.training.coverage import uncovered_trainable
from drpt_ref.training.dr_step import GRAMS, SOLVERS, Knobs, dr_step, freeze_uncovered


@dataclass
class DrArguments:
    """The Dr settings added to TRL's config (DrSFTConfig, DrDPOConfig); names follow `drpt train`'s flags."""

    dr_method: str = "mean"  # a projection of drpt_ref.METHODS; mean is TRL's own update (eq. (2), theory/trl.md)
    dr_per_layer: bool = False  # True: one feasible set per covered linear layer, solved as one batch
    dr_solver: str = "batched"  # batched (torch) | compiled (its QP one torch.compile graph) | exact (numpy) | cvxpy
    dr_gram: str = "ghost"  # ghost (exact K, b, c from hooks, one backward) | exact (per-unit autograd) | sketch
    dr_sketch_dim: int = 64  # dr_gram = sketch only: the dimension of the random projections
    dr_target_batch_size: int = 4  # m: target units per step, drawn without replacement, reshuffled every pass
    dr_k: float = 4.0  # topk / capped_simplex: units selected, clipped to [1, n] at each step
    dr_tau_rel: float = 0.5  # softmax: temperature / (max b - min b), eq. (2) in theory/dr_step.md
    dr_ridge_rel: float = 0.0  # subspace: ridge / (tr K / n); 0 is the plain projection onto span(G)
    dr_radius_rel: float = 0.5  # ball: radius / ||g_T - mean||
    dr_lam: float = 0.5  # mix: the weight of g_T, in [0, 1]
    dr_train_uncovered: bool = False  # True: parameters outside the Gram move by the same reweighted loss (lora.md)

    def check_dr(self) -> None:
        """ValueError naming the field for a bad Dr setting."""
        if self.dr_method not in METHODS:
            raise ValueError(f"dr_method={self.dr_method!r} is unknown; use one of {sorted(METHODS)} (the weight "
                             "rules of `drpt train` need its loop and are not offered here).")
        if self.dr_solver not in SOLVERS:
            raise ValueError(f"dr_solver={self.dr_solver!r} is unknown; use one of {SOLVERS}.")
        if self.dr_gram not in GRAMS:
            raise ValueError(f"dr_gram={self.dr_gram!r} is unknown; use one of {GRAMS}.")
        if self.dr_train_uncovered and self.dr_per_layer:
            raise ValueError("dr_train_uncovered needs one (alpha, w) for the whole model; dr_per_layer gives each "
                             "layer its own: set one of the two to False.")
        checks = [("dr_sketch_dim", self.dr_sketch_dim >= 1, ">= 1"),
                  ("dr_target_batch_size", self.dr_target_batch_size >= 1, ">= 1"),
                  ("dr_k", self.dr_k >= 1, ">= 1 (units selected; clipped to n at each step)"),
                  ("dr_tau_rel", self.dr_tau_rel > 0, "> 0"), ("dr_ridge_rel", self.dr_ridge_rel >= 0, ">= 0"),
                  ("dr_radius_rel", self.dr_radius_rel >= 0, ">= 0"), ("dr_lam", 0 <= self.dr_lam <= 1, "in [0, 1]")]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}.")

    def knobs(self) -> Knobs:
        return Knobs(self.dr_k, self.dr_tau_rel, self.dr_ridge_rel, self.dr_radius_rel, self.dr_lam)


class LeaveInGrad:
    """dr_step's optimizer slot: the update d stays in .grad of the covered parameters.

    dr_step sets p.grad = d and calls step(); here step() does nothing, so the Trainer's loop takes its own
    optimizer step on d afterwards (clipping, scheduler, logging exactly as TRL's step, eq. (1) in theory/trl.md).
    """

    def __init__(self, params):
        self.params = list(params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """Nothing: the Trainer steps its optimizer on the gradients dr_step left."""


class DrTrainerMixin:
    """The Dr step in place of TRL's backward. Mixed in before a TRL trainer class (DrSFTTrainer, DrDPOTrainer).

    A subclass defines `dr_unit_loss` (a per-unit loss of drpt_ref.losses), `dr_rows(inputs)` (TRL's collated
    batch -> RowBatch of units), `_dr_unsupported()` ((is_bad, setting, why) of TRL settings the unit loss does not
    reproduce, refused here citing `dr_section` of theory/trl.md) and `_dr_prepare_target(dataset)` (TRL's own
    preparation of a map-style dataset).
    """

    dr_name = "DrTrainer"
    dr_section = "section 1"  # the section of theory/trl.md that says why an unsupported setting is refused

    def _dr_init(self, target_dataset) -> None:
        """Checks, the target data, the frozen parameters; called at the end of __init__."""
        args = self.args
        if target_dataset is None:
            raise ValueError(f"{self.dr_name} needs target_dataset= (the target data, in the format of train_dataset): "
                             "the Dr step projects the target gradient onto the general batch's gradients.")
        if args.gradient_accumulation_steps != 1:
            raise ValueError(f"gradient_accumulation_steps={args.gradient_accumulation_steps}: {self.dr_name} solves "
                             "one projection over the whole general batch; set gradient_accumulation_steps=1 and raise "
                             "per_device_train_batch_size (n) instead.")
        if args.world_size != 1:
            raise ValueError(f"{self.dr_name} runs in one process (world_size={args.world_size}): the projection needs "
                             "every unit of the general batch; launch it without torch.distributed.")
        if getattr(args, "activation_offloading", False):
            raise ValueError(f"activation_offloading=True: {self.dr_name}'s step captures each covered layer's input "
                             "and output gradient itself (theory/gram.md); set activation_offloading=False.")
        for is_bad, setting, why in self._dr_unsupported():
            if is_bad:
                raise ValueError(f"{self.dr_name} does not support {setting}: {why} "
                                 f"(theory/trl.md, {self.dr_section}).")
        if not hasattr(target_dataset, "__len__") or not hasattr(target_dataset, "map"):
            raise ValueError("target_dataset must be a map-style datasets.Dataset (an IterableDataset has no length "
                             "to draw target batches from).")
        target = self._dr_prepare_target(target_dataset)
        if len(target) < args.dr_target_batch_size:
            raise ValueError(f"dr_target_batch_size={args.dr_target_batch_size} is more than the target dataset's "
                             f"{len(target)} examples; lower it or add target examples.")
        if hasattr(self, "_remove_unused_columns"):
            target = self._remove_unused_columns(target, description="target")
        self._dr_target = target
        self._dr_generator = torch.Generator().manual_seed(args.seed)  # its own stream: TRL's data order is untouched
        self._dr_target_iter = None
        self.dr_history: list[dict] = []  # one record per step (alpha, weights, objective, losses)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._dr_uncovered = tuple(uncovered_trainable(self.model)) if args.dr_train_uncovered else ()
        covered = freeze_uncovered(self.model, train_uncovered=args.dr_train_uncovered)
        left = sum(p.numel() for p in trainable) - sum(p.numel() for p in covered)
        if left > 0 and not args.dr_train_uncovered:
            warnings.warn(f"{self.dr_name}: the Dr step covers the linear layers ({sum(p.numel() for p in covered)} "
                          f"parameters); {left} trainable parameters outside them (embeddings, norms, a tied head) "
                          "are frozen (dr_train_uncovered=True moves them; theory/trl.md, section 1).", stacklevel=3)

    def _dr_next_target(self) -> dict:
        """The next m target examples, collated by TRL's collator (a new shuffled pass when one ends)."""
        m = self.args.dr_target_batch_size
        while True:
            if self._dr_target_iter is None:
                order = torch.randperm(len(self._dr_target), generator=self._dr_generator).tolist()
                self._dr_target_iter = iter([order[i:i + m] for i in range(0, len(order) - m + 1, m)])
            chunk = next(self._dr_target_iter, None)
            if chunk is not None:
                return self.data_collator([self._dr_target[i] for i in chunk])
            self._dr_target_iter = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        """TRL's loss (logged, no gradient), then one Dr step whose d is left in .grad. -> the loss, detached"""
        model.train()
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)  # TRL's loss and metrics
        general = self.dr_rows(inputs)  # n units
        target = self.dr_rows(self._prepare_inputs(self._dr_next_target()))  # m units
        args = self.args
        slot = LeaveInGrad(p for p in model.parameters() if p.requires_grad)
        with self.compute_loss_context_manager():
            record = dr_step(model, slot, self.dr_unit_loss, general, target, args.dr_method, args.knobs(),
                             per_layer=args.dr_per_layer, solver=args.dr_solver, gram=args.dr_gram,
                             sketch_dim=args.dr_sketch_dim, seed=args.seed * 7919 + self.state.global_step,
                             step=self.state.global_step + 1, uncovered=self._dr_uncovered)
        self._dr_log(record, float(loss))
        return loss.detach()

    def _dr_log(self, record: dict, trl_loss: float) -> None:
        """Scalars into TRL's metrics (averaged over its logging window); the full record into dr_steps.jsonl."""
        w = torch.tensor(record["weights"], dtype=torch.float64)  # (B, n)
        metrics = self._metrics["train"]
        metrics["dr/loss_general"].append(record["loss_general"])
        metrics["dr/loss_target"].append(record["loss_target"])
        metrics["dr/objective"].append(sum(record["objective"]))  # summed over the B problems
        metrics["dr/alpha"].append(sum(record["alpha"]) / len(record["alpha"]))
        metrics["dr/weight_sum"].append(float(w.sum(-1).mean()))
        metrics["dr/weight_max"].append(float(w.amax(-1).mean()))
        effective = w.sum(-1) ** 2 / (w * w).sum(-1).clamp_min(torch.finfo(w.dtype).tiny)  # (B,) (sum w)^2 / |w|^2
        metrics["dr/effective_units"].append(float(effective.mean()))
        metrics["dr/converged"].append(float(record["converged"]))
        keys = ("loss_general", "loss_target", "objective", "alpha", "weights", "converged")
        entry = {"step": self.state.global_step + 1, "trl_loss": trl_loss, **{k: record[k] for k in keys}}
        self.dr_history.append(entry)
        if self.args.output_dir and self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            mode = "w" if len(self.dr_history) == 1 and self.state.global_step == 0 else "a"  # a fresh run starts anew
            with open(os.path.join(self.args.output_dir, "dr_steps.jsonl"), mode) as f:
                f.write(json.dumps(entry) + "\n")

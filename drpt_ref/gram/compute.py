"""The Gram quantities K, b, c of a general and a target batch, per layer, behind one interface.

K = G^T G, b = G^T g_T, c = ||g_T||^2 (eq. (3) in theory/notation.md), where column i of G is the
gradient of general unit i's loss and g_T the mean gradient of the m target units, restricted to
the *covered* parameters: the weights and biases of the model's linear layers (nn.Linear and GPT-2's
transformers Conv1D), one block per layer. Layers whose weight is tied to another parameter (GPT-2's
lm_head = wte), embeddings and layer norms are left out (theory/gram.md, section 5);
`covered_parameters(model)` (gram/layers.py) names what is covered.

Every engine computes the joint per-layer unit Gram J_l of the concatenated units [general; target]
(eq. (1) in theory/gram.md), and `kbc_from_joint` splits it into K, b, c (eq. (2)):

    method="exact"   per-unit gradients by autograd, one unit at a time (gram/exact.py)
    method="ghost"   exact, from captured layer inputs and output gradients (gram/ghost.py)
    method="sketch"  approximate, random projections of those (gram/sketch.py)

Shapes:
    J (L, n + m, n + m)  ->  K (L, n, n), b (L, n), c (L,);  Gram.total(): K (n, n), b (n,), c ()
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from drpt_ref.gram.exact import exact_joint_gram
from drpt_ref.gram.ghost import capture, ghost_joint_gram
from drpt_ref.gram.layers import CoveredLayer, covered_layers
from drpt_ref.gram.sketch import sketch_joint_gram
from drpt_ref.losses.unit_batch import RowBatch

METHODS = ("exact", "ghost", "sketch")
GHOST_MODES = ("auto", "pair", "materialize")


def kbc_from_joint(J: torch.Tensor, n: int, m: int):
    """Split the joint unit Gram of [general; target] into K, b, c, eq. (2) in theory/gram.md.

    J (L, n + m, n + m) -> K (L, n, n), b (L, n) = J_GT 1/m, c (L,) = 1^T J_TT 1 / m^2
    """
    K = J[:, :n, :n]  # (L, n, n)
    b = J[:, :n, n:].sum(-1) / m  # (L, n): the target mean's 1/m applied here, not in the losses
    c = J[:, n:, n:].sum((-2, -1)) / m**2  # (L,)
    return K, b, c


@dataclass
class Gram:
    """Per-layer Gram blocks. Sum over layers = the global Gram; each block = one per-layer QP."""

    K: torch.Tensor  # (L, n, n)
    b: torch.Tensor  # (L, n)
    c: torch.Tensor  # (L,)
    layer_names: list[str]
    method: str
    info: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.K.shape[-1]

    @property
    def num_layers(self) -> int:
        return self.K.shape[0]

    def total(self):
        """The global K (n, n), b (n,), c (): sums of the per-layer blocks (parameters are disjoint)."""
        return self.K.sum(0), self.b.sum(0), self.c.sum(0)

    def regroup(self, group_of) -> Gram:
        """Sum blocks into coarser groups; group_of(layer_name) -> group name (first-seen order)."""
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(self.layer_names):
            groups.setdefault(group_of(name), []).append(i)
        pick = [torch.tensor(ix, device=self.K.device) for ix in groups.values()]
        return Gram(torch.stack([self.K[ix].sum(0) for ix in pick]), torch.stack([self.b[ix].sum(0) for ix in pick]),
                    torch.stack([self.c[ix].sum(0) for ix in pick]), list(groups), self.method, dict(self.info))


def check_gram_inputs(model, unit_loss, general: RowBatch, target: RowBatch, method: str):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for name, batch in (("general", general), ("target", target)):
        if not isinstance(batch, RowBatch):
            raise ValueError(f"{name} must be a RowBatch, got {type(batch).__name__}")
        if batch.num_units == 0:
            raise ValueError(f"{name} has no units")
        want = getattr(unit_loss, "rows_per_unit", batch.rows_per_unit)
        if batch.rows_per_unit != want:
            raise ValueError(f"{name}.rows_per_unit={batch.rows_per_unit} but unit_loss expects {want}")
    if model.training and any(isinstance(mod, nn.Dropout) and mod.p > 0 for mod in model.modules()):
        raise ValueError("model is in training mode with active dropout: every engine would see different "
                         "masks; call model.eval() (or set the dropout probabilities to 0)")


def compute_gram(model, unit_loss, general: RowBatch, target: RowBatch, method: str = "ghost", *,
                 ghost_mode: str = "auto", sketch_dim: int = 64, seed: int = 0) -> Gram:
    """K, b, c per covered layer for a general batch (n units) and a target batch (m units).

    unit_loss(logprobs (R, T - 1), batch) -> (U,): SFTLoss(), DPOLoss(beta), GRPOLoss(G, ...).
    ghost_mode ("ghost" and "sketch"): "auto" (the cost rule, eq. (5) in theory/gram.md), "pair"
    (token-pair form) or "materialize" (per-unit layer gradients) for every layer.
    sketch_dim, seed ("sketch" only): the dimension each of a and e is projected to, the RNG seed.
    """
    check_gram_inputs(model, unit_loss, general, target, method)
    if method == "exact":
        J, info = exact_joint_gram(model, unit_loss, general, target)
        return _gram(J, general.num_units, target.num_units, covered_layers(model), method, info)
    return gram_from_capture(capture(model, unit_loss, general, target), method, ghost_mode=ghost_mode,
                             sketch_dim=sketch_dim, seed=seed)


def gram_from_capture(cap, method: str = "ghost", *, ghost_mode: str = "auto", sketch_dim: int = 64,
                      seed: int = 0) -> Gram:
    """The Gram of a `gram.ghost.Capture`, method "ghost" or "sketch".

    For the one-pass Dr step: capture once, build the Gram here, solve, then assemble the update from
    the same capture (gram.update.assemble_update): one forward and one backward in all.
    """
    if method not in ("ghost", "sketch"):
        raise ValueError(f"method must be 'ghost' or 'sketch' for a capture, got {method!r}")
    if ghost_mode not in GHOST_MODES:
        raise ValueError(f"ghost_mode must be one of {GHOST_MODES}, got {ghost_mode!r}")
    if method == "ghost":
        J, info = ghost_joint_gram(cap, ghost_mode, collapse=True)  # the targets as one unit: the same K, b, c
    else:
        J, info = sketch_joint_gram(cap, sketch_dim, seed, ghost_mode)
    return _gram(J, cap.n, cap.m, cap.layers, method, info)


def _gram(J, n: int, m: int, layers: list[CoveredLayer], method: str, info: dict) -> Gram:
    K, b, c = kbc_from_joint(J, n, m)
    info.update(n=n, m=m)
    return Gram(K, b, c, [layer.name for layer in layers], method, info)

"""What a run trains: the covered linear layers, and every other group of parameters with its share of the count.

The Gram covers the untied trainable linear layers (gram/layers.py, theory/gram.md section 5): the projection, and
so the Dr update, is computed on them alone. Every other parameter is frozen, or, with `--train-uncovered`, moved
by the gradient of the same reweighted loss alpha L_T + sum_i w_i l_i (eq. (3) in theory/lora.md). `coverage`
sorts every parameter tensor (a tensor used in several slots, e.g. GPT-2's wte = lm_head, counted once, under its
first name) into one group:

    covered linear layers              weights and biases of the covered layers (under LoRA: the adapter factors)
    tied embedding / output head       a tensor used in more than one slot
    embeddings                         nn.Embedding weights (token, position)
    norms                              LayerNorm / RMSNorm weights and biases (a module class named *Norm*)
    MoE experts (fused 3-D weights)    3-D parameters (transformers' fused expert weights)
    routers                            MoE routers (a module class named *Router*)
    linear layers outside the Gram     frozen linear weights (LoRA's base layers)
    biases                             other biases (e.g. peft's bias='all' on LoRA's base layers)
    other (ClassName)                  anything else, named by its module's class

and says how each is trained: "Dr projection", "reweighted loss" or "frozen". `format_coverage` is the table
`drpt train` prints at its start; `uncovered_trainable` names the parameters --train-uncovered trains.

Shapes: no tensors are made; counts are numbers of scalars (numel) and of tensors.
"""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from dataclasses import dataclass, field

from torch import nn
from transformers.pytorch_utils import Conv1D

from drpt_ref.gram.layers import covered_layers
from drpt_ref.training.lora import lora_summary

COVERED = "covered linear layers"
TIED = "tied embedding / output head"
EMBEDDINGS = "embeddings"
NORMS = "norms"
EXPERTS = "MoE experts (fused 3-D weights)"
ROUTERS = "routers"
LINEAR_OUTSIDE = "linear layers outside the Gram"
BIASES = "biases"
DR, REWEIGHTED, FROZEN = "Dr projection", "reweighted loss", "frozen"  # how a group is trained


@dataclass
class Row:
    """One group of parameter tensors, all trained the same way."""

    group: str  # one of the names above, or "other (ClassName)"
    status: str  # DR | REWEIGHTED | FROZEN
    tensors: int = 0  # parameter tensors in the group
    params: int = 0  # scalars (sum of numel)
    share: float = 0.0  # params / all parameters of the model
    names: list[str] = field(default_factory=list)  # the tensors' names (first name of a shared tensor)


def _tensors(model: nn.Module):
    """(name, owning module, local name, parameter) of every parameter tensor once, in model.named_parameters()
    order; a tensor shared by several slots is named by its first."""
    seen = set()
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield (f"{mname}.{pname}" if mname else pname), mod, pname, p


def group_of(mod: nn.Module, pname: str, p: nn.Parameter, covered: bool, shared: bool) -> str:
    """The group of one parameter tensor (the module docstring's list, checked in that order)."""
    cls = type(mod).__name__
    if covered:
        return COVERED
    if shared:
        return TIED
    if isinstance(mod, nn.Embedding):
        return EMBEDDINGS
    if "Norm" in cls:
        return NORMS
    if p.dim() == 3:
        return EXPERTS
    if "Router" in cls:
        return ROUTERS
    if isinstance(mod, (nn.Linear, Conv1D)) and pname == "weight":
        return LINEAR_OUTSIDE
    if pname == "bias":
        return BIASES
    return f"other ({cls})"


def _covered_ids(model: nn.Module) -> set[int]:
    try:
        return {id(p) for layer in covered_layers(model) for p in layer.params}
    except ValueError:  # no covered layer at all: everything is outside the Gram
        return set()


def uncovered_trainable(model: nn.Module) -> list[str]:
    """Names of the parameters that require gradients now but are outside the Gram (a plain model: every one
    but the covered layers'; under LoRA: what peft left trainable besides the adapters, e.g. bias='all')."""
    covered = _covered_ids(model)
    return [name for name, _, _, p in _tensors(model) if p.requires_grad and id(p) not in covered]


def coverage(model: nn.Module, trained_outside=()) -> list[Row]:
    """Every parameter tensor of `model` in one row per (group, status), covered first, then in model order;
    `trained_outside`: names of the uncovered tensors --train-uncovered trains. The shares sum to 1."""
    covered, trained_outside = _covered_ids(model), set(trained_outside)
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    rows: dict[tuple[str, str], Row] = {}
    for name, mod, pname, p in _tensors(model):
        group = group_of(mod, pname, p, id(p) in covered, uses[id(p)] > 1)
        status = DR if group == COVERED else REWEIGHTED if name in trained_outside else FROZEN
        row = rows.setdefault((group, status), Row(group, status))
        row.tensors += 1
        row.params += p.numel()
        row.names.append(name)
    total = sum(row.params for row in rows.values())
    for row in rows.values():
        row.share = row.params / total if total else 0.0
    return sorted(rows.values(), key=lambda row: row.status != DR)  # stable: model order otherwise


def layer_patterns(names: list[str]) -> list[tuple[str, int]]:
    """Names with their layer indices replaced by '*', each with its count, in first-seen order."""
    counts = Counter(re.sub(r"\.\d+(?=\.|$)", ".*", name) for name in names)
    return list(counts.items())


def format_coverage(model: nn.Module, outside=(), train_uncovered: bool = False) -> str:
    """The table of what is trained: one line per group with its tensors, parameters and share; the covered
    layers; LoRA's settings; and a note on the parameters outside the Gram (`outside`: those that were trainable
    before the freeze, trained by the reweighted loss when `train_uncovered`)."""
    rows = coverage(model, outside if train_uncovered else ())
    total = sum(row.params for row in rows)
    lines = [f"what is trained: {total:,} parameters in {sum(r.tensors for r in rows)} tensors"]
    width = max(len(row.group) for row in rows)
    for row in rows:
        lines.append(f"  {row.group:<{width}}  {row.status:<15} {row.tensors:>5} tensors {row.params:>14,} params "
                     f"{100 * row.share:7.2f}%")
    layers = [layer.name for layer in covered_layers(model)] if any(r.status == DR for r in rows) else []
    listed = ", ".join(f"{p} x{c}" if c > 1 else p for p, c in layer_patterns(layers))
    lines += textwrap.wrap(f"covered linear layers ({len(layers)}): {listed}", 116, subsequent_indent="    ",
                           break_on_hyphens=False)
    if summary := lora_summary(model):
        lines.append(summary)
    outside_names = set(outside)
    outside_params = sum(p.numel() for name, _, _, p in _tensors(model) if name in outside_names)
    if outside and train_uncovered:
        lines.append(f"--train-uncovered: {len(outside)} tensors ({outside_params:,} parameters) outside the Gram move "
                     "by the gradient of alpha L_T + sum_i w_i l_i with the (alpha, w) projected on the covered layers "
                     "(one more forward and backward per step; theory/lora.md, section 3).")
    elif train_uncovered:
        lines.append("--train-uncovered: nothing trainable lies outside the Gram (under LoRA the base model stays "
                     "frozen); the run trains the covered layers only.")
    elif outside:
        lines.append(f"frozen: {len(outside)} trainable tensors ({outside_params:,} parameters) are outside the Gram "
                     "(above: not 'Dr projection'); --train-uncovered trains them by the gradient of the reweighted "
                     "loss alpha L_T + sum_i w_i l_i (theory/lora.md, section 3).")
    return "\n".join(lines)

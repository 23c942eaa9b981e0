"""The reference Gram: per-unit gradients materialized by autograd, one unit at a time.

For each unit u of [general; target] we run the model on that unit's rows alone (same padded T),
take its scalar loss and call torch.autograd.grad on the covered parameters: g_u restricted to
each layer, flattened (weight then bias). The per-layer joint Gram is J_l = F_l F_l^T (eq. (1) in
theory/gram.md). A Python loop over units, not torch.func.vmap: units have several rows (DPO 2,
GRPO G) and GPT-2's attention-mask construction in transformers is not written for vmap; a loop of
plain autograd is the most obviously correct reference, and it costs U forward/backward passes.
Running each unit alone also checks that nothing leaks between rows (padding, attention). The per-unit gradients stay
in the parameters' dtype; J is accumulated in float32 or wider (eq. (1) in theory/precision.md).

Shapes:
    per-unit gradients: param name -> (U, *param.shape);  flat per layer F_l (U, p_l)
    joint Gram J (L, U, U), U = n + m
"""

from __future__ import annotations

import torch

from drpt_ref.gram.layers import covered_layers
from drpt_ref.gram.precision import no_autocast, widen
from drpt_ref.losses.unit_batch import RowBatch, concat_batches, token_logprobs


def per_unit_gradients(model, unit_loss, batch: RowBatch, param_names=None) -> dict[str, torch.Tensor]:
    """g_u for every unit u of batch, for the named parameters (default: the covered ones).

    -> name -> (U, *param.shape). Does not touch the parameters' .grad.
    """
    named = dict(model.named_parameters())
    names = param_names or [p for layer in covered_layers(model) for p in layer.param_names]
    missing = [name for name in names if name not in named]
    if missing:
        raise ValueError(f"param_names not in model.named_parameters(): {missing}")
    params = [named[name] for name in names]
    rows = []
    for u in range(batch.num_units):
        sub = batch.select_units([u])
        loss = unit_loss(token_logprobs(model, sub.input_ids, sub.attention_mask), sub)  # (1,)
        rows.append(torch.autograd.grad(loss.sum(), params, allow_unused=True))
    return {name: torch.stack([g if g is not None else torch.zeros_like(p) for g in (row[k] for row in rows)])
            for k, (name, p) in enumerate(zip(names, params))}


def layer_gradients(model, unit_loss, batch: RowBatch) -> list[torch.Tensor]:
    """Per covered layer, the per-unit gradients flattened (weight, then bias). -> L x (U, p_l)"""
    grads = per_unit_gradients(model, unit_loss, batch)
    U = batch.num_units
    return [torch.cat([grads[name].reshape(U, -1) for name in layer.param_names], dim=1)
            for layer in covered_layers(model)]


def exact_joint_gram(model, unit_loss, general: RowBatch, target: RowBatch):
    """J_l = F_l F_l^T over the units of [general; target], eq. (1) in theory/gram.md. -> J (L, U, U), info"""
    flat = layer_gradients(model, unit_loss, concat_batches(general, target))  # L x (U, p_l), the parameters' dtype
    with no_autocast(flat[0]):
        J = torch.stack([F @ F.T for F in (widen(F)[0] for F in flat)])  # (L, U, U), eq. (1) in theory/precision.md
    return J, {"modes": ["exact"] * len(flat)}

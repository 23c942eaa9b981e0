"""The update direction d = alpha g_T + G w on the covered parameters, two ways.

1. `assemble_update(cap, alpha, weights)`: from the tensors a capture already holds, no second
   backward. A unit's layer gradient is sum_t e_t a_t^T (eq. (3) in theory/gram.md), so

       d_l = sum_u coef_{l,u} sum_{t in u} e_t a_t^T,  coef_l = (w_l, alpha_l / m * 1_m)      eq. (10)

   over the units [general; target] of the capture; where the ghost Gram kept a layer's per-unit gradients
   F (U or n + 1, p_l) (gram/ghost.py, KEEP_FLAT_RATIO), d_l = coef_l^T F_l instead (eq. (3) in
   theory/step_cost.md). Global coefficients (alpha scalar, w (n,)) or per layer (alpha (L,), w (L, n)):
   the per-layer feasible set of theory/gram.md, section 6.
2. `weighted_backward_update(...)`: the global case as the gradient of one scalar,
   alpha * mean_j target_loss_j + sum_i w_i loss_i (eq. (11)), by one backward.

Both return name -> tensor of the parameter's shape (nn.Linear weight (d_out, d_in), Conv1D
weight (d_in, d_out), bias (d_out,)); neither touches .grad. To descend, subtract lr * d.
`assemble_update` computes in the accumulation dtype of the capture (float32 for half-precision a, e: eq. (1) in
theory/precision.md) and returns that dtype; the caller casts d to each parameter's dtype (and layout:
training/optimizer.as_grad) when it applies it.

Shapes:
    alpha () or (L,), weights (n,) or (L, n);  a (R, T, d_in), e (R, T, d_out), row coefficient (R,)
"""

from __future__ import annotations

import torch

from drpt_ref.gram.ghost import Capture
from drpt_ref.gram.layers import covered_layers
from drpt_ref.gram.precision import accumulation_dtype, no_autocast
from drpt_ref.losses.unit_batch import RowBatch, concat_batches, token_logprobs


def _per_layer_coefficients(alpha, weights, L: int, n: int, like: torch.Tensor):
    """Broadcast global or per-layer (alpha, w) to alpha (L,), w (L, n) in like's dtype and device."""
    alpha = torch.as_tensor(alpha, dtype=like.dtype, device=like.device)
    weights = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if alpha.dim() == 0 and weights.dim() == 1:
        alpha, weights = alpha.expand(L), weights.expand(L, -1)
    if tuple(alpha.shape) != (L,) or tuple(weights.shape) != (L, n):
        raise ValueError(f"coefficients must be global (alpha scalar, weights ({n},)) or per layer "
                         f"(alpha ({L},), weights ({L}, {n})); got alpha {tuple(alpha.shape)}, "
                         f"weights {tuple(weights.shape)}")
    return alpha, weights


def assemble_update(cap: Capture, alpha, weights) -> dict[str, torch.Tensor]:
    """d_l = alpha_l g_T + G_l w_l for every covered layer from the captured a and e, eq. (10): name -> tensor.

    From the per-unit gradients F the ghost Gram kept in cap.flat where it kept them (coef^T F), else from a and e.
    Each tensor has its parameter's shape and is contiguous (the parameter's own layout: the fused AdamW kernel
    needs it, training/optimizer.py). alpha () or (L,), weights (n,) or (L, n); ValueError for other shapes."""
    L, n, m = len(cap.layers), cap.n, cap.m
    acc = accumulation_dtype(*cap.a, *cap.e)  # float32 for half-precision captures, eq. (1) in theory/precision.md
    alpha, weights = _per_layer_coefficients(alpha, weights, L, n, cap.a[0].new_empty((), dtype=acc))
    unit = cap.batch.unit  # (R,)
    target_coef = (alpha / m).unsqueeze(1)  # (L, 1)
    unit_coef = torch.cat([weights, target_coef.expand(L, m)], dim=1)  # (L, n + m) weight of each unit, eq. (10)
    row_coef = torch.cat([weights, target_coef], dim=1)  # (L, n + 1) the target units summed into one row
    update = {}
    for l, (layer, a, e) in enumerate(zip(cap.layers, cap.a, cap.e)):
        coef = unit_coef[l]  # (n + m,)
        F = cap.flat.get(layer.name)  # (U or n + 1, p_l): the per-unit gradients the ghost Gram kept, if any
        if F is not None:  # eq. (10) as coef^T F: 2 U p_l FLOPs (theory/step_cost.md, eq. (3))
            if F.shape[0] == n + 1:  # the target units summed into one row (gram/ghost.py, collapse)
                coef = row_coef[l]  # (n + 1,)
            with no_autocast(F):
                flat = coef.to(F.dtype) @ F  # (p_l,)
            W = flat[:layer.d_in * layer.d_out].reshape(layer.d_in, layer.d_out)  # (d_in, d_out)
            # in the parameter's own layout and contiguous: the optimizer's kernels run several times slower
            # on a transposed gradient (theory/step_cost.md, section 3)
            update[f"{layer.name}.weight"] = W if layer.conv1d else W.T.contiguous()  # (d_out, d_in) for nn.Linear
            if layer.has_bias:
                update[f"{layer.name}.bias"] = flat[layer.d_in * layer.d_out:]  # (d_out,)
            continue
        a, e = a.to(acc), e.to(acc)  # one layer widened at a time
        per_row = coef[unit][:, None, None]  # (R, 1, 1) the weight of each row's unit
        if layer.d_in <= layer.d_out:  # the weight goes on the narrower of a, e (one copy of it)
            a, e_weighted = a * per_row, e  # (R, T, d_in)
        else:
            e_weighted = e * per_row  # (R, T, d_out)
        a2, e2 = a.reshape(-1, layer.d_in), e_weighted.reshape(-1, layer.d_out)  # (R T, d_in), (R T, d_out)
        with no_autocast(a):  # sum_u coef_u sum_t a_t e_t^T as one matrix product, in the parameter's layout
            W = a2.T @ e2 if layer.conv1d else e2.T @ a2  # (d_in, d_out) Conv1D, (d_out, d_in) nn.Linear
            if layer.has_bias:
                update[f"{layer.name}.bias"] = coef[unit] @ e.sum(1)  # (d_out,): sum over rows of coef_u(r) sum_t e_t
        update[f"{layer.name}.weight"] = W
    return update


def weighted_backward_update(model, unit_loss, general: RowBatch, target: RowBatch, alpha, weights,
                             param_names=None) -> dict[str, torch.Tensor]:
    """Global d = grad of alpha * mean(target losses) + sum_i w_i loss_i, one backward, eq. (11).

    param_names: which parameters to return (default: the covered ones; any trainable name works,
    the weighted backward is not limited to linear layers).
    """
    n = general.num_units
    weights = torch.as_tensor(weights)
    if weights.shape != (n,) or torch.as_tensor(alpha).dim() != 0:
        raise ValueError(f"weighted_backward_update is global: alpha must be a scalar and weights ({n},), got "
                         f"{tuple(torch.as_tensor(alpha).shape)} and {tuple(weights.shape)}; use assemble_update "
                         "for per-layer coefficients")
    named = dict(model.named_parameters())
    names = param_names or [p for layer in covered_layers(model) for p in layer.param_names]
    batch = concat_batches(general, target)
    losses = unit_loss(token_logprobs(model, batch.input_ids, batch.attention_mask), batch)  # (n + m,)
    losses = losses.to(accumulation_dtype(losses))  # the weights in float32 or wider, not rounded to a half dtype
    objective = alpha * losses[n:].mean() + (weights.to(losses) * losses[:n]).sum()  # eq. (11)
    grads = torch.autograd.grad(objective, [named[p] for p in names], allow_unused=True)
    return {p: g if g is not None else torch.zeros_like(named[p]) for p, g in zip(names, grads)}

"""One Dr. Post-Training step: capture, Gram, projection, update, optimizer.

    1. one forward/backward of the summed unit losses over [general; target] with hooks   (gram_ghost.capture)
    2. K, b, c of the covered parameters, globally or per layer                           (gram.py)
    3. the projection d* = alpha g_T + G w, one QP, or one per layer as a batch           (project / project_batched)
    4. the update assembled from the captured tensors, eq. (10) in theory/gram.md         (gram_update.py)
    5. p.grad = d for every covered parameter, then the optimizer (SGD or AdamW)

The covered parameters are the weights and biases of the linear layers (attention and MLP). The
other parameters (tied token embedding / output head, position embeddings, layer norms) are
frozen in every method, baselines included, so that all methods train the same parameters and
the Dr update is exactly the projection (theory/dr_step.md).

Knobs are relative to each problem, so that one setting means the same thing at every step and in
every layer (theory/dr_step.md, eq. (2)): tau = tau_rel * spread(b), ridge = ridge_rel * tr(K) / n,
radius = radius_rel * ||g_T - mean||; k is a count of units; lam is absolute.

Shapes: K (B, n, n), b (B, n), c (B,) with B = 1 (global) or L (per layer); alpha (B,), w (B, n).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from drpt_ref.batched import project_batched
from drpt_ref.gram import compute_gram, covered_layers, gram_from_capture
from drpt_ref.gram_ghost import capture
from drpt_ref.gram_update import assemble_update
from drpt_ref.methods import METHODS
from drpt_ref.project import project

SOLVERS = ("batched", "exact", "cvxpy")
GRAMS = ("ghost", "exact", "sketch")
PHASES = ("forward_backward", "gram", "solve", "update")  # the timed parts of a step


@dataclass
class Knobs:
    """The strength of the regularization, relative to each problem (eq. (2) in theory/dr_step.md)."""

    k: float = 4.0  # topk / capped_simplex: units selected (topk rounds it), clipped to [1, n]
    tau_rel: float = 0.5  # softmax temperature / (max b - min b)
    ridge_rel: float = 0.0  # subspace ridge / (tr K / n)
    radius_rel: float = 0.5  # ball radius / ||g_T - mean||
    lam: float = 0.5  # mix: weight of g_T


def method_params(method: str, knobs: Knobs, K, b, c) -> dict:
    """(B,) parameter tensors for `method` on the problems (K, b, c), eq. (2) in theory/dr_step.md."""
    B, n = b.shape
    tiny = torch.finfo(b.dtype).tiny
    if method == "mix":
        return {"lam": torch.full((B,), knobs.lam, dtype=b.dtype)}
    if method == "ball":
        dist = (c - 2 * b.mean(-1) + K.sum((-2, -1)) / n**2).clamp_min(0).sqrt()  # (B,) ||g_T - mean||
        return {"radius": knobs.radius_rel * dist}
    if method == "topk":
        return {"k": torch.full((B,), int(min(max(round(knobs.k), 1), n)), dtype=torch.long)}
    if method == "capped_simplex":
        return {"k": torch.full((B,), min(max(knobs.k, 1.0), float(n)), dtype=b.dtype)}
    if method == "softmax":
        spread = (b.amax(-1) - b.amin(-1)).clamp_min(tiny)  # (B,)
        return {"tau": knobs.tau_rel * spread}
    if method == "subspace":
        return {"ridge": knobs.ridge_rel * torch.diagonal(K, dim1=-2, dim2=-1).mean(-1)}
    return {}


def solve(K, b, c, method: str, params: dict, solver: str):
    """alpha (B,), w (B, n), objective (B,), converged (B,) for B problems, by the chosen solver."""
    if solver == "batched":
        d = project_batched(K, b, c, method, **params)
        return d.alpha, d.weights, d.objective, d.info["converged"]
    out = []
    for i in range(K.shape[0]):  # the exact and cvxpy solvers take one problem at a time
        p_i = {name: (int(v[i]) if v.dtype == torch.long else float(v[i])) for name, v in params.items()}
        out.append(project(K[i], b[i], c[i], method, solver=solver, **p_i))
    return (torch.stack([torch.as_tensor(d.alpha, dtype=b.dtype) for d in out]),
            torch.stack([torch.as_tensor(d.weights, dtype=b.dtype) for d in out]),
            torch.stack([torch.as_tensor(d.objective, dtype=b.dtype) for d in out]),
            torch.tensor([bool(d.info["converged"]) for d in out]))


def check_step_args(method: str, solver: str, gram: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; use one of {sorted(METHODS)}.")
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is unknown; use one of {SOLVERS}.")
    if gram not in GRAMS:
        raise ValueError(f"gram={gram!r} is unknown; use one of {GRAMS}.")


def freeze_uncovered(model) -> list[torch.nn.Parameter]:
    """requires_grad = False outside the covered linear layers; returns the covered parameters."""
    covered = {id(p) for layer in covered_layers(model) for p in layer.params}
    for p in model.parameters():
        p.requires_grad_(id(p) in covered)
    return [p for layer in covered_layers(model) for p in layer.params]


def dr_step(model, optimizer, unit_loss, general, target, method: str, knobs: Knobs, *, per_layer: bool = False,
            solver: str = "batched", gram: str = "ghost", sketch_dim: int = 64, seed: int = 0) -> dict:
    """Take one step; return the step's record (losses, objectives, alpha, weights, converged)."""
    check_step_args(method, solver, gram)
    clock = [time.perf_counter()]
    cap = capture(model, unit_loss, general, target)  # step 1
    clock.append(time.perf_counter())
    if gram == "exact":  # the reference engine: per-unit gradients by autograd
        G = compute_gram(model, unit_loss, general, target, "exact")
    else:
        G = gram_from_capture(cap, gram, sketch_dim=sketch_dim, seed=seed)  # step 2
    if per_layer:
        K, b, c = G.K, G.b, G.c  # (L, n, n), (L, n), (L,)
    else:
        K, b, c = (x.unsqueeze(0) for x in G.total())  # (1, n, n), (1, n), (1,)
    params = method_params(method, knobs, K, b, c)
    clock.append(time.perf_counter())
    alpha, w, objective, converged = solve(K, b, c, method, params, solver)  # step 3
    clock.append(time.perf_counter())
    coef_alpha, coef_w = (alpha, w) if per_layer else (alpha[0], w[0])
    update = assemble_update(cap, coef_alpha, coef_w)  # step 4: name -> d
    named = dict(model.named_parameters())
    optimizer.zero_grad(set_to_none=True)
    for name, d in update.items():  # step 5
        named[name].grad = d.to(named[name].dtype)
    optimizer.step()
    clock.append(time.perf_counter())
    n = general.num_units
    return {
        "loss_general": float(cap.losses[:n].mean()),
        "loss_target": float(cap.losses[n:].mean()),
        "objective": objective.tolist(),  # (B,) 1/2 ||d - g_T||^2 of each problem
        "alpha": alpha.tolist(),
        "weights": w.tolist(),  # (B, n)
        "converged": bool(converged.all()),
        "gram_c": c.tolist(),
        "seconds": dict(zip(PHASES, (t1 - t0 for t0, t1 in zip(clock, clock[1:])))),
    }

"""One Dr. Post-Training step: capture, Gram, projection, update, optimizer.

    1. one forward/backward of the summed unit losses over [general; target] with hooks   (gram.ghost.capture)
    2. K, b, c of the covered parameters, globally or per layer                           (gram/compute.py)
    3. the projection d* = alpha g_T + G w, one QP, or one per layer as a batch           (project / project_batched)
    4. the update assembled from the captured tensors, eq. (10) in theory/gram.md         (gram/update.py)
    5. p.grad = d for every covered parameter, then the optimizer (SGD or AdamW)

Step 3 is either a projection (a method of core/methods.py, solved) or a *weight rule*: any callable
rule(ctx: StepContext) -> (alpha, w, info) that reads the step's capture, Gram and (if it asks
with `needs_hidden = True`) the last hidden states of the same forward pass. The selection
baselines, ADAPT and HPT are rules (training/rules.py); they go through steps 4-5 unchanged, and their
objective 1/2 ||d - g_T||^2 is computed from the Gram by eq. (2) of theory/notation.md, so every
method logs the same quantities on the same scale.

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
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from drpt_ref.batched.solve import gram_objective_batched, project_batched
from drpt_ref.core.methods import METHODS
from drpt_ref.core.project import project
from drpt_ref.gram.compute import compute_gram, gram_from_capture
from drpt_ref.gram.ghost import capture
from drpt_ref.gram.layers import covered_layers
from drpt_ref.gram.update import assemble_update
from drpt_ref.training.rep_features import last_hidden_states

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


@dataclass
class StepContext:
    """What a weight rule may read at one step; everything is from before the update."""

    model: torch.nn.Module
    cap: object  # gram.ghost.Capture of [general; target]: a, e, batch, losses, n, m
    K: torch.Tensor  # (B, n, n)
    b: torch.Tensor  # (B, n)
    c: torch.Tensor  # (B,)
    knobs: Knobs
    step: int  # the optimizer step being taken (1-based in drpt train)
    seed: int  # the step's seed
    hidden: torch.Tensor | None = None  # (R, T, d) last hidden states of the capture's rows, if asked for
    info: dict = field(default_factory=dict)


class WeightRule:
    """Base of the weight rules: the hooks drpt train calls, each a no-op here. Subclasses define __call__."""

    needs_hidden = False  # True: the step records the last hidden states of the capture's forward

    def __call__(self, ctx: StepContext):  # -> alpha (1,) or (B,), w (1, n) or (B, n), info (JSON-able dict)
        raise NotImplementedError

    def prepare(self, env) -> None:
        """Work done once before training (e.g. offline selection); skipped when a state is resumed."""

    def restrict_pool(self, pool: list) -> list:
        """The general pool the steps draw from (the whole pool unless the rule selects offline)."""
        return pool

    def state_dict(self) -> dict:
        """JSON-able state that a resumed run needs to continue exactly (saved with each checkpoint)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""


def check_step_args(method: str, solver: str, gram: str, rule=None) -> None:
    if rule is None and method not in METHODS:
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


def apply_rule(rule, ctx: StepContext):
    """alpha (B,), w (B, n), objective (B,) by eq. (2), converged (B,), info of a weight rule's choice."""
    alpha, w, info = rule(ctx)
    B, n = ctx.b.shape
    alpha = torch.as_tensor(alpha, dtype=ctx.b.dtype, device=ctx.b.device).reshape(-1).expand(B)  # (B,)
    w = torch.as_tensor(w, dtype=ctx.b.dtype, device=ctx.b.device).reshape(-1, n).expand(B, n)  # (B, n)
    objective = gram_objective_batched(ctx.K, ctx.b, ctx.c, alpha, w)  # eq. (2) in theory/notation.md
    return alpha, w, objective, torch.ones(B, dtype=torch.bool), info


def dr_step(model, optimizer, unit_loss, general, target, method: str, knobs: Knobs, *, per_layer: bool = False,
            solver: str = "batched", gram: str = "ghost", sketch_dim: int = 64, seed: int = 0, rule=None,
            step: int = 0) -> dict:
    """Take one step; return the step's record (losses, objectives, alpha, weights, converged, method_info).

    rule: None (project by `method`) or a weight rule, rule(StepContext) -> (alpha, w, info); `method`
    is then only its name. A rule's (alpha, w) may be global ((1,), (1, n)) or per problem ((B,), (B, n)).
    """
    check_step_args(method, solver, gram, rule)
    clock = [time.perf_counter()]
    hidden = last_hidden_states(model) if getattr(rule, "needs_hidden", False) else nullcontext({})
    with hidden as h:
        cap = capture(model, unit_loss, general, target)  # step 1 (and the last hidden states, if asked for)
    clock.append(time.perf_counter())
    if gram == "exact":  # the reference engine: per-unit gradients by autograd
        G = compute_gram(model, unit_loss, general, target, "exact")
    else:
        G = gram_from_capture(cap, gram, sketch_dim=sketch_dim, seed=seed)  # step 2
    if per_layer:
        K, b, c = G.K, G.b, G.c  # (L, n, n), (L, n), (L,)
    else:
        K, b, c = (x.unsqueeze(0) for x in G.total())  # (1, n, n), (1, n), (1,)
    clock.append(time.perf_counter())
    if rule is None:  # step 3: a projection ...
        alpha, w, objective, converged = solve(K, b, c, method, method_params(method, knobs, K, b, c), solver)
        info = {}
    else:  # ... or a weight rule
        ctx = StepContext(model, cap, K, b, c, knobs, step, seed, h.get("hidden"))
        alpha, w, objective, converged, info = apply_rule(rule, ctx)
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
        "method_info": info,  # what a weight rule reports (selected units, scores, ...); {} for projections
        "seconds": dict(zip(PHASES, (t1 - t0 for t0, t1 in zip(clock, clock[1:])))),
    }

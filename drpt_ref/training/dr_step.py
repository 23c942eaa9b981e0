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
the Dr update is exactly the projection (theory/dr_step.md); or, with `uncovered=names` (--train-uncovered),
moved by the gradient of the same reweighted loss, one more backward (`uncovered_update`, theory/lora.md).

Knobs are relative to each problem, so that one setting means the same thing at every step and in
every layer (theory/dr_step.md, eq. (2)): tau = tau_rel * spread(b), ridge = ridge_rel * tr(K) / n,
radius = radius_rel * ||g_T - mean||; k is a count of units; lam is absolute.

Precision (theory/precision.md): the capture runs in the model's dtype (or under autocast); K, b, c come out in
float32 (float64 for a float64 model), the projection is solved in that dtype, and the update d, assembled in it, is
cast to each parameter's dtype when it is written to .grad.

Under an initialised torch.distributed process group (world > 1) the batches are this rank's share: step 2 builds the
Gram of the union of every rank's units, step 3 takes rank 0's answer, step 4's update is summed over the ranks
(drpt_ref/distributed/, theory/distributed.md).

Shapes: K (B, n, n), b (B, n), c (B,) with B = 1 (global) or L (per layer); alpha (B,), w (B, n).
"""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from drpt_ref.batched.solve import gram_objective_batched, project_batched
from drpt_ref.core.methods import METHODS
from drpt_ref.core.project import project
from drpt_ref.deferred import deferred_scope, read
from drpt_ref.distributed.gram import global_gram
from drpt_ref.distributed.ranks import check_model, check_rule, current_ranks
from drpt_ref.distributed.update import broadcast_solution, local_coefficients, reduce_update
from drpt_ref.gram.compute import compute_gram, gram_from_capture
from drpt_ref.gram.exact import layer_gradients
from drpt_ref.gram.ghost import capture
from drpt_ref.gram.layers import covered_layers
from drpt_ref.gram.precision import AUTOCAST, DTYPES, accumulation_dtype, autocast_context, no_autocast
from drpt_ref.gram.update import assemble_update, weighted_backward_update
from drpt_ref.losses.unit_batch import concat_batches
from drpt_ref.training.model_folder import is_peft_model
from drpt_ref.training.optimizer import as_grad
from drpt_ref.training.rep_features import last_hidden_states

# batched: project_batched, eager; compiled: the same with its sync-free QP compiled whole (batched/compiled.py: minutes
# of compilation on a CPU, once per process and shape, for a solve launched as one graph); exact, cvxpy: per problem
SOLVERS = ("batched", "compiled", "exact", "cvxpy")
BATCHED = ("batched", "compiled")  # the solvers of project_batched: sync-free in the step, re-solved where they miss
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
        return {"lam": torch.full((B,), knobs.lam, dtype=b.dtype, device=b.device)}
    if method == "ball":
        dist = (c - 2 * b.mean(-1) + K.sum((-2, -1)) / n**2).clamp_min(0).sqrt()  # (B,) ||g_T - mean||
        return {"radius": knobs.radius_rel * dist}
    if method == "topk":
        return {"k": torch.full((B,), int(min(max(round(knobs.k), 1), n)), dtype=torch.long, device=b.device)}
    if method == "capped_simplex":
        return {"k": torch.full((B,), min(max(knobs.k, 1.0), float(n)), dtype=b.dtype, device=b.device)}
    if method == "softmax":
        spread = (b.amax(-1) - b.amin(-1)).clamp_min(tiny)  # (B,)
        return {"tau": knobs.tau_rel * spread}
    if method == "subspace":
        return {"ridge": knobs.ridge_rel * torch.diagonal(K, dim1=-2, dim2=-1).mean(-1)}
    return {}


def solve(K, b, c, method: str, params: dict, solver: str, sync_free: bool = False):
    """alpha (B,), w (B, n), objective (B,), converged (B,) for B problems, by the chosen solver.

    Solved in K's dtype (float32 or float64), autocast off even inside a caller's autocast (theory/precision.md).
    sync_free (batched, compiled): no host read inside, no repair; the caller reads `converged` (theory/step_cost.md,
    sec. 4). compiled: project_batched(compiled=True), the sync-free QP as one compiled graph (batched/compiled.py)."""
    if solver in BATCHED:
        with no_autocast(K):
            d = project_batched(K, b, c, method, sync_free=sync_free, compiled=solver == "compiled", **params)
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


def check_precision(dtype: str, autocast: str, device: str, optimizer: str = "adamw") -> None:
    """Refuse a dtype / autocast / device / optimizer combination drpt does not train in, naming the flag
    (theory/precision.md, section 5)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is unknown; use one of {tuple(DTYPES)}.")
    if autocast not in AUTOCAST:
        raise ValueError(f"--autocast {autocast!r} is unknown; use one of {AUTOCAST} ('' = none).")
    if autocast and dtype != "float32":
        raise ValueError(f"--autocast {autocast} runs the forward in half precision over float32 master weights; "
                         f"use it with --dtype float32 (got --dtype {dtype}), or drop --autocast for a {dtype} model.")
    half = dtype if dtype in ("bfloat16", "float16") else autocast
    if half == "float16" and not device.startswith("cuda"):
        flag = "--dtype" if dtype == "float16" else "--autocast"
        raise ValueError(f"{flag} float16 on --device {device}: float16 is a GPU format (CPU kernels are slow or "
                         "missing); use bfloat16 (the same memory, float32's range) or --device cuda.")
    if half == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        flag = "--dtype" if dtype == "bfloat16" else "--autocast"
        raise ValueError(f"{flag} bfloat16: this GPU has no bfloat16 support; use float16 there.")
    if dtype == "float16" and optimizer == "adamw":
        raise ValueError("--dtype float16 with --optimizer adamw: AdamW's eps (1e-8) is below float16's smallest "
                         "number, so a zero gradient entry gives 0/0; use --autocast float16 with --dtype float32 "
                         "(float32 master weights), --dtype bfloat16, or --optimizer sgd.")


def freeze_uncovered(model, train_uncovered: bool = False) -> list[torch.nn.Parameter]:
    """requires_grad = False outside the covered linear layers; returns the covered parameters.

    train_uncovered: the parameters outside the Gram that require gradients now stay trainable (a plain model:
    embeddings, norms, a tied head, MoE experts, routers; under LoRA: what peft left trainable, e.g. bias='all');
    training/coverage.py's `uncovered_trainable` names them and `dr_step(..., uncovered=names)` moves them by
    `uncovered_update`. ValueError when the model has no covered layer. A RuntimeWarning names what a peft model
    had left trainable (bias='all', modules_to_save) when it is frozen here."""
    covered = {id(p) for layer in covered_layers(model) for p in layer.params}
    dropped = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if dropped and not train_uncovered and is_peft_model(model):
        warnings.warn(f"{len(dropped)} tensors that peft left trainable ({', '.join(dropped[:2])}, ...: its bias "
                      "setting or modules_to_save) are outside the Gram and frozen; --train-uncovered trains them by "
                      "the gradient of the reweighted loss (theory/lora.md, section 3).", RuntimeWarning, stacklevel=2)
    for p in model.parameters():
        p.requires_grad_(id(p) in covered or (train_uncovered and p.requires_grad))
    return [p for layer in covered_layers(model) for p in layer.params]


def uncovered_update(model, unit_loss, general, target, alpha, w, names, autocast: str = "") -> dict:
    """d_U = alpha g_T,U + G_U w on the named parameters outside the Gram: the gradient of the reweighted loss
    alpha L_T + sum_i w_i l_i (eq. (3) in theory/lora.md) with the step's (alpha, w), by one more forward and
    backward (gram/update.py, eq. (11) in theory/gram.md). alpha (1,), w (1, n) -> name -> tensor of the
    parameter's shape. ValueError for per-layer coefficients ((L,), (L, n)): the uncovered parameters have no layer."""
    if alpha.shape[0] != 1:
        raise ValueError("--train-uncovered needs one (alpha, w) for the whole model; --per-layer gives each layer "
                         "its own: drop one of the two flags.")
    with autocast_context(autocast, next(model.parameters()).device.type):
        return weighted_backward_update(model, unit_loss, general, target, alpha[0], w[0], param_names=list(names))


def apply_rule(rule, ctx: StepContext):
    """alpha (B,), w (B, n), objective (B,) by eq. (2), converged (B,), info of a weight rule's choice."""
    alpha, w, info = rule(ctx)
    B, n = ctx.b.shape
    alpha = torch.as_tensor(alpha, dtype=ctx.b.dtype, device=ctx.b.device).reshape(-1).expand(B)  # (B,)
    w = torch.as_tensor(w, dtype=ctx.b.dtype, device=ctx.b.device).reshape(-1, n).expand(B, n)  # (B, n)
    objective = gram_objective_batched(ctx.K, ctx.b, ctx.c, alpha, w)  # eq. (2) in theory/notation.md
    return alpha, w, objective, torch.ones(B, dtype=torch.bool), info


def phase_clock(device: torch.device) -> float:
    """time.perf_counter() once the device's queued work is done (torch.cuda.synchronize on CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@deferred_scope  # the step's checks are read once, with its record (drpt_ref/deferred.py, theory/step_cost.md)
def dr_step(model, optimizer, unit_loss, general, target, method: str, knobs: Knobs, *, per_layer: bool = False,
            solver: str = "batched", gram: str = "ghost", sketch_dim: int = 64, seed: int = 0, rule=None,
            step: int = 0, autocast: str = "", uncovered=(), comm: str = "auto") -> dict:
    """Take one step; return the step's record (losses, objectives, alpha, weights, converged, method_info).

    rule: None (project by `method`) or a weight rule, rule(StepContext) -> (alpha, w, info); `method`
    is then only its name. A rule's (alpha, w) may be global ((1,), (1, n)) or per problem ((B,), (B, n)).
    autocast: '' (the model's dtype) or 'bfloat16' / 'float16': the capture under torch.autocast (theory/precision.md).
    uncovered: names of parameters outside the Gram moved by the same (alpha, w): `uncovered_update`.
    Under an initialised torch.distributed process group of world > 1, general and target are this rank's units:
    K, b, c are those of the union, the update is summed over the ranks (theory/distributed.md; every rank calls
    dr_step alike); comm: what the ranks gather per layer, auto | tokens | units (distributed/gram.py).
    """
    check_step_args(method, solver, gram, rule)
    ranks = current_ranks()  # None outside torch.distributed (or with one process): the single-process step
    if ranks is not None:
        check_model(model)
        check_rule(rule, ranks)
    device = next(model.parameters()).device
    clock = [phase_clock(device)]
    hidden = last_hidden_states(model) if getattr(rule, "needs_hidden", False) else nullcontext({})
    mixed = autocast_context(autocast, device.type)
    with hidden as h, mixed:
        cap = capture(model, unit_loss, general, target)  # step 1 (and the last hidden states, if asked for)
    clock.append(phase_clock(device))
    if ranks is not None:  # step 2 over every rank's units (theory/distributed.md, section 2)
        flat = None
        if gram == "exact":
            with autocast_context(autocast, device.type):
                flat = layer_gradients(model, unit_loss, concat_batches(general, target))  # L x (n_r + m_r, p_l)
        G = global_gram(ranks, cap, gram, flat=flat, sketch_dim=sketch_dim, seed=seed, comm=comm)
    elif gram == "exact":  # the reference engine: per-unit gradients by autograd
        with autocast_context(autocast, device.type):
            G = compute_gram(model, unit_loss, general, target, "exact")
    else:
        G = gram_from_capture(cap, gram, sketch_dim=sketch_dim, seed=seed)  # step 2
    if per_layer:
        K, b, c = G.K, G.b, G.c  # (L, n, n), (L, n), (L,)
    else:
        K, b, c = (x.unsqueeze(0) for x in G.total())  # (1, n, n), (1, n), (1,)
    acc = accumulation_dtype(K)  # the engines accumulate in float32 or wider; the QP is solved in that dtype
    K, b, c = K.to(acc), b.to(acc), c.to(acc)
    clock.append(phase_clock(device))
    if rule is None:  # step 3: a projection ...
        alpha, w, objective, converged = solve(K, b, c, method, method_params(method, knobs, K, b, c), solver,
                                               True)  # sync_free: read below, once
        info = {}
    else:  # ... or a weight rule
        ctx = StepContext(model, cap, K, b, c, knobs, step, seed, h.get("hidden"))
        alpha, w, objective, converged, info = apply_rule(rule, ctx)
    if ranks is not None:  # rank 0's answer on every rank, bit for bit
        alpha, w, objective, converged = broadcast_solution(ranks, alpha, w, objective, converged)
    # the step's one host read, before anything is written: the deferred checks, the losses and the solution
    losses, n = (G.info["losses"], G.info["n"]) if ranks is not None else (cap.losses, general.num_units)
    got = read(losses[:n].mean(), losses[n:].mean(), objective, alpha, w, converged, c)
    if rule is None and solver in BATCHED and not all(got[5]):  # the sync-free schedule missed: the full solve
        alpha, w, objective, converged = solve(K, b, c, method, method_params(method, knobs, K, b, c), solver)
        if ranks is not None:
            alpha, w, objective, converged = broadcast_solution(ranks, alpha, w, objective, converged)
        got = read(losses[:n].mean(), losses[n:].mean(), objective, alpha, w, converged, c)
    clock.append(phase_clock(device))
    alpha_r, w_r = alpha, w  # (B,), (B, n_r): under torch.distributed this rank's share of d, eq. (3) in distributed.md
    if ranks is not None:
        alpha_r, w_r = local_coefficients(ranks, G.info["shares"], alpha, w)
    coef_alpha, coef_w = (alpha_r, w_r) if per_layer else (alpha_r[0], w_r[0])
    update = assemble_update(cap, coef_alpha, coef_w)  # step 4: name -> d
    if uncovered:  # --train-uncovered: the same (alpha, w) outside the Gram, eq. (3) in theory/lora.md
        update.update(uncovered_update(model, unit_loss, general, target, alpha_r, w_r, uncovered, autocast))
    if ranks is not None:  # d = sum over ranks of d_r: one all_reduce
        update, reduced = reduce_update(ranks, update)
    named = dict(model.named_parameters())
    optimizer.zero_grad(set_to_none=True)
    for name, d in update.items():  # step 5: d (float32 or wider) cast back to the parameter's dtype and layout
        named[name].grad = as_grad(named[name], d)
    optimizer.step()
    clock.append(phase_clock(device))
    record = {
        "loss_general": got[0][0],
        "loss_target": got[1][0],
        "objective": got[2],  # (B,) 1/2 ||d - g_T||^2 of each problem
        "alpha": got[3],
        "weights": [got[4][i:i + w.shape[1]] for i in range(0, w.numel(), w.shape[1])],  # (B, n)
        "converged": all(got[5]),
        "gram_c": got[6],
        "method_info": info,  # what a weight rule reports (selected units, scores, ...); {} for projections
        "seconds": dict(zip(PHASES, (t1 - t0 for t0, t1 in zip(clock, clock[1:])))),
    }
    if ranks is not None:  # bytes each rank received (gram) and sent (update), seconds in the collectives
        record["comm"] = {"world": ranks.world, "forms": G.info["comm"],
                          "gram_bytes": G.info["bytes"] * (ranks.world - 1),
                          "gram_seconds": G.info["seconds"], "update_bytes": reduced["bytes"],
                          "update_seconds": reduced["seconds"]}
    return record

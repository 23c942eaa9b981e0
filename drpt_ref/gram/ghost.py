"""Ghost Gram: exact per-unit gradient inner products from ONE backward, never forming g_u in full.

Forward hooks on every covered linear layer keep its input a (R, T, d_in) and its output Y, whose gradient
e = d(sum_u loss_u) / dY (R, T, d_out) one torch.autograd.grad then returns, in one forward/backward of the SUMMED
per-unit losses over the concatenated batch [general; target]. Because the losses are summed, the e of unit u's rows
is exactly d loss_u / d Y_u (units share no rows), and padded tokens get e = 0 (section 4 of
theory/gram.md). A unit's layer gradient is then g_u = sum_{t in u} e_t a_t^T (+ bias sum_t e_t),
eq. (3), and per layer either

    pair form     <g_u, g_v> = sum_{t in u, s in v} (a_t . a_s)(e_t . e_s) + (sum_t e_t).(sum_s e_s)   eq. (4)
    materialize   form g_u (d_in x d_out per unit) by one batched matmul, then F F^T                 eq. (3)

both exact; "auto" picks the form with fewer FLOPs for the U units of the batch (eq. (5), T_u = tokens per unit).

Precision (theory/precision.md): a and e are kept in the dtype the layer ran in (under autocast, a is cast as the layer
casts it); every inner product is taken after widening one layer to float32 (float64 for a float64 model), eq. (1).
Gradient checkpointing: a layer recomputed inside the backward is not recorded again (gram/checkpointing.py).

Shapes:
    a (R, T, d_in), e (R, T, d_out) -> per unit A (U, T_u, d_in), E (U, T_u, d_out), T_u = rows_per_unit * T
    joint Gram J (L, U, U), U = n + m
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from drpt_ref.gram.checkpointing import checkpointing_active
from drpt_ref.gram.layers import CoveredLayer, covered_layers
from drpt_ref.gram.precision import autocast_dtype, check_finite_capture, no_autocast, widen
from drpt_ref.losses.unit_batch import RowBatch, concat_batches, token_logprobs

PAIR_CHUNK_ELEMENTS = 2**24  # largest (units x U x T_u x T_u) block the pair form holds at once
# a materialized layer keeps its per-unit gradients F (U, p_l) for the update (eq. (3) in theory/step_cost.md: d_l from
# F in 2 U p_l FLOPs instead of 2 N p_l from a and e) when F holds at most this many times the layer's captured a and e
KEEP_FLAT_RATIO = 4


@dataclass
class Capture:
    """What one forward/backward of the summed unit losses leaves behind, per covered layer."""

    layers: list[CoveredLayer]
    a: list[torch.Tensor]  # L x (R, T, d_in): layer inputs
    e: list[torch.Tensor]  # L x (R, T, d_out): output gradients of sum_u loss_u
    batch: RowBatch  # the concatenated [general; target] rows
    n: int  # general units (the first n units)
    m: int  # target units (the last m units)
    losses: torch.Tensor  # (n + m,) the unit losses, detached
    recomputed: int = 0  # layer calls skipped as gradient-checkpointing recomputations inside the backward
    flat: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> F (U, p_l) kept by the ghost Gram

    def per_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Group a layer's token tensor by unit. (R, T, d) -> (U, rows_per_unit * T, d)"""
        return x.reshape(self.n + self.m, -1, x.shape[-1])


@contextmanager
def _linear_hooks(layers: list[CoveredLayer]):
    """Register forward hooks on the layers (keep the input a and the output); always removed on exit. Yields (a, e,
    state) dicts; e is filled by `capture` from torch.autograd.grad on the kept outputs.

    Set state["backward"] = True before the backward: a layer that runs after that is a checkpointing recomputation
    (gram/checkpointing.py) and is counted in state["recomputed"], not recorded.
    """
    a, e, handles = {}, {}, []
    state = {"backward": False, "recomputed": 0, "outputs": {}}  # outputs: name -> the layer's output tensor

    def make_hook(name):
        def forward_hook(module, inputs, output):
            if state["backward"]:  # the forward of a checkpointed block, rerun by the backward: seen already
                state["recomputed"] += 1
                return
            if name in a:
                raise ValueError(f"layer {name} ran twice in one forward: its weight is used twice (shared weights), "
                                 "so its gradient is a sum over both uses, which the per-layer engines cannot split; "
                                 "freeze it (requires_grad_(False)) to leave it out of the Gram")
            if not output.requires_grad:
                raise ValueError(f"layer {name} ran without autograd in the capture's forward: under torch.no_grad(), "
                                 "or inside a block checkpointed with use_reentrant=True (whose first forward builds "
                                 "no graph, so no output gradient could be captured there); checkpoint with "
                                 "use_reentrant=False (gram.checkpointing.enable_checkpointing, "
                                 "--gradient-checkpointing)")
            x = inputs[0].detach()  # (R, T, d_in)
            cast = autocast_dtype(x)
            a[name] = x if cast is None else x.to(cast)  # under autocast: the input the layer multiplied
            state["outputs"][name] = output  # its gradient e is asked of autograd after the forward (`capture`)

        return forward_hook

    try:
        for layer in layers:
            handles.append(layer.module.register_forward_hook(make_hook(layer.name)))
        yield a, e, state
    finally:
        for h in handles:
            h.remove()


def capture(model, unit_loss, general: RowBatch, target: RowBatch) -> Capture:
    """One forward and one backward of sum_u loss_u over [general; target] with hooks. -> Capture

    The backward is torch.autograd.grad on the covered layers' outputs (no weight gradient is formed), so the
    parameters' .grad is untouched. a and e stay
    in the dtype the layers ran in (bf16 / fp16 models, autocast); a half-precision capture that overflowed is
    refused (ValueError). Gradient checkpointing enabled on the model is active during the capture
    (gram/checkpointing.py); a reentrant one is refused (ValueError).
    """
    layers = covered_layers(model)
    batch = concat_batches(general, target)
    with _linear_hooks(layers) as (a, e, state), checkpointing_active(model):
        losses = unit_loss(token_logprobs(model, batch.input_ids, batch.attention_mask), batch)  # (n + m,)
        state["backward"] = True  # from here on a layer's forward is a checkpointing recomputation
        # Summed, not averaged: e of unit u is d loss_u / d Y_u (eq. (6) in theory/gram.md). The gradient is asked
        # of the layer outputs, not the weights: autograd then skips every weight-gradient product (2 N p FLOPs,
        # a third of the backward), which the update forms from a and e anyway (theory/step_cost.md, eq. (2)).
        outputs = [state["outputs"][ly.name] for ly in layers]
        for ly, y, g in zip(layers, outputs, torch.autograd.grad(losses.sum(), outputs, allow_unused=True)):
            e[ly.name] = torch.zeros_like(y.detach()) if g is None else g  # (R, T, d_out); 0 if no loss uses it
    for ly in layers:
        check_finite_capture(ly.name, a[ly.name], "input")
        check_finite_capture(ly.name, e[ly.name], "output gradient")
    return Capture(layers, [a[ly.name] for ly in layers], [e[ly.name] for ly in layers], batch,
                   general.num_units, target.num_units, losses.detach(), state["recomputed"])


def use_pair_form(tokens_per_unit: int, d_in: int, d_out: int, units: int) -> bool:
    """The cost rule, eq. (5) in theory/gram.md: token pairs iff their FLOPs are at most materializing's,
    U^2 T_u^2 (d_in + d_out) <= U T_u d_in d_out + U^2 d_in d_out."""
    T, U = tokens_per_unit, units
    return U * T * T * (d_in + d_out) <= T * d_in * d_out + U * d_in * d_out


def pair_gram(A: torch.Tensor, E: torch.Tensor, bias: bool) -> torch.Tensor:
    """Token-pair form, eq. (4): J_uv = 1^T [(A_u A_v^T) * (E_u E_v^T)] 1 (+ bias).

    A (U, T_u, d_in), E (U, T_u, d_out) in any float dtype -> (U, U) in the accumulation dtype (eq. (1) in
    theory/precision.md)
    """
    A, E = widen(A, E)
    U, Tu, _ = A.shape
    J = A.new_zeros(U, U)
    step = max(1, PAIR_CHUNK_ELEMENTS // max(1, U * Tu * Tu))  # units per chunk
    with no_autocast(A):
        for i in range(0, U, step):
            aa = torch.einsum("utd,vsd->uvts", A[i:i + step], A)  # (chunk, U, T_u, T_u)
            ee = torch.einsum("utd,vsd->uvts", E[i:i + step], E)  # (chunk, U, T_u, T_u)
            J[i:i + step] = (aa * ee).sum((-2, -1))
        if bias:
            Es = E.sum(1)  # (U, d_out): the per-unit bias gradients
            J = J + Es @ Es.T
    return J


def materialized_flat(A: torch.Tensor, E: torch.Tensor, bias: bool) -> torch.Tensor:
    """Per-unit layer gradients g_u = sum_t a_t e_t^T (d_in x d_out, + bias sum_t e_t), eq. (3). -> F (U, p_l)

    In the accumulation dtype of A and E (float32 for half-precision captures, eq. (1) in theory/precision.md).
    """
    A, E = widen(A, E)
    U, d_in, d_out = A.shape[0], A.shape[-1], E.shape[-1]
    F = A.new_empty(U, d_in + int(bias), d_out)  # the weight gradient's d_in rows, then the bias gradient's one
    with no_autocast(A):
        torch.bmm(A.transpose(1, 2), E, out=F[:, :d_in])  # (U, d_in, d_out)
        if bias:
            torch.sum(E, 1, out=F[:, d_in])  # (U, d_out)
    return F.reshape(U, -1)  # (U, p_l): the weight gradient, then the bias gradient


def layer_joint_gram(A: torch.Tensor, E: torch.Tensor, bias: bool, mode: str):
    """One layer's joint unit Gram by the chosen form. -> (J (U, U), the form used)"""
    if mode == "auto":
        mode = "pair" if use_pair_form(A.shape[1], A.shape[2], E.shape[2], A.shape[0]) else "materialize"
    if mode == "pair":
        return pair_gram(A, E, bias), mode
    F = materialized_flat(A, E, bias)
    with no_autocast(F):
        return F @ F.T, mode


def collapsed_flat(A: torch.Tensor, E: torch.Tensor, bias: bool, n: int) -> torch.Tensor:
    """F of the n general units and one row for the m target units summed (eq. (5) in theory/step_cost.md), written
    into one buffer. A (U, T_u, d_in), E (U, T_u, d_out) -> F (n + 1, p_l) in the accumulation dtype."""
    A, E = widen(A, E)
    d_in, d_out = A.shape[-1], E.shape[-1]
    F = A.new_empty(n + 1, d_in + int(bias), d_out)  # rows of materialized_flat: weight, then bias
    At, Et = A[n:].reshape(-1, d_in), E[n:].reshape(-1, d_out)  # (m T_u, d_in), (m T_u, d_out) all target tokens
    with no_autocast(A):
        torch.bmm(A[:n].transpose(1, 2), E[:n], out=F[:n, :d_in])  # (n, d_in, d_out) per general unit
        torch.mm(At.T, Et, out=F[n, :d_in])  # (d_in, d_out) the target units summed
        if bias:
            torch.sum(E[:n], 1, out=F[:n, d_in])  # (n, d_out)
            torch.sum(Et, 0, out=F[n, d_in])  # (d_out,)
    return F.reshape(n + 1, -1)  # (n + 1, p_l)


def collapsed_gram(F: torch.Tensor, n: int) -> torch.Tensor:
    """J = F F^T of a collapsed F (n + 1, p_l) (eq. (5) in theory/step_cost.md) as its three blocks: K = F_n F_n^T,
    the column F_n f_T and f_T . f_T. The numbers of one (n+1) x (n+1) product up to round-off (float32: ~1e-5
    relative at p_l = 2.5 M, the summation order differs), faster: with n + 1 = 17 rows the
    BLAS kernel ran at 0.65-0.8x its 16-row rate per FLOP (theory/step_cost.md, section 2). -> J (n + 1, n + 1)"""
    Fn, fT = F[:n], F[n:]  # (n, p_l), (1, p_l)
    J = F.new_empty(n + 1, n + 1)
    with no_autocast(F):
        J[:n, :n] = Fn @ Fn.T  # (n, n)
        J[:n, n:] = Fn @ fT.T  # (n, 1)
        J[n:, n:] = fT @ fT.T  # (1, 1)
    J[n, :n] = J[:n, n]
    return J


def collapse_joint(J: torch.Tensor, n: int) -> torch.Tensor:
    """The joint Gram with the target units summed into one: (U, U) -> (n + 1, n + 1); same K, b, c."""
    top = torch.cat([J[:n, :n], J[:n, n:].sum(1, keepdim=True)], dim=1)  # (n, n + 1)
    bottom = torch.cat([J[n:, :n].sum(0, keepdim=True), J[n:, n:].sum().reshape(1, 1)], dim=1)  # (1, n + 1)
    return torch.cat([top, bottom])


def ghost_joint_gram(cap: Capture, mode: str = "auto", collapse: bool = False):
    """J_l for every covered layer from the captured a and e. -> J (L, U, U), info with the form per layer.

    collapse=True: the m target units summed into one unit, J (L, n + 1, n + 1): kbc_from_joint(J, n, m) gives the
    same K, b, c, and the materialized form costs 2 (n^2 + n + 1) p_l instead of 2 U^2 p_l (theory/step_cost.md,
    eq. (5))."""
    blocks, modes = [], []
    for layer, a, e in zip(cap.layers, cap.a, cap.e):
        A, E = cap.per_unit(a), cap.per_unit(e)  # (U, T_u, d_in), (U, T_u, d_out)
        used = mode if mode != "auto" else "pair" if use_pair_form(A.shape[1], A.shape[2], E.shape[2], A.shape[0]) \
            else "materialize"
        if used == "materialize":  # F kept for the update when small enough (KEEP_FLAT_RATIO)
            F = collapsed_flat(A, E, layer.has_bias, cap.n) if collapse else materialized_flat(A, E, layer.has_bias)
            if F.numel() <= KEEP_FLAT_RATIO * (a.numel() + e.numel()):
                cap.flat[layer.name] = F
            if collapse:
                J = collapsed_gram(F, n=cap.n)  # (n + 1, n + 1)
            else:
                with no_autocast(F):
                    J = F @ F.T  # (U, U)
        else:
            J, used = layer_joint_gram(A, E, layer.has_bias, used)
            J = collapse_joint(J, cap.n) if collapse else J
        blocks.append(J)
        modes.append(used)
    return torch.stack(blocks), {"modes": modes}

"""Sketched Gram: random projections of each layer's inputs and output gradients (approximate).

Per covered layer draw P (d_in, k) and Q (d_out, k) with i.i.d. N(0, 1/k) entries (k = sketch_dim,
seeded) and replace a_t -> P^T a_t, e_t -> Q^T e_t before the ghost Gram of gram/ghost.py. Then the
sketched layer gradient of unit u is sum_t (Q^T e_t)(P^T a_t)^T = Q^T g_u P, i.e. (P kron Q)^T vec(g_u)
(the LoGra / Kronecker JL sketch, k^2 numbers per unit and layer); the bias gradient is sketched as
Q^T sum_t e_t. Since P and Q are independent with E[P P^T] = I, E[Q Q^T] = I, every sketched inner
product is unbiased, and its variance falls like 1/k (eqs. (7)-(9) in theory/gram.md): the relative
error of K, b, c shrinks like 1/sqrt(sketch_dim). The same P, Q serve all units (general and target).
Half-precision captures are widened to float32 and projected by a float32 P, Q (theory/precision.md).

Shapes:
    a (R, T, d_in) @ P (d_in, k) -> (R, T, k);  e (R, T, d_out) @ Q (d_out, k) -> (R, T, k)
    joint Gram J (L, U, U)
"""

from __future__ import annotations

import torch

from drpt_ref.gram.ghost import Capture, layer_joint_gram
from drpt_ref.gram.precision import no_autocast, widen


def sketch_matrices(d_in: int, d_out: int, dim: int, gen: torch.Generator, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """P (d_in, dim), Q (d_out, dim), entries N(0, 1/dim) on gen's device: E[P P^T] = I, eq. (7) in theory/gram.md."""
    P = torch.randn(d_in, dim, generator=gen, dtype=dtype, device=gen.device) / dim**0.5
    Q = torch.randn(d_out, dim, generator=gen, dtype=dtype, device=gen.device) / dim**0.5
    return P, Q


def sketch_joint_gram(cap: Capture, dim: int, seed: int, mode: str = "auto"):
    """Approximate J_l from projected a and e, eq. (8) in theory/gram.md. -> J (L, U, U), info"""
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"sketch_dim must be a positive int, got {dim!r}")
    # a generator on the capture's device: P, Q drawn there, no host-to-device copy per layer (a CPU and a CUDA run
    # draw different sketches of the same law, eq. (7))
    gen = torch.Generator(device=cap.a[0].device).manual_seed(seed)
    blocks, modes = [], []
    for layer, a, e in zip(cap.layers, cap.a, cap.e):
        a, e = widen(a, e)  # half-precision captures: projected in float32 (eq. (1) in theory/precision.md)
        P, Q = sketch_matrices(layer.d_in, layer.d_out, dim, gen, a.dtype)
        with no_autocast(a):
            a_s = a @ P  # (R, T, k)
            e_s = e @ Q  # (R, T, k)
        J, used = layer_joint_gram(cap.per_unit(a_s), cap.per_unit(e_s), layer.has_bias, mode)
        blocks.append(J)
        modes.append(used)
    return torch.stack(blocks), {"modes": modes, "sketch_dim": dim, "seed": seed}

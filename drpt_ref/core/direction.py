"""The result type of every projection, and the checks on its input (K, b, c).

A projection returns the update direction as coefficients, never as a p-vector:

    d = alpha * g_T + G w                                   # eq. (1) in theory/notation.md
    objective = 1/2 ||d - g_T||^2
              = 1/2 w^T K w - (1 - alpha) b^T w + 1/2 (1 - alpha)^2 c     # eq. (2)

with K = G^T G, b = G^T g_T, c = ||g_T||^2. Eq. (2) is how every solver reports its objective,
so objectives are comparable across methods, solvers and devices.

Shapes:
    K (n, n), b (n,), c scalar          single problem (numpy arrays or torch tensors)
    K (B, n, n), b (B, n), c (B,)       batched problems (torch tensors, `project_batched`)
    Direction.alpha ()/(B,), weights (n,)/(B, n), objective ()/(B,)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# Relative tolerances for refusing input, by dtype: a Gram matrix computed in that precision has
# asymmetry and negative eigenvalues of order n * eps * ||K||; we refuse only what is far beyond it
# (n <= 1e4 and a safety factor of 100 give 1e-10 in float64, 1e-3 in float32 or lower).
SYMMETRY_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
PSD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-3}
# Eigenvalues of a float64 Gram matrix carry an absolute error of about n * eps * lambda_max, so
# below RANK_RTOL * max(n, 10) * lambda_max an eigenvalue is indistinguishable from zero (eq. (6)
# in theory/notation.md): solvers treat those directions as the null space of K.
RANK_RTOL = 1e-14


def numerical_null(eigenvalues: np.ndarray, n: int) -> np.ndarray:
    """Mask of the eigenvalues of an (n, n) Gram matrix that are zero up to round-off."""
    top = max(float(eigenvalues.max()), 0.0)
    return eigenvalues <= RANK_RTOL * max(n, 10) * top


@dataclass
class Direction:
    """d = alpha * g_T + G w, with its objective 1/2 ||d - g_T||^2 and the solver's certificate.

    info holds at least: method, solver, converged (bool or (B,) mask), iterations, certificate
    (KKT residual or Frank-Wolfe gap, scaled as documented by the solver) and certificate_kind.
    """

    alpha: Any  # scalar, or (B,)
    weights: Any  # (n,), or (B, n)
    objective: Any  # scalar, or (B,)
    info: dict = field(default_factory=dict)


def gram_objective(K, b, c, alpha, w):
    """Eq. (2): 1/2 ||alpha g_T + G w - g_T||^2 from the Gram quantities (numpy, one problem)."""
    beta = 1.0 - alpha
    return 0.5 * float(w @ K @ w) - beta * float(b @ w) + 0.5 * beta * beta * float(c)


def program_value(K, b, c, method: str, params: dict, alpha, w) -> float:
    """The value of the method's own program at (alpha, w) (numpy, one problem).

    The objective of eq. (2) for the projections; b^T w for the `topk` LP; the entropic value
    b^T w - tau KL(w || 1/n) for `softmax`; eq. (2) plus the ridge penalty for `subspace`.
    """
    n = w.shape[0]
    if method == "topk":
        return float(b @ w)
    if method == "softmax":
        pos = w > 0
        kl = float(np.sum(w[pos] * np.log(n * w[pos])))  # KL(w || 1/n), with 0 log 0 = 0
        return float(b @ w) - params["tau"] * kl
    value = gram_objective(K, b, c, alpha, w)
    if method == "subspace":
        value += 0.5 * params["ridge"] * float(np.sum((w - 1.0 / n) ** 2))
    return value


def gram_factor(K, b, c) -> np.ndarray:
    """F (r, n+1) with F^T F = J = [[c, b^T], [b, K]], the joint Gram of the columns (g_T, G).

    The Gram matrix fixes the vectors up to a rotation: the columns of F are g_T, g_1, ..., g_n
    written in coordinates of their r-dimensional span (eq. (5) in theory/notation.md). Any
    program over d in span(g_T, G) can therefore be written with F in place of [g_T, G].
    The rank is decided in correlation form C = D^(-1/2) J D^(-1/2), D = diag(J) (eq. (6')): a
    short vector is a direction as clear as a long one, so vectors whose lengths span decades keep
    their directions (a rank test on J itself would drop the short ones as round-off). Zero vectors
    get zero columns.
    """
    n = K.shape[0]
    J = np.empty((n + 1, n + 1))  # (n+1, n+1)
    J[0, 0], J[0, 1:], J[1:, 0], J[1:, 1:] = c, b, b, K
    D = np.diag(J).copy()  # (n+1,) squared lengths of g_T, g_1..g_n
    live = D > 0  # (n+1,) zero vectors stay out of the factorization
    if not live.any():  # all vectors are zero: one zero row keeps the shapes valid
        return np.zeros((1, n + 1))
    a = 1.0 / np.sqrt(D[live])  # (l,)
    C = a[:, None] * J[np.ix_(live, live)] * a[None, :]  # (l, l) unit diagonal
    lam, Q = np.linalg.eigh(C)  # C = Q diag(lam) Q^T
    keep = ~numerical_null(lam, int(live.sum()))  # (l,) round-off eigenvalues dropped, eq. (6)
    F = np.zeros((int(keep.sum()), n + 1))  # (r, n+1)
    F[:, live] = (np.sqrt(lam[keep])[:, None] * Q[:, keep].T) / a[None, :]  # undo the scaling per column
    return F


def _kind_of(x):
    """('numpy', dtype, None) or ('torch', dtype, device), to return results as they came in."""
    if isinstance(x, torch.Tensor):
        return ("torch", x.dtype, x.device)
    return ("numpy", np.asarray(x).dtype, None)


def to_float64(name: str, x) -> np.ndarray:
    """Convert an array-like argument to a float64 numpy array, refusing NaN, inf and non-numbers."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise ValueError(f"{name} is complex; pass a real tensor.")
        if x.is_meta:
            raise ValueError(f"{name} is on the 'meta' device (shapes only, no values); pass tensors that hold values.")
        arr = x.detach().to("cpu", torch.float64).numpy()
    else:
        if np.iscomplexobj(x):
            raise ValueError(f"{name} is complex; pass a real array.")
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be a real array or tensor, got {type(x).__name__}.") from exc
    if not np.all(np.isfinite(arr)):
        raise ValueError(
            f"{name} contains NaN or inf; check the gradients it was computed from "
            "(a diverged loss, or a token mask that divides by zero)."
        )
    return arr


def check_gram(K, b, c, batched: bool = False):
    """Validate (K, b, c) and return float64 numpy copies plus the input kind of K.

    Refuses, with the argument named: wrong shapes, n = 0, NaN/inf, K not symmetric, and a joint
    Gram [[c, b^T], [b, K]] of (g_T, G) that is not PSD beyond PSD_RTOL (this catches a K that is
    not PSD, c < 0, and b that did not come from the same G and g_T). The PSD tests read the
    correlation form D^(-1/2) J D^(-1/2), D = diag(J), so they do not depend on the vectors' lengths.
    """
    kind = _kind_of(K)
    dtype = kind[1] if kind[0] == "torch" else (torch.float64 if kind[1] == np.float64 else torch.float32)
    dtype = dtype if dtype in SYMMETRY_RTOL else torch.float32  # half precisions: float32 tolerances
    K64, b64, c64 = to_float64("K", K), to_float64("b", b), to_float64("c", c)
    lead = 1 if batched else 0
    if K64.ndim != 2 + lead or K64.shape[-1] != K64.shape[-2]:
        want = "(B, n, n)" if batched else "(n, n)"
        raise ValueError(f"K must have shape {want} (a square Gram matrix G^T G), got {tuple(K64.shape)}.")
    n = K64.shape[-1]
    if n == 0:
        raise ValueError("K is empty (n = 0 general samples): a projection needs at least one general gradient.")
    if b64.shape != K64.shape[:-1]:
        want = "(B, n)" if batched else "(n,)"
        raise ValueError(f"b must have shape {want} = {K64.shape[:-1]} to match K, got {tuple(b64.shape)}.")
    if c64.shape != K64.shape[:-2]:
        want = "(B,)" if batched else "a scalar"
        raise ValueError(f"c = ||g_T||^2 must be {want}, got shape {tuple(c64.shape)}.")
    Kb = K64.reshape(-1, n, n)  # (B, n, n)
    bb = b64.reshape(-1, n)  # (B, n)
    cb = c64.reshape(-1)  # (B,)
    scale = np.abs(Kb).max(axis=(1, 2))  # (B,) the size of K alone: a long or short g_T must not hide K's flaws
    scale = np.where(scale > 0, scale, 1.0)
    asym = np.abs(Kb - Kb.transpose(0, 2, 1)).max(axis=(1, 2)) / scale  # (B,)
    if np.any(asym > SYMMETRY_RTOL[dtype]):
        raise ValueError(
            f"K is not symmetric (max |K - K^T| / max|K| = {asym.max():.2e} > {SYMMETRY_RTOL[dtype]:.0e}); "
            "pass K = G^T G, or symmetrize it with (K + K^T) / 2."
        )
    J = np.zeros((Kb.shape[0], n + 1, n + 1))  # (B, n+1, n+1) joint Gram of (g_T, G)
    J[:, 0, 0] = cb
    J[:, 0, 1:] = bb
    J[:, 1:, 0] = bb
    J[:, 1:, 1:] = 0.5 * (Kb + Kb.transpose(0, 2, 1))
    tol = PSD_RTOL[dtype] * (n + 1)
    D = np.einsum("bii->bi", J)  # (B, n+1): c, K_11, ..., K_nn
    D_max = D.max(axis=1, keepdims=True)  # (B, 1)
    K_max = D[:, 1:].max(axis=1)  # (B,) a negative K_ii is judged against K alone, c against all of J
    bad_K = np.any(D[:, 1:].min(axis=1) < -tol * np.where(K_max > 0, K_max, 1.0))
    if bad_K:
        raise ValueError("K is not PSD (a negative diagonal entry); K must be a Gram matrix: compute K = G^T G "
                         "from the per-sample gradients.")
    if np.any(D[:, 0] < -tol * np.where(D_max[:, 0] > 0, D_max[:, 0], 1.0)):
        raise ValueError("b and c do not match K: c = ||g_T||^2 < 0; compute b = G^T g_T and c = ||g_T||^2 "
                         "from the same G and g_T.")
    # correlation form C = D^(-1/2) J D^(-1/2) (unit diagonal): round-off of a Gram matrix computed in
    # the input's precision is ~ n eps in C whatever the lengths of the vectors, while a test scaled by
    # max |J| lets a very long g_T (or a very long g_i) hide a flaw among the short ones
    inv = 1.0 / np.sqrt(np.where(D > 0, D, np.where(D_max > 0, D_max, 1.0)))  # (B, n+1) zero vectors: the largest scale
    C = inv[:, :, None] * J * inv[:, None, :]  # (B, n+1, n+1)
    eig_K = np.linalg.eigvalsh(C[:, 1:, 1:])[:, 0]  # (B,)
    if np.any(eig_K < -tol):
        raise ValueError(
            f"K is not PSD (min eigenvalue of its correlation form = {eig_K.min():.2e}); K must be a Gram "
            "matrix: compute K = G^T G from the per-sample gradients."
        )
    eig_J = np.linalg.eigvalsh(C)[:, 0]  # (B,)
    if np.any(eig_J < -tol):
        raise ValueError(
            f"b and c do not match K: the joint Gram [[c, b^T], [b, K]] of (g_T, G) has min eigenvalue of its "
            f"correlation form = {eig_J.min():.2e} < 0; compute b = G^T g_T and c = ||g_T||^2 from the same G and g_T."
        )
    return 0.5 * (K64 + np.swapaxes(K64, -1, -2)), b64, c64, kind


def as_input_kind(x, kind):
    """Return float64 numpy x converted back to the kind (numpy/torch, dtype, device) of the input."""
    if kind[0] == "torch":
        return torch.as_tensor(np.asarray(x), dtype=torch.float64).to(device=kind[2], dtype=kind[1])
    dtype = kind[1] if np.issubdtype(kind[1], np.floating) else np.dtype(np.float64)
    return np.asarray(x, dtype=dtype) if np.ndim(x) else dtype.type(x)

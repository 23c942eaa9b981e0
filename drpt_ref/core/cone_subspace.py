"""Projection onto the cone and onto the span of the general gradients, exactly, from K, b, c.

    cone:      minimize_w 1/2 ||G w - g_T||^2  s.t. w >= 0              eq. (1) in theory/cone.md
    subspace:  minimize_w 1/2 ||G w - g_T||^2 + ridge/2 ||w - 1/n||^2    eq. (1) in theory/subspace.md

The cone is solved on the Gram factor F = [f_T, F_G] (r, n+1), F^T F = [[c, b^T], [b, K]]
(`gram_factor`, eq. (5) in theory/notation.md): its columns are g_T and the g_i written in
coordinates of their span, so the p-dimensional problems become r-dimensional ones with the same
solutions, r <= n + 1.

- cone: nonnegative least squares min ||F_G w - f_T|| s.t. w >= 0 by Lawson-Hanson (scipy's
  `nnls`), a finite active-set method (eq. (3) in theory/cone.md). Certificate: the relative
  natural KKT residual ||min(L w, K w - b)||_inf / (||b||_inf + L ||w||_inf), eq. (2). scipy's
  re-implemented `nnls` (>= 1.12) can stop at a non-optimal point when columns are linearly
  dependent (scipy issues 21140, 25389; the `duplicates` family hits it); when its point fails the
  certificate, our own Lawson-Hanson loop continues from it (`lawson_hanson`).
- subspace: ridge = 0 is the minimum-norm solution w = K^+ b of the normal equations, from the
  eigendecomposition of K with round-off eigenvalues treated as zero (eq. (3) in
  theory/subspace.md); ridge > 0 is the linear system (K + ridge I) w = b + ridge/n 1 (eq. (4)).
  Certificate: the relative residual of the normal equations.

Shapes: K (n, n), b (n,), c scalar -> w (n,).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import nnls

from drpt_ref.core.direction import gram_factor, numerical_null

_TINY = np.finfo(float).tiny


def solve_cone(K, b, c, max_iter: int | None = None, tol: float = 1e-10):
    """Lawson-Hanson NNLS on the Gram factor; returns (0, w, info)."""
    n = K.shape[0]
    F = gram_factor(K, b, c)  # (r, n+1)
    f_T, F_G = F[:, 0], F[:, 1:]  # (r,), (r, n)
    max_iter = 50 * n + 100 if max_iter is None else max_iter
    try:
        w, _ = nnls(F_G, f_T, maxiter=max_iter)  # (n,)
        hit_limit = False
    except RuntimeError:  # older scipy raises when maxiter is reached
        w, hit_limit = np.zeros(n), True
    L = float(np.linalg.eigvalsh(K)[-1]) if n else 0.0

    def kkt_residual(w):  # eq. (2): w >= 0, r = K w - b >= 0, w * r = 0, relative to the terms' size
        return np.abs(np.minimum(L * w, K @ w - b)).max() / (np.abs(b).max() + L * np.abs(w).max() + _TINY)

    kkt = kkt_residual(w)
    if not kkt <= tol and not hit_limit:  # scipy's nnls stopped short: continue from its point
        w = lawson_hanson(F_G, f_T, w, max_iter, 0.1 * tol * (np.abs(b).max() + L * np.abs(w).max() + _TINY))
        kkt = kkt_residual(w)
    info = {
        "converged": bool(kkt <= tol and not hit_limit),
        "iterations": max_iter if hit_limit else None,
        "certificate": float(kkt),
        "certificate_kind": "kkt_residual",
    }
    return 0.0, w, info


def lawson_hanson(A, y, w, max_iter: int, dual_tol: float) -> np.ndarray:
    """min ||A w - y|| s.t. w >= 0 by the Lawson-Hanson active set, from a feasible w (eq. (3) in theory/cone.md).

    The passive set P = {w_i > 0} is solved by least squares (minimum norm where A_P is rank
    deficient); a solution with a non-positive entry is approached only as far as w stays >= 0, and
    the entries reaching 0 leave P. When the solution on P is positive, the most negative gradient
    entry r_i = (A^T (A w - y))_i < -dual_tol outside P joins it; none: w is optimal.
    A (r, n), y (r,), w (n,) -> w (n,)
    """
    w = np.maximum(w, 0.0)
    P = w > 0  # (n,)
    for _ in range(max_iter):
        x = np.zeros_like(w)
        if P.any():
            x[P] = np.linalg.lstsq(A[:, P], y, rcond=None)[0]
        if (x[P] > 0).all():  # the solution on P is feasible: test the dual, grow P
            w = x
            r = A.T @ (A @ w - y)  # (n,) gradient K w - b
            r[P] = np.inf
            j = int(np.argmin(r))
            if not r[j] < -dual_tol:
                break
            P[j] = True
        else:  # move toward x as far as w >= 0 allows; the entries that reach 0 leave P
            ratio = np.where(P & (x <= 0), w / np.maximum(w - x, _TINY), np.inf)  # (n,) w - x > 0 there
            j = int(np.argmin(ratio))
            w = w + ratio[j] * (x - w)
            w[j] = 0.0
            P &= w > np.finfo(float).eps * np.abs(w).max()  # at 0 up to round-off: leaves P
            w[~P] = 0.0
    return w


def solve_subspace(K, b, c, ridge: float = 0.0, tol: float = 1e-10):
    """Least squares on the Gram factor (ridge = 0) or the ridge system; returns (0, w, info)."""
    n = K.shape[0]
    if ridge > 0.0:
        A = K + ridge * np.eye(n)  # (n, n) positive definite
        rhs = b + ridge / n  # (n,) eq. (4) in theory/subspace.md
        w = np.linalg.solve(A, rhs)
        resid = np.abs(A @ w - rhs).max() / (np.abs(A).max() * np.abs(w).max() + np.abs(rhs).max() + _TINY)
    else:
        lam, Q = np.linalg.eigh(K)  # K = Q diag(lam) Q^T
        keep = ~numerical_null(lam, n)  # (n,) the range of K, eq. (6) in theory/notation.md
        w = Q[:, keep] @ ((Q[:, keep].T @ b) / lam[keep])  # (n,) minimum-norm K^+ b, eq. (3) in theory/subspace.md
        # normal equations K w = b, relative to the size of the terms (b lies in range(K))
        resid = np.abs(K @ w - b).max() / (np.abs(K).max() * np.abs(w).max() + np.abs(b).max() + _TINY)
    info = {"converged": bool(resid <= tol), "iterations": 0, "certificate": float(resid),
            "certificate_kind": "normal_equations_residual"}
    return 0.0, w, info

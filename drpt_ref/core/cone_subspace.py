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

from drpt_ref.core.certificate import certify_one
from drpt_ref.core.direction import RANK_RTOL, gram_factor, numerical_null

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


def _min_norm_solves(K, b):
    """Candidate solutions of K w = b in Jacobi-scaled form, one per plausible rank (eq. (3') in theory/subspace.md).

    Zero units (K_ii = 0) get w_i = 0. The rest is scaled to unit diagonal, Ks = A K A with
    A = diag(K_ii^(-1/2)), so samples whose norms span decades are not cut as round-off; the
    eigenvalues of Ks below the round-off of a float64 Gram matrix (eq. (6) in theory/notation.md)
    and, as a second candidate, only those below n eps lambda_max are treated as zero. The caller
    keeps the candidate with the better certificate. Yields w (n,).
    """
    n = K.shape[0]
    live = np.diag(K) > 0  # (n,) a zero unit adds nothing to the span
    if not live.any():
        yield np.zeros(n)
        return
    a = 1.0 / np.sqrt(np.diag(K)[live])  # (l,)
    lam, Q = np.linalg.eigh(a[:, None] * K[np.ix_(live, live)] * a[None, :])  # Ks = Q diag(lam) Q^T
    qb = Q.T @ (a * b[live])  # (l,)
    top = max(float(lam.max()), 0.0)
    seen = set()
    for floor in (RANK_RTOL * max(n, 10) * top, 4 * n * np.finfo(float).eps * top):
        keep = lam > floor  # (l,)
        if keep.sum() in seen:
            continue
        seen.add(int(keep.sum()))
        w = np.zeros(n)
        w[live] = a * (Q[:, keep] @ (qb[keep] / lam[keep]))  # minimum-norm in the scaled weights
        yield w


def solve_subspace(K, b, c, ridge: float = 0.0, tol: float = 1e-10):
    """The normal equations (ridge = 0) or the ridge system by eigendecomposition; returns (0, w, info).

    ridge > 0: (K + ridge I) w = b + ridge/n 1 in the eigenbasis of K, with b's round-off part on
    the null space of K set to zero (b lies in range(K)): a tiny ridge then gives the minimum-norm
    solution pulled to 1/n along the null space, never a singular system (eq. (4') in theory/subspace.md).
    The certificate is the cosine residual of theory/certificates.md, eq. (4).
    """
    n = K.shape[0]
    if ridge > 0.0:
        lam, Q = np.linalg.eigh(K)  # K = Q diag(lam) Q^T
        null = numerical_null(lam, n)  # (n,)
        qb = np.where(null, 0.0, Q.T @ b)  # (n,)
        rhs = qb + ridge / n * Q.sum(axis=0)  # (n,) Q^T (b + ridge/n 1)
        candidates = [Q @ (rhs / (np.where(null, 0.0, lam) + ridge))]
    else:
        candidates = list(_min_norm_solves(K, b))
    best = None
    for w in candidates:
        cert = float(certify_one(K, b, c, "subspace", w, ridge=ridge)["certificate"])
        if best is None or cert < best[1]:
            best = (w, cert)
    w, cert = best
    info = {"converged": bool(cert <= tol), "iterations": 0, "certificate": cert,
            "certificate_kind": "normal_equations_cosine_and_gap"}
    return 0.0, w, info

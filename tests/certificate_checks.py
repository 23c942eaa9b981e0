"""What a certified answer must satisfy, checked against the primal program with explicit G (theory/certificates.md).

For every call that reports converged=True, with f_G(w) = 1/2 ||G w - g_T||^2 evaluated in extended precision
from the explicit vectors (not from the solver's K):
    feasibility     the set's constraints hold within FEAS_TOL of the dtype                     eq. (1)
    optimality      f_G(w) - f_G(v) <= CERT_TOL (c + ||G w||^2) + 16 eps (S(w) + S(v))        eq. (7)
                    (c replaced by max_i K_ii when g_T = 0: there is no target length then)
    agreement       |reported objective - f_G(w)| <= 16 eps S(w)                               eq. (7)
with S(w) = c + |w|^T |K| |w| + 2 |b|^T |w| (the round-off scale of the Gram form at w) and v the primal cvxpy
program's solution moved onto the set (an inaccurate reference can only loosen the check); S(v) is the
resolution at which the data define f at v (a point whose terms cancel by 1e8 is better only below it).
"""

from __future__ import annotations

import warnings
from fractions import Fraction

import cvxpy as cp
import numpy as np
import torch

from drpt_ref import project, project_batched
from drpt_ref.core.certificate import tolerances
from drpt_ref.core.simplex_qp import project_capped_simplex

ITERATIVE = ("simplex", "capped_simplex", "cone", "subspace")
SOLVERS = ("exact", "batched64", "batched32")


def primal_value(G: np.ndarray, g: np.ndarray, w) -> float:
    """f_G(w) exactly (rational arithmetic on the float64 values) for small problems, else in longdouble.

    A reference point with weights of 1e7 on columns 1e-4 long cancels to a residual that even longdouble
    evaluates only to ~1e-8: exact arithmetic keeps the check from blaming a solver for the evaluation.
    """
    G, g, w = np.asarray(G, dtype=np.float64), np.asarray(g, dtype=np.float64), np.asarray(w, dtype=np.float64)
    if G.size <= 4096:
        Gq = [[Fraction(x) for x in row] for row in G.tolist()]
        wq, gq = [Fraction(x) for x in w.tolist()], [Fraction(x) for x in g.tolist()]
        e = [sum((a * b for a, b in zip(row, wq)), Fraction(0)) - t for row, t in zip(Gq, gq)]
        return float(sum((x * x for x in e), Fraction(0)) / 2)
    G, g, w = (x.astype(np.longdouble) for x in (G, g, w))
    e = G @ w - g
    return float(0.5 * (e @ e))


def primal_reference(G: np.ndarray, g: np.ndarray, method: str, k: float | None = None) -> tuple[float, np.ndarray]:
    """The primal program with explicit G, by cvxpy/Clarabel; its point v moved onto the set. -> (f_G(v), v)"""
    n = G.shape[1]
    w = cp.Variable(n)
    cap = 1.0 / k if k else 1.0
    constraints = {"simplex": [w >= 0, cp.sum(w) == 1], "capped_simplex": [w >= 0, w <= cap, cp.sum(w) == 1],
                   "cone": [w >= 0], "subspace": []}[method]
    s = float(max(np.abs(G).max(initial=0.0), np.abs(g).max(initial=0.0))) or 1.0  # data of order one
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares((G / s) @ w - g / s)), constraints)
    attempts = [dict(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12),
                dict(solver=cp.CLARABEL), dict(solver=cp.SCS, eps=1e-10, max_iters=20000)]
    for opts in attempts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                problem.solve(**opts)
            except cp.error.SolverError:
                continue
        if w.value is not None and np.isfinite(w.value).all():
            break
    else:  # no reference: the optimality check is skipped (+inf), feasibility and agreement still hold
        return float("inf"), np.zeros(n)
    value = np.asarray(w.value, dtype=np.float64)
    if method in ("simplex", "capped_simplex"):
        value = project_capped_simplex(value, cap)
    elif method == "cone":
        value = np.maximum(value, 0.0)
    return primal_value(G, g, value), value


def solve(solver: str, K, b, c, method: str, params: dict):
    """(weights float64 (n,), objective, converged) of one solver on one problem, warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if solver == "exact":
            d = project(K, b, c, method, **params)
            return np.asarray(d.weights, dtype=np.float64), float(d.objective), bool(d.info["converged"])
        dtype = torch.float32 if solver == "batched32" else torch.float64

        def t(x):
            return torch.as_tensor(np.asarray(x, dtype=np.float64)).to(dtype).unsqueeze(0)

        d = project_batched(t(K)[0:1], t(b), t([c])[0], method, **params)
        return d.weights[0].double().numpy(), float(d.objective[0]), bool(d.info["converged"][0])


def violations(G, g, method: str, k: float | None, w, objective: float, reference: float,
               dtype: torch.dtype, ref_w=None) -> dict:
    """The three ratios of the module docstring (<= 1 passes) for a converged answer w."""
    cert_tol, feas_tol = tolerances(dtype)
    eps = float(torch.finfo(dtype).eps)
    Gl, gl, wl = (np.asarray(x).astype(np.longdouble) for x in (G, g, w))
    K, b = Gl.T @ Gl, Gl.T @ gl

    def size(v):  # S(v) of eq. (7)
        v = np.asarray(v).astype(np.longdouble)
        return float(gl @ gl + np.abs(v) @ np.abs(K) @ np.abs(v) + 2 * np.abs(b) @ np.abs(v))

    S = size(wl)
    S_ref = size(ref_w) if ref_w is not None else 0.0
    f = primal_value(G, g, w)
    c = float(gl @ gl)  # when g_T = 0 there is no target length: the longest unit sets the scale (eq. (7))
    size_w = (c if c > 0 else float(np.diag(K).max(initial=0.0))) + 2 * primal_value(G, 0 * g, w)
    feas = 0.0
    if method in ("simplex", "capped_simplex"):
        cap = 1.0 / k if k else 1.0
        feas = max(-w.min(), w.max() - cap, abs(w.sum() - 1.0)) / cap
    elif method == "cone":
        feas = max(0.0, -w.min())
    tiny = np.finfo(np.float64).tiny
    return {"optimality": (f - reference) / max(cert_tol * size_w + 16 * eps * (S + S_ref), tiny),
            "agreement": abs(objective - f) / max(16 * eps * S, tiny),
            "feasibility": feas / feas_tol,
            "finite": bool(np.isfinite(w).all() and np.isfinite(objective))}

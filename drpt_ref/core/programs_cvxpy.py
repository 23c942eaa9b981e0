"""The definition of every method: an explicit convex program in the sample weights w, in cvxpy.

This file is the reference the fast solvers are checked against, written to be read. Each
program is the Gram form of a projection (theory/notation.md, eq. (2)):

    minimize_w   1/2 w^T K w - b^T w + 1/2 c          ( = 1/2 ||G w - g_T||^2 )
    subject to   w in W_method

except three that say something else on purpose: `topk` is the linear program of hard
selection (theory/topk.md, eq. (1)), `softmax` the entropy-regularized linear program
(theory/softmax.md, eq. (1)), and the three endpoint/ball methods carry a coefficient alpha on
g_T, d = alpha g_T + G w.

The programs are written in the primal, with the vectors themselves: a factor F of the joint
Gram J = [[c, b^T], [b, K]] holds g_T and the columns of G in coordinates of their span
(`gram_factor`), so 1/2 ||G w - g_T||^2 is literally `sum_squares(F_G @ w - f_T) / 2`. This is
both the most readable form and the best conditioned one for the interior-point solver.

`solve_cvxpy` solves a program with Clarabel (an interior-point method) at tight tolerances and
returns (alpha, w, info). It is slow (milliseconds per problem); it is the oracle, not the solver.

Shapes: K (n, n), b (n,), c scalar; variables w (n,), alpha scalar.
"""

from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np

from drpt_ref.core.direction import check_gram, gram_factor, program_value
from drpt_ref.core.methods import check_params
from drpt_ref.core.simplex_qp import project_capped_simplex

# Clarabel's defaults stop at 1e-8 relative gap. The references must be far better than the 1e-7
# agreement we test, and a projection's direction is only as accurate as the square root of its
# objective (||d - d*||^2 <= 2 (f - f*)), so we ask for 1e-13 on data scaled to order one. Where
# Clarabel cannot reach that (it reports "optimal_inaccurate", often with a worse point than at a
# looser tolerance; the exponential cone of `softmax` usually), we fall back to 1e-11, then to its defaults.
CLARABEL_TOLERANCES = (1e-13, 1e-11, None)
TIE_BREAK = 1e-12  # relative weight of the tie-break among the optima of the cone (see _program)


def cvxpy_program(K, b, c, method: str, **params) -> cp.Problem:
    """Build (do not solve) the convex program that defines `method` on (K, b, c).

    The variable holding the sample weights is named "w"; methods with a coefficient on g_T also
    have a variable "alpha". Accepts numpy arrays or torch tensors; the program is in float64.
    """
    K, b, c, _ = check_gram(K, b, c)
    return _program(K, b, c, method, check_params(method, params, K.shape[0]))


def _program(K, b, c, method: str, params: dict) -> cp.Problem:
    """`cvxpy_program` on checked float64 data (K, b, c) and checked params."""
    n = K.shape[0]
    # Clarabel's absolute tolerances assume data of order one: when every vector is shorter than 1 (small
    # gradients), lengths are measured in units of s, the longest of (g_T, g_1..g_n). The minimizer is
    # unchanged (values scale by 1/s^2). Longer vectors are left as they are: scaling a problem whose
    # lengths span many decades down to the longest would push its small columns below the tolerances.
    s = min(1.0, float(np.sqrt(max(np.max(np.diag(K)), c)))) or 1.0  # all-zero vectors: any unit will do
    F = gram_factor(K, b, c) / s  # (r, n+1): columns are g_T, g_1..g_n in coordinates of their span
    f_T, F_G = F[:, 0], F[:, 1:]  # (r,), (r, n)
    b = b / s**2  # = F_G^T f_T
    w = cp.Variable(n, name="w")
    residual = 0.5 * cp.sum_squares(F_G @ w - f_T)  # 1/2 ||G w - g_T||^2, eq. (2) in theory/notation.md
    uniform = np.full(n, 1.0 / n)

    if method in ("target", "mean", "mix", "ball"):
        alpha = cp.Variable(name="alpha")
        objective = cp.Minimize(0.5 * cp.sum_squares(alpha * f_T + F_G @ w - f_T))  # 1/2 ||d - g_T||^2
        if method == "target":  # eq. (1) in theory/endpoints.md: C = R^p, d = g_T
            constraints = [alpha == 1.0, w == 0.0]
        elif method == "mean":  # eq. (2) in theory/endpoints.md: C = {G 1/n}
            constraints = [alpha == 0.0, w == uniform]
        elif method == "mix":  # eq. (3) in theory/endpoints.md: C = {lam g_T + (1 - lam) G 1/n}
            lam = params["lam"]
            constraints = [alpha == lam, w == (1.0 - lam) * uniform]
        else:  # eq. (1) in theory/ball.md: ||d - G 1/n|| <= radius, d in span(g_T, G)
            # A second-order cone program: minimize the distance itself (the same minimizer as half its
            # square), which Clarabel solves far more accurately.
            objective = cp.Minimize(cp.norm(alpha * f_T + F_G @ w - f_T))
            constraints = [cp.norm(alpha * f_T + F_G @ (w - uniform)) <= params["radius"] / s]
        return cp.Problem(objective, constraints)

    if method == "topk":  # eq. (1) in theory/topk.md: the LP relaxation of hard selection
        cap = 1.0 / params["k"]
        return cp.Problem(cp.Maximize(b @ w), [w >= 0, w <= cap, cp.sum(w) == 1])
    if method == "capped_simplex":  # eq. (1) in theory/capped_simplex.md
        cap = 1.0 / params["k"]
        return cp.Problem(cp.Minimize(residual), [w >= 0, w <= cap, cp.sum(w) == 1])
    if method == "simplex":  # eq. (1) in theory/simplex.md: the convex hull of the columns of G
        return cp.Problem(cp.Minimize(residual), [w >= 0, cp.sum(w) == 1])
    if method == "softmax":  # eq. (1) in theory/softmax.md: max b^T w - tau KL(w || 1/n)
        tau = params["tau"] / s**2  # in the units of the scaled b
        kl_to_uniform = -cp.sum(cp.entr(w)) + np.log(n)  # sum w log(n w) when sum w = 1
        # Divided by tau and shifted by the constant max(b) on the simplex: the same maximizer, with
        # data of order one for the exponential-cone solver.
        return cp.Problem(cp.Maximize((b - b.max()) / tau @ w - kl_to_uniform), [cp.sum(w) == 1])
    # Cone: when G has a nonnegative null vector the optimal weights form an unbounded set, and an interior-point
    # method drifts along it to weights of 1e15 whose objective float64 cannot evaluate. A tie-break of
    # TIE_BREAK times the squared lengths of the pieces, sum_i K_ii w_i^2 (the units of the residual), picks a
    # bounded optimum and moves the value by at most TIE_BREAK (sum_i |w_i| ||g_i||)^2 (theory/cone.md, eq. (4)).
    lengths = np.sqrt(np.clip(np.diag(K), 0.0, None)) / s  # (n,) ||g_i|| in the scaled units
    tie_break = 0.5 * TIE_BREAK * cp.sum_squares(cp.multiply(lengths, w))
    if method == "cone":  # eq. (1) in theory/cone.md: the cone generated by the columns of G
        return cp.Problem(cp.Minimize(residual + tie_break), [w >= 0])
    # method == "subspace": eq. (1) in theory/subspace.md: span(G), ridge pulls w toward 1/n
    ridge = params["ridge"] / s**2  # in the units of the scaled residual
    return cp.Problem(cp.Minimize(residual + 0.5 * ridge * cp.sum_squares(w - uniform)))


def solve_cvxpy(K, b, c, method: str, **params):
    """Solve `cvxpy_program` with Clarabel; return (alpha, w, info) in float64 numpy."""
    K64, b64, c64, _ = check_gram(K, b, c)  # with the tolerances of the input's dtype
    return solve_checked(K64, b64, c64, method, check_params(method, params, K64.shape[0]))


def solve_checked(K64, b64, c64, method: str, params: dict):
    """`solve_cvxpy` on float64 data that passed `check_gram` (with the tolerances of its original dtype,
    so not checked again here) and on checked params."""
    problem = _program(K64, b64, c64, method, params)
    for tol in CLARABEL_TOLERANCES:  # cvxpy's "may be inaccurate" warnings count only for the last attempt
        opts = {} if tol is None else dict(tol_gap_abs=tol, tol_gap_rel=tol, tol_feas=tol, max_iter=400)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                problem.solve(solver=cp.CLARABEL, **opts)
            except cp.error.SolverError:  # a stalled solve at this tolerance: try the next
                continue
        if problem.status == cp.OPTIMAL:
            break
    if problem.status != cp.OPTIMAL:
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if problem.variables()[0].value is None:
        raise RuntimeError(f"cvxpy/Clarabel found no solution for method {method!r} (status {problem.status}); "
                           "compare with solver='exact'.")
    variables = {v.name(): v for v in problem.variables()}
    w = np.asarray(variables["w"].value, dtype=np.float64).reshape(-1)  # (n,)
    alpha = float(variables["alpha"].value) if "alpha" in variables else 0.0
    # The interior-point solution violates the constraints by up to the solver's tolerance; we return
    # its Euclidean projection onto the feasible set (a change of that order), so weights are feasible.
    if method in ("topk", "capped_simplex", "simplex", "softmax"):
        w = project_capped_simplex(w, 1.0 / params["k"] if "k" in params else 1.0)
    elif method == "cone":
        w = np.maximum(w, 0.0)
    info = {
        "solver": "cvxpy",
        "status": problem.status,
        "converged": problem.status == cp.OPTIMAL,
        "iterations": problem.solver_stats.num_iters,
        # evaluated at the solution with the same formula as the exact solvers (for `ball` the
        # program minimizes the distance, not half its square)
        "program_value": program_value(K64, b64, float(c64), method, params, alpha, w),
        "certificate": float("nan"),
        "certificate_kind": "interior_point_status",
    }
    return alpha, w, info

"""`project`: the projection of the target gradient onto a feasible set, from the Gram form alone.

For a general batch with per-sample gradients G = [g_1 .. g_n] (p, n) and a target gradient g_T,
every method of the family returns

    d* = argmin_{d in C_method} 1/2 ||d - g_T||^2 = alpha g_T + G w      # eq. (1) in theory/notation.md

using only K = G^T G, b = G^T g_T and c = ||g_T||^2 (eq. (2)). The method names, parameters and
their checks are in `core/methods.py`; the programs that define them are in `core/programs_cvxpy.py`; the
exact solvers are in `core/closed_forms.py`, `core/simplex_qp.py` and `core/cone_subspace.py`.

    solver="exact"   closed forms, active-set QP, NNLS, least squares (default; float64 inside)
    solver="cvxpy"   the cvxpy program solved by Clarabel (the reference; slow)

Shapes: K (n, n), b (n,), c scalar -> Direction(alpha scalar, weights (n,), objective scalar).
Inputs may be numpy arrays or torch tensors (float32 or float64); the result comes back in the
kind, dtype and device of K.
"""

from __future__ import annotations

import warnings

from drpt_ref.core import closed_forms, cone_subspace
from drpt_ref.core.direction import Direction, as_input_kind, check_gram, gram_objective, program_value
from drpt_ref.core.methods import check_params, check_solver_options
from drpt_ref.core.programs_cvxpy import solve_checked
from drpt_ref.core.simplex_qp import solve_capped_simplex_qp

SOLVERS = ("exact", "cvxpy")


def _solve_exact(K, b, c, method, params, max_iter, tol):
    opts = {k: v for k, v in (("max_iter", max_iter), ("tol", tol)) if v is not None}
    if method == "target":
        return closed_forms.solve_target(K, b, c)
    if method == "mean":
        return closed_forms.solve_mean(K, b, c)
    if method == "mix":
        return closed_forms.solve_mix(K, b, c, params["lam"])
    if method == "ball":
        return closed_forms.solve_ball(K, b, c, params["radius"])
    if method == "topk":
        return closed_forms.solve_topk(K, b, c, params["k"])
    if method == "softmax":
        return closed_forms.solve_softmax(K, b, c, params["tau"])
    if method in ("simplex", "capped_simplex"):
        cap = 1.0 / params["k"] if method == "capped_simplex" else 1.0
        w, info = solve_capped_simplex_qp(K, b, c, cap, **opts)
        return 0.0, w, info
    if method == "cone":
        return cone_subspace.solve_cone(K, b, c, **opts)
    opts.pop("max_iter", None)  # a direct solve: no iterations
    return cone_subspace.solve_subspace(K, b, c, ridge=params["ridge"], **opts)


def project(K, b, c, method: str, *, solver: str = "exact", max_iter: int | None = None,
            tol: float | None = None, **params) -> Direction:
    """Project g_T onto the feasible set of `method`, given K = G^T G, b = G^T g_T, c = ||g_T||^2.

    Parameters by method: mix(lam), ball(radius), topk(k: int), capped_simplex(k: real),
    softmax(tau), subspace(ridge=0). `max_iter` and `tol` tune the iterative exact solvers.
    Returns a Direction: alpha, weights w, objective 1/2 ||alpha g_T + G w - g_T||^2, and info
    (method, solver, converged, iterations, certificate, certificate_kind, ...).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is unknown; use one of {SOLVERS} (project_batched for torch batches).")
    check_solver_options(max_iter, tol)
    K64, b64, c64, kind = check_gram(K, b, c)
    params = check_params(method, params, K64.shape[0])
    if solver == "cvxpy":
        alpha, w, info = solve_checked(K64, b64, c64, method, params)  # checked above, in the input's dtype
    else:
        alpha, w, info = _solve_exact(K64, b64, float(c64), method, params, max_iter, tol)
    info = {"method": method, "solver": solver, "params": params, **info}
    objective = gram_objective(K64, b64, float(c64), alpha, w)  # eq. (2) in theory/notation.md
    info["program_value"] = program_value(K64, b64, float(c64), method, params, alpha, w)
    if not info["converged"]:
        hint = ("raise max_iter or tol, or check the problem with solver='cvxpy'" if solver == "exact"
                else "the interior-point solver reported an inaccurate solution; compare with solver='exact'")
        warnings.warn(
            f"project(method={method!r}, solver={solver!r}) did not converge: certificate "
            f"{info['certificate_kind']} = {info['certificate']:.2e} (status: {info.get('status', 'n/a')}); {hint}.",
            RuntimeWarning,
            stacklevel=2,
        )
    return Direction(
        alpha=as_input_kind(alpha, kind),
        weights=as_input_kind(w, kind),
        objective=as_input_kind(objective, kind),
        info=info,
    )

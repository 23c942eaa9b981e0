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

import numpy as np
import torch

from drpt_ref.core import closed_forms, cone_subspace
from drpt_ref.core.certificate import ITERATIVE, accurate_objective, certify_one, clean_weights, describe_failure
from drpt_ref.core.direction import Direction, as_input_kind, check_gram, program_value
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


def _certified(K64, b64, c64, method, params, w, dtype):
    """Clean w onto the set and certify it on the caller's data; returns (w, certificate dict)."""
    cap = 1.0 / params["k"] if method == "capped_simplex" else (1.0 if method == "simplex" else None)
    t = lambda x: torch.tensor(np.asarray(x, dtype=np.float64)).unsqueeze(0)  # noqa: E731 (a copy)
    w = clean_weights(method, t(w), None if cap is None else t(cap), diag=t(np.diag(K64)))[0].numpy()
    return w, certify_one(K64, b64, c64, method, w, cap=cap, ridge=params.get("ridge"), dtype=dtype)


def project(K, b, c, method: str, *, solver: str = "exact", max_iter: int | None = None,
            tol: float | None = None, **params) -> Direction:
    """Project g_T onto the feasible set of `method`, given K = G^T G, b = G^T g_T, c = ||g_T||^2.

    Parameters by method: mix(lam), ball(radius), topk(k: int), capped_simplex(k: real),
    softmax(tau), subspace(ridge=0). `max_iter` and `tol` tune the iterative exact solvers.
    Returns a Direction: alpha, weights w, objective 1/2 ||alpha g_T + G w - g_T||^2 (computed in twice
    float64's precision, never negative), and info (method, solver, converged, iterations, certificate,
    certificate_kind, feasibility, ...).

    For simplex, capped_simplex, cone and subspace the answer of either solver is certified afterwards
    on (K, b, c) as given (core/certificate.py, theory/certificates.md): `converged` means the
    certificate passed. A failed certificate gets one repair (the other solver, or the exact solver
    again from the cleaned point), and the better certified answer is returned; if neither passes,
    converged=False and a RuntimeWarning says why.
    Raises ValueError for bad input (shapes, NaN/inf, a K that is not a Gram matrix, bad parameters).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is unknown; use one of {SOLVERS} (project_batched for torch batches).")
    check_solver_options(max_iter, tol)
    K64, b64, c64, kind = check_gram(K, b, c)
    params = check_params(method, params, K64.shape[0])
    dtype = kind[1] if kind[0] == "torch" else (torch.float64 if kind[1] == np.float64 else torch.float32)

    def solve(which):
        if which == "cvxpy":
            return solve_checked(K64, b64, c64, method, params)  # checked above, in the input's dtype
        return _solve_exact(K64, b64, float(c64), method, params, max_iter, tol)

    alpha, w, info = solve(solver)
    info = {"method": method, "solver": solver, "params": params, **info}
    if method in ITERATIVE:
        w, cert = _certified(K64, b64, float(c64), method, params, w, dtype)
        if not cert["passed"]:  # repair: the other rung of the ladder, and keep the better certified answer
            other = "cvxpy" if solver == "exact" else "exact"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    _, w2, info2 = solve(other)
                except RuntimeError:  # Clarabel returned nothing: no repair, the first answer stands
                    w2 = None
            if w2 is not None:
                w2, cert2 = _certified(K64, b64, float(c64), method, params, w2, dtype)
            if w2 is not None and (cert2["passed"] or cert2["certificate"] < cert["certificate"]):
                w, cert = w2, cert2
                info.update(repaired_by=other, iterations=info2.get("iterations"))
        info.update(solver_certificate=info.get("certificate"), solver_certificate_kind=info.get("certificate_kind"),
                    solver_converged=info["converged"], converged=bool(cert["passed"]),
                    certificate=cert["certificate"], certificate_kind=cert["certificate_kind"],
                    feasibility=cert["feasibility"])
    if method in ITERATIVE:  # alpha = 0: eq. (2) at w, already computed (Dot2) by the certificate
        objective = cert["objective"]
    else:
        t = lambda x: torch.as_tensor(np.asarray(x, dtype=np.float64)).unsqueeze(0)  # noqa: E731
        objective = float(accurate_objective(t(K64), t(b64), t(c64), t(alpha), t(w))[0])  # eq. (2), notation.md
    info["program_value"] = program_value(K64, b64, float(c64), method, params, alpha, w)
    if method in ITERATIVE and method != "subspace":
        info["program_value"] = objective
    if not info["converged"]:
        reason = (describe_failure(method, info["certificate"], info.get("feasibility", 0.0), dtype)
                  if method in ITERATIVE else f"status {info.get('status', 'n/a')}")
        hint = ("the certificate is computed at the data's own resolution, so a failure here means the answer "
                "is not certified: compare with solver='cvxpy', pass float64 data, or remove nearly duplicate units "
                "(see theory/certificates.md)" if solver == "exact" else "compare with solver='exact'")
        warnings.warn(
            f"project(method={method!r}, solver={solver!r}) did not converge: certificate "
            f"{info['certificate_kind']} = {info['certificate']:.2e} ({reason}); {hint}.",
            RuntimeWarning,
            stacklevel=2,
        )
    return Direction(
        alpha=as_input_kind(alpha, kind),
        weights=as_input_kind(w, kind),
        objective=as_input_kind(objective, kind),
        info=info,
    )

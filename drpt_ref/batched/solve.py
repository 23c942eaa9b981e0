"""`project_batched`: every projection of the family for B problems at once, in torch, on any device.

For each problem (K, b, c) of the batch it returns d = alpha g_T + G w minimizing 1/2 ||d - g_T||^2
over the method's set (theory/notation.md, eq. (1)), with the objective of eq. (2):

    objective = 1/2 w^T K w - (1 - alpha) b^T w + 1/2 (1 - alpha)^2 c

Closed forms (theory/batched_solvers.md, section 1): target, mean, mix, ball (eq. (2)), topk (the
vertex of eq. (8)), softmax (softmax(b / tau), eq. (3)). Iterative, from `batched/qp.py`: simplex,
capped_simplex, cone (eqs. (9)-(13)). A batched linear solve: subspace (eq. (14)).
No Python loop runs over the batch; the iterative solver syncs with the host once per check and once
per step of its active-set polish (to group the faces by size, eq. (11c)); none per FISTA iteration.

Shapes:
    K (B, n, n), b (B, n), c (B,)  ->  alpha (B,), weights (B, n), objective (B,)
    info: converged (B,), iterations (B,), certificate (B,), certificate_kind, program_value (B,)
"""

from __future__ import annotations

import math

import torch

from drpt_ref.batched.checks import check_batch, check_batch_params, warn_not_converged
from drpt_ref.batched.polish import bmv
from drpt_ref.batched.projections import lmo_value, topk_vertex
from drpt_ref.batched.qp import DEFAULT_MAX_ITER, DEFAULT_TOL, solve_qp
from drpt_ref.core.direction import Direction
from drpt_ref.core.methods import check_solver_options

# eq. (14): ridge of the subspace Cholesky relative to the Jacobi-scaled K (unit diagonal), removed
# again by REFINE_STEPS steps of iterative refinement; see theory/batched_solvers.md, section 4.
SUBSPACE_RIDGE = {torch.float64: 1e-13, torch.float32: 1e-6}
REFINE_STEPS = 3
SUBSPACE_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}  # relative KKT residual, eq. (14)


def gram_objective_batched(K, b, c, alpha, w):
    """Eq. (2) for a batch. (B, n, n), (B, n), (B,), (B,), (B, n) -> (B,)"""
    beta = 1.0 - alpha
    return 0.5 * (w * bmv(K, w)).sum(-1) - beta * (b * w).sum(-1) + 0.5 * beta * beta * c


def _solve_subspace(K, b, ridge):
    """(K + ridge I) w = b + ridge / n 1, Jacobi-scaled Cholesky + refinement, eq. (14). -> w, residual"""
    B, n = b.shape
    d = K.diagonal(dim1=-2, dim2=-1)  # (B, n)
    d_max = d.amax(-1, keepdim=True)
    d = torch.where(d_max > 0, torch.maximum(d, 1e-20 * d_max), torch.ones_like(d))
    a = d.rsqrt()  # (B, n)
    A = K * (a.unsqueeze(-1) * a.unsqueeze(-2)) + torch.diag_embed(ridge.unsqueeze(-1) * a * a)  # (B, n, n)
    r = a * (b + ridge.unsqueeze(-1) / n)  # (B, n)
    eye = torch.eye(n, dtype=K.dtype, device=K.device)
    rho = SUBSPACE_RIDGE.get(K.dtype, 1e-6) * n
    chol, info = torch.linalg.cholesky_ex(A + rho * eye)  # (B, n, n)
    if bool((info != 0).any()):  # one sync; rare: retry the failures with a 1000x larger ridge
        chol2, _ = torch.linalg.cholesky_ex(A + 1e3 * rho * eye)
        chol = torch.where((info != 0)[:, None, None], chol2, chol)

    def solve(rhs):  # (B, n) -> (B, n)
        half = torch.linalg.solve_triangular(chol, rhs.unsqueeze(-1), upper=False)
        return torch.linalg.solve_triangular(chol.mT, half, upper=True).squeeze(-1)

    x = solve(r)
    for _ in range(REFINE_STEPS):  # iterated Tikhonov: removes the ridge where A's eigenvalues exceed rho
        x = x + solve(r - bmv(A, x))
    resid = (bmv(A, x) - r).abs().amax(-1)  # (B,)
    scale = A.abs().amax((-2, -1)) * x.abs().amax(-1) + r.abs().amax(-1)  # (B,)
    return a * x, resid / scale.clamp_min(torch.finfo(K.dtype).tiny)


def project_batched(K, b, c, method: str, *, max_iter=None, tol=None, trace=False, polish=True,
                    validate="cheap", **params) -> Direction:
    """Solve B projections at once; see the module docstring. Parameters: scalars or (B,) tensors.

    max_iter, tol: iteration limit and certificate tolerance of the iterative methods (simplex,
    capped_simplex, cone; tol also for subspace). trace=True stores info["history"] (T, B), the
    certificate after each iteration (with the polish, the row of a check holds the polished certificate);
    polish=False turns off the active-set polish (to study FISTA alone).
    validate: "cheap" (O(B n^2), default) or "full" (the eigenvalue test of check_gram).
    """
    check_solver_options(max_iter, tol)
    K, b, c = check_batch(K, b, c, validate)
    B, n = b.shape
    p = check_batch_params(method, params, B, n, b)
    dtype, device = b.dtype, b.device
    zeros = torch.zeros(B, dtype=dtype, device=device)
    alpha = zeros.clone()
    info = {"method": method, "solver": "batched", "converged": torch.ones(B, dtype=torch.bool, device=device),
            "iterations": torch.zeros(B, dtype=torch.long, device=device), "certificate": zeros.clone(),
            "certificate_kind": "closed_form"}
    uniform = torch.full((B, n), 1.0 / n, dtype=dtype, device=device)
    # inference mode: no autograd bookkeeping per tensor operation (about 10 % of the iterative solvers'
    # time on a CPU core, where the time is the count of small operations); outputs are cloned into
    # ordinary tensors below, so callers may use them anywhere, autograd included
    with torch.inference_mode():
        if method == "target":  # eq. (1): alpha = 1, w = 0
            alpha, w = torch.ones_like(alpha), torch.zeros_like(b)
        elif method == "mean":
            w = uniform
        elif method == "mix":
            alpha = p["lam"]
            w = (1.0 - alpha).unsqueeze(-1) * uniform
        elif method == "ball":  # eq. (2): d = t g_T + (1 - t) mean, t = min(1, radius / ||g_T - mean||)
            dist2 = (c - 2.0 * b.mean(-1) + K.sum((-2, -1)) / n**2).clamp_min(0.0)  # (B,)
            dist = dist2.sqrt()
            alpha = torch.where(dist > p["radius"], p["radius"] / dist.clamp_min(torch.finfo(dtype).tiny), 1.0)
            w = (1.0 - alpha).unsqueeze(-1) * uniform
            info["certificate"] = ((alpha * dist - p["radius"]).clamp_min(0.0)
                                   / torch.maximum(p["radius"], dist).clamp_min(torch.finfo(dtype).tiny))
            info["certificate_kind"] = "ball_violation_relative"
        elif method == "topk":  # eq. (8): the LP vertex; certificate = LP gap (max over the set - b^T w)
            w = topk_vertex(b, p["k"])
            lp = (b * w).sum(-1)
            cap = 1.0 / p["k"].to(dtype)
            info["certificate"] = (-lmo_value(-b, cap) - lp) / b.abs().amax(-1).clamp_min(torch.finfo(dtype).tiny)
            info["certificate_kind"] = "lp_gap_relative"
            info["program_value"] = lp
        elif method == "softmax":  # eq. (3): w = softmax(b / tau); certificate = entropic duality gap
            tau = p["tau"].unsqueeze(-1)  # (B, 1)
            b_max = b.amax(-1, keepdim=True)  # (B, 1)
            s = (b - b_max) / tau  # (B, n) shifted: b / tau itself overflows for a tiny tau (then -inf here)
            w = torch.softmax(s, dim=-1)
            primal = (b * w).sum(-1) - tau.squeeze(-1) * torch.xlogy(w, n * w).sum(-1)
            dual = b_max.squeeze(-1) + tau.squeeze(-1) * (torch.logsumexp(s, dim=-1) - math.log(n))
            info["certificate"] = (dual - primal).abs() / (b.abs().amax(-1) + tau.squeeze(-1))
            info["certificate_kind"] = "entropic_duality_gap_relative"
            info["program_value"] = primal
        elif method in ("simplex", "capped_simplex", "cone"):
            cap = {"simplex": torch.ones(B, dtype=dtype, device=device), "cone": None}.get(method)
            if method == "capped_simplex":
                cap = 1.0 / p["k"]
            max_iter = DEFAULT_MAX_ITER if max_iter is None else int(max_iter)
            tol = DEFAULT_TOL[dtype] if tol is None else float(tol)
            res = solve_qp(K, b, cap, c=c, max_iter=max_iter, tol=tol, use_polish=polish, trace=trace)
            w = res.w
            info.update(converged=res.converged, iterations=res.iterations, certificate=res.certificate,
                        certificate_kind=res.certificate_kind)
            if trace:
                info["history"] = res.history
            warn_not_converged(method, res.converged, res.certificate, tol, max_iter, res.certificate_kind)
        else:  # subspace, eq. (14)
            ridge = p["ridge"]
            tol = SUBSPACE_TOL[dtype] if tol is None else float(tol)
            w, resid = _solve_subspace(K, b, ridge)
            info.update(certificate=resid, certificate_kind="kkt_residual_relative", converged=resid <= tol,
                        iterations=torch.full((B,), 1 + REFINE_STEPS, dtype=torch.long, device=device))
            penalty = 0.5 * ridge * ((w - uniform) ** 2).sum(-1)  # (B,) the ridge term of the program
            info["program_value"] = gram_objective_batched(K, b, c, zeros, w) + penalty
            warn_not_converged(method, info["converged"], resid, tol, 1 + REFINE_STEPS, "kkt_residual_relative")
        objective = gram_objective_batched(K, b, c, alpha, w)
        info.setdefault("program_value", objective)
    info = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in info.items()}
    return Direction(alpha=alpha.clone(), weights=w.clone(), objective=objective.clone(), info=info)

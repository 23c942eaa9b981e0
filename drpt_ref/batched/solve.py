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
import warnings

import torch

from drpt_ref.batched.checks import cheap_flags, check_batch, check_batch_params, warn_not_converged
from drpt_ref.batched.polish import bmv
from drpt_ref.batched.projections import lmo_value, topk_vertex
from drpt_ref.batched.qp import DEFAULT_MAX_ITER, DEFAULT_TOL, fista_step, solve_qp
from drpt_ref.core.certificate import (
    ITERATIVE,
    accurate_objective,
    accurate_residual,
    certify,
    clean_weights,
    tolerances,
)
from drpt_ref.core.direction import Direction
from drpt_ref.core.methods import check_solver_options
from drpt_ref.core.project import project

# eq. (14): ridge of the subspace Cholesky relative to the Jacobi-scaled K (unit diagonal), removed
# again by REFINE_STEPS steps of iterative refinement; see theory/batched_solvers.md, section 4.
SUBSPACE_RIDGE = {torch.float64: 1e-13, torch.float32: 1e-6}
REFINE_STEPS = 3


def gram_objective_batched(K, b, c, alpha, w, residual=accurate_residual):
    """Eq. (2) for a batch, in twice float64's precision, never negative (core/certificate.accurate_objective).

    (B, n, n), (B, n), (B,), (B,), (B, n) -> (B,) in K's dtype; residual: accurate_residual or compiled.py's copy
    """
    return accurate_objective(K, b, c, alpha, w, residual).to(K.dtype)


def _solve_subspace(K, b, ridge, sync_free: bool = False):
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
    if sync_free or bool((info != 0).any()):  # one sync (sync-free: always); rare: retry with a 1000x larger ridge
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


def _certify_and_repair(K, b, c, method, p, w, info, repair=True, warn=True, sync_free=False,
                        residual=accurate_residual):
    """Clean w onto the set, certify every problem on (K, b, c) as given (core/certificate.py); re-solve the
    problems that fail with the exact solver in float64 and keep whichever answer certifies better.
    Fills info (converged, certificate, certificate_kind, feasibility, repaired); returns w (B, n).
    residual: accurate_residual, or its compiled copy (compiled.py)."""
    cap = {"simplex": torch.ones_like(c), "capped_simplex": 1.0 / p["k"] if "k" in p else None}.get(method)
    ridge = p.get("ridge")
    w = clean_weights(method, w, cap, diag=K.diagonal(dim1=-2, dim2=-1))
    cert = certify(K, b, c, method, w, cap=cap, ridge=ridge, dtype=K.dtype, sync_free=sync_free, residual=residual)
    failed = (~cert["passed"]).nonzero().flatten().tolist() if repair else []  # one host read
    for i in failed:  # the exact rung of the ladder, one problem at a time (rare: degenerate data)
        params = {"k": float(p["k"][i])} if method == "capped_simplex" else (
            {"ridge": float(ridge[i])} if method == "subspace" else {})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exact = project(K[i].cpu(), b[i].cpu(), c[i].cpu(), method, **params)  # checked in the input's dtype
        w_i = torch.as_tensor(exact.weights, dtype=w.dtype, device=w.device).unsqueeze(0)  # (1, n)
        w_i = clean_weights(method, w_i, None if cap is None else cap[i:i + 1],
                            diag=K[i:i + 1].diagonal(dim1=-2, dim2=-1))
        one = certify(K[i:i + 1], b[i:i + 1], c[i:i + 1], method, w_i, cap=None if cap is None else cap[i:i + 1],
                      ridge=None if ridge is None else ridge[i:i + 1], dtype=K.dtype)
        if bool(one["passed"][0]) or not float(cert["certificate"][i]) <= float(one["certificate"][0]):  # NaN loses
            w[i] = w_i[0]
            for key in ("passed", "certificate", "feasibility", "objective"):
                cert[key][i] = one[key][0]
    info["_objective"] = cert["objective"]  # eq. (2) at the returned w, already computed (Dot2) by the certificate
    info.update(converged=cert["passed"], certificate=cert["certificate"].to(K.dtype),
                certificate_kind=cert["certificate_kind"], feasibility=cert["feasibility"].to(K.dtype),
                repaired=torch.zeros_like(cert["passed"]).index_fill_(
                    0, torch.tensor(failed, dtype=torch.long, device=w.device), True))
    if not warn:  # sync-free: the caller reads info["converged"]
        return w
    tol = tolerances(K.dtype)[0]
    warn_not_converged(method, cert["passed"], cert["certificate"], tol, info["iterations"].max().item(),
                       cert["certificate_kind"], repaired=repair)
    return w


def project_batched(K, b, c, method: str, *, max_iter=None, tol=None, trace=False, polish=True,
                    validate="cheap", repair=True, sync_free=False, compiled=False, **params) -> Direction:
    """Solve B projections at once; see the module docstring. Parameters: scalars or (B,) tensors.

    max_iter, tol: iteration limit and certificate tolerance of the iterative methods (simplex,
    capped_simplex, cone; tol also for subspace). trace=True stores info["history"] (T, B), the
    certificate after each iteration (with the polish, the row of a check holds the polished certificate);
    polish=False turns off the active-set polish (to study FISTA alone).
    validate: "cheap" (O(B n^2), default) or "full" (the eigenvalue test of check_gram).
    repair: simplex, capped_simplex, cone and subspace are certified on (K, b, c) as given after the solve
    (core/certificate.py); True re-solves the problems that fail with the exact solver (`project`, float64,
    one at a time) and keeps the better certified answer; False reports them as not converged.
    info["converged"] (B,) is the certificate's verdict; info["repaired"] (B,) marks the re-solved problems.
    sync_free=True (the Dr step, theory/step_cost.md section 4): no host read inside for the closed forms, simplex
    and capped_simplex: the input checks are registered in the caller's `drpt_ref.deferred` scope (read at once
    outside one), the QP runs one fixed schedule (`solve_qp(sync_free=True)`), and nothing is repaired or warned:
    the certificate is still computed on (K, b, c) as given, and the caller reads info["converged"] once and
    re-solves what failed (with sync_free=False).
    compiled=True: the input checks, the float32 scout iterations and the certificate's Dot2 residual run
    torch.compile'd (batched/compiled.py; CUDA graphs on CUDA, untested); with sync_free=True the QP's whole schedule
    runs as one compiled graph (simplex, capped_simplex, cone; not with trace=True or polish=False). On a CPU the
    checks and the certificate are bitwise the eager ones (tested; on CUDA, Triton may fuse multiply-adds: not
    shown); the scout's and the whole QP's paths differ by round-off. The first call per (B, n) compiles (seconds;
    the whole QP minutes); if compiling fails the eager functions run, with a RuntimeWarning. Default False: the
    eager reference.
    Raises ValueError naming the argument for bad input (shapes, dtype, NaN/inf, meta tensors, a K or b, c
    that cannot come from one G and g_T, parameters outside their range or the dtype's).
    """
    check_solver_options(max_iter, tol)
    if not isinstance(compiled, bool):  # a truthy string ("False") would otherwise compile
        raise ValueError(f"compiled={compiled!r} must be True (torch.compile'd kernels) or False (the eager "
                         "reference).")
    # the checks, the scout step and the two Dot2 residuals: the eager ones (the reference) or compiled.py's copies
    flags_fn, scout_step, residual, objective_residual = cheap_flags, fista_step, accurate_residual, accurate_residual
    whole_qp = None  # sync-free and compiled: the QP's whole schedule as one compiled graph (compiled.py)
    if compiled:  # imported here: torch.compile's machinery loads only when asked for
        from drpt_ref.batched.compiled import compiled_kernels

        k = compiled_kernels(K.device if isinstance(K, torch.Tensor) else "cpu")
        flags_fn, scout_step, residual, objective_residual = k.flags, k.scout_step, k.residual, k.objective_residual
        whole_qp = k.sync_free_qp if sync_free and polish and not trace else None
    K, b, c = check_batch(K, b, c, validate, flags_fn=flags_fn)
    B, n = b.shape
    p = check_batch_params(method, params, B, n, b)
    dtype, device = b.dtype, b.device
    zeros = torch.zeros(B, dtype=dtype, device=device)
    alpha = zeros.clone()
    info = {"method": method, "solver": "batched", "converged": torch.ones(B, dtype=torch.bool, device=device),
            "iterations": torch.zeros(B, dtype=torch.long, device=device), "certificate": zeros.clone(),
            "certificate_kind": "closed_form"}
    # inference mode: no autograd bookkeeping per tensor operation (about 10 % of the iterative solvers'
    # time on a CPU core, where the time is the count of small operations); outputs are cloned into
    # ordinary tensors below, so callers may use them anywhere, autograd included
    with torch.inference_mode():
        uniform = torch.full((B, n), 1.0 / n, dtype=dtype, device=device)  # (B, n) an inference tensor like every w
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
            # in float64 (a closed form: cheap), with tau as given: a tau below float32's range is top-1, not 0/0
            tau = p["tau64"].unsqueeze(-1)  # (B, 1)
            b64 = b.double()  # (B, n)
            b_max = b64.amax(-1, keepdim=True)  # (B, 1)
            s = (b64 - b_max) / tau  # (B, n) shifted: b / tau itself overflows for a tiny tau (then -inf here)
            w64 = torch.softmax(s, dim=-1)
            primal = (b64 * w64).sum(-1) - tau.squeeze(-1) * torch.xlogy(w64, n * w64).sum(-1)
            dual = b_max.squeeze(-1) + tau.squeeze(-1) * (torch.logsumexp(s, dim=-1) - math.log(n))
            info["certificate"] = ((dual - primal).abs() / (b64.abs().amax(-1) + tau.squeeze(-1))).to(dtype)
            info["certificate_kind"] = "entropic_duality_gap_relative"
            info["program_value"] = primal.to(dtype)
            w = w64.to(dtype)
        elif method in ("simplex", "capped_simplex", "cone"):
            cap = {"simplex": torch.ones(B, dtype=dtype, device=device), "cone": None}.get(method)
            if method == "capped_simplex":
                cap = 1.0 / p["k"]
            max_iter = DEFAULT_MAX_ITER if max_iter is None else int(max_iter)
            tol = DEFAULT_TOL[dtype] if tol is None else float(tol)
            if whole_qp is not None:  # the same schedule, compiled whole (compiled.py)
                res = whole_qp(K, b, c, cap, method == "simplex", max_iter, tol)
            else:
                res = solve_qp(K, b, cap, c=c, max_iter=max_iter, tol=tol, use_polish=polish, trace=trace,
                               uncapped=(method == "simplex") if sync_free else None, sync_free=sync_free,
                               scout_step=scout_step)
            w = res.w
            info.update(iterations=res.iterations)
            if trace:
                info["history"] = res.history
        else:  # subspace, eq. (14)
            ridge = p["ridge"]
            w, _ = _solve_subspace(K, b, ridge, sync_free)  # its residual is judged by the certificate below
            info.update(iterations=torch.full((B,), 1 + REFINE_STEPS, dtype=torch.long, device=device))
        if method in ITERATIVE:  # certified on the data as given; failures re-solved exactly (certificates.md)
            w = _certify_and_repair(K, b, c, method, p, w, info, repair and not sync_free, warn=not sync_free,
                                    sync_free=sync_free, residual=residual)
            objective = info.pop("_objective").to(dtype)  # alpha = 0: eq. (2) at w, computed by the certificate
        else:
            objective = gram_objective_batched(K, b, c, alpha, w, objective_residual)
        if method == "subspace":
            info["program_value"] = objective + 0.5 * p["ridge"] * ((w - uniform) ** 2).sum(-1)  # the ridge term
        info.setdefault("program_value", objective)
    info = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in info.items()}
    return Direction(alpha=alpha.clone(), weights=w.clone(), objective=objective.clone(), info=info)

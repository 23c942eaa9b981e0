"""The certificate of a projection: computed after every solve, on the caller's K, b, c as given.

Whatever a solver did inside (Jacobi scaling, a Gram factor, float32, a fallback), its answer w is
judged here, in float64 with error-free products and sums (so cancellation cannot hide an error),
against the program of its set (theory/certificates.md):

    feasibility    the set's constraints at w: w >= 0, w <= cap, 1^T w = 1            eq. (1)
    optimality     simplex, capped simplex: the Frank-Wolfe gap, a bound on f(w) - f*    eq. (2)
                   cone: the cosine KKT residual (dual feasibility, complementarity)     eq. (3)
                   subspace: the cosine residual of the normal equations (with ridge)    eq. (4)
    objective      f(w) = 1/2 w^T K w - b^T w + 1/2 c, never below 0                    eq. (5)

Each residual is divided by the size it is measured against, so it does not depend on the lengths of
the gradients: the gap by c + ||G w||^2; r_i = (K w - b)_i = <g_i, G w - g_T> by its bound
||g_i|| (sqrt(c) + ||G w||). Zero units (K_ii = 0) have r_i = 0 exactly. A weight stored in the
caller's dtype is off by one rounding, which moves r by up to eps (|K| |w|)_i: that much is allowed
on top of the tolerance (eq. (6)), and no more.

`converged`, as every solver reports it, means: the solver finished AND this certificate passed.

Shapes: K (B, n, n), b (B, n), c (B,), w (B, n), cap (B,) or None, ridge (B,) or None -> (B,) each.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Optimality tolerance by the input's dtype (relative, see above). float64: a right answer has residuals
# of a few hundred eps (1e-13); 1e-9 leaves four orders for ill-conditioned faces and refuses any wrong
# answer the data can show. float32: data and weights rounded to float32 (eps 6e-8) move the residuals
# by ~n eps, up to 1e-5 at n = 256; 1e-4 is what the batched float32 solver can always reach.
CERT_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
# Feasibility of the weights after the solver's last rounding (bounds and sum, relative to the cap):
# weights are moved onto the set (clean_weights), so only the round-off of a sum of n entries remains.
FEAS_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
ITERATIVE = ("simplex", "capped_simplex", "cone", "subspace")  # the methods certified here
_SPLIT = 134217729.0  # 2^27 + 1, Dekker's splitter for float64


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(CERT_TOL, FEAS_TOL) of an input dtype; half precisions get float32's."""
    key = dtype if dtype in CERT_TOL else torch.float32
    return CERT_TOL[key], FEAS_TOL[key]


# ---- error-free arithmetic (Dekker, Knuth; the Dot2 of Ogita, Rump and Oishi) --------------------------------

def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _two_prod(a, b):
    p = a * b
    ca, cb = _SPLIT * a, _SPLIT * b
    ah, bh = ca - (ca - a), cb - (cb - b)
    al, bl = a - ah, b - bh
    return p, al * bl - (((p - ah * bh) - al * bh) - ah * bl)


def _sum2(x: torch.Tensor, err: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
    """sum over the last dim of x + err (+ last) as if in twice the precision: TwoSum by halves, errors summed plainly.

    Each level adds the two halves of x pairwise by TwoSum, and their errors ride along the same tree (a pair's error
    = the sum of its halves' errors + the new one): every operation is elementwise, in a fixed order, on contiguous
    halves. No reduction is left whose order the library (or a compiler, batched/compiled.py) would choose, so the
    result is bitwise the same wherever IEEE arithmetic is. A zero appended to an odd level changes nothing
    (TwoSum(x, 0) = (x, 0)); `last` (...) is one more term, added by TwoSum at the end.
    x (..., m), err (..., k <= m), last (...) or None -> (...)
    """
    if err.shape[-1] < x.shape[-1]:
        err = torch.cat([err, torch.zeros_like(x[..., err.shape[-1]:])], -1)  # (..., m) aligned with x
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x, err = (torch.cat([v, torch.zeros_like(v[..., :1])], -1) for v in (x, err))
        h = x.shape[-1] // 2
        x, e = _two_sum(x[..., :h], x[..., h:])  # (..., h) each
        err = (err[..., :h] + err[..., h:]) + e
    s, err = x[..., 0], err[..., 0]
    if last is not None:
        s, e = _two_sum(s, last)
        err = err + e
    return s + err


def accurate_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) with about twice float64's precision (Dot2). (..., k), (..., k) -> (...)"""
    p, e = _two_prod(a, b)
    return _sum2(p, e)


def accurate_residual(K, b, w) -> torch.Tensor:
    """r = K w - b, each entry as if in twice float64's precision. (B, n, n), (B, n), (B, n) -> (B, n)"""
    p, e = _two_prod(K, w.unsqueeze(-2))  # (B, n, n)
    return _sum2(p, e, -b)


def accurate_objective(K, b, c, alpha, w, residual=accurate_residual) -> torch.Tensor:
    """Eq. (2) of theory/notation.md, 1/2 ||alpha g_T + G w - g_T||^2, in Dot2 precision and never below 0.

    = 1/2 (w^T (K w - beta b) - beta b^T w + beta^2 c), beta = 1 - alpha; the terms of a large w cancel
    to a small objective, which plain float64 can turn negative. (B, n, n), (B, n), (B,), (B,), (B, n) -> (B,)
    residual: accurate_residual or its compiled copy (batched/compiled.py), bitwise the same.
    """
    K, b, c, alpha, w = (x.to(torch.float64) for x in (K, b, c, alpha, w))
    beta = 1.0 - alpha  # (B,)
    bb = beta.unsqueeze(-1) * b  # (B, n)
    return _objective_from_residual(residual(K, bb, w), bb, beta * beta * c, w)


def _objective_from_residual(r, bb, beta2c, w) -> torch.Tensor:
    """1/2 (w^T r - bb^T w + beta^2 c) in Dot2 precision, never below 0, given r = K w - bb. -> (B,)"""
    p_wr, e_wr = _two_prod(w, r)  # (B, n)
    p_bw, e_bw = _two_prod(bb, w)  # (B, n)
    terms = torch.cat([p_wr, -p_bw, beta2c.unsqueeze(-1)], -1)
    return (0.5 * _sum2(terms, torch.cat([e_wr, -e_bw], -1))).clamp_min(0.0)


# ---- the set, and the certificate --------------------------------------------------------------------------

def clean_weights(method: str, w: torch.Tensor, cap: torch.Tensor | None = None,
                  diag: torch.Tensor | None = None) -> torch.Tensor:
    """Move a solver's weights onto the set (up to the dtype's round-off), eq. (1).

    cone: w >= 0. simplex and capped simplex: clip to [0, cap], then spread the missing (or surplus)
    mass over the room each weight has left, proportionally, which keeps every bound. cone and subspace,
    given diag = K_ii: a zero unit adds nothing to the set, so its weight is 0 (in the simplex it absorbs
    mass and is kept). w (B, n), cap (B,), diag (B, n) -> (B, n)
    """
    if method in ("cone", "subspace") and diag is not None:
        w = torch.where(diag > 0, w, torch.zeros_like(w))
    if method == "cone":
        return w.clamp_min(0.0)
    if method not in ("simplex", "capped_simplex"):
        return w
    u = (torch.ones_like(w[:, 0]) if cap is None else cap.to(w.dtype)).unsqueeze(-1)  # (B, 1)
    w = torch.minimum(w.clamp_min(0.0), u)  # (B, n)
    short = 1.0 - w.sum(-1, keepdim=True)  # (B, 1) > 0: mass to add, < 0: to remove
    room = torch.where(short > 0, u - w, w)  # (B, n) how far each weight may move that way
    total = room.sum(-1, keepdim=True)  # (B, 1)
    move = torch.where(total > 0, short / total.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(total))
    return torch.minimum((w + move * room).clamp_min(0.0), u)


def lmo(r: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """argmin over the capped simplex of r^T s: cap on the smallest entries of r, the remainder next.

    r (B, n), cap (B,) -> s (B, n)
    """
    order = torch.argsort(r, dim=-1, stable=True)  # (B, n)
    full = torch.floor(1.0 / cap + 1e-12).unsqueeze(-1)  # (B, 1) entries that get the whole cap
    rank = torch.arange(r.shape[-1], device=r.device, dtype=r.dtype).expand_as(r)  # (B, n)
    rest = (1.0 - full * cap.unsqueeze(-1)).clamp_min(0.0)  # (B, 1)
    sorted_s = torch.where(rank < full, cap.unsqueeze(-1), torch.where(rank == full, rest, torch.zeros_like(r)))
    return torch.zeros_like(r).scatter(-1, order, sorted_s)


def _power_of_two_scale(K, c) -> torch.Tensor:
    """(B,) a power of two near max(max_i K_ii, c): dividing by it is exact and keeps products in range."""
    s = torch.maximum(K.diagonal(dim1=-2, dim2=-1).amax(-1), c)  # (B,)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.exp2(torch.round(torch.log2(s)))


def _support_gap(K, r, one_ulp, support, eps: float, sync_free: bool = False) -> torch.Tensor:
    """1/2 r_S^T (K_SS + mu I)^(-1) r_S in Jacobi-scaled form, less what rounding w alone would cause (eq. (3')).

    K (B, n, n), r (B, n), one_ulp (B, n), support (B, n) bool -> (B,). mu = max(1e-14 max(n, 10), 4 n eps) times
    lambda_max of the scaled K_SS (its round-off, notation.md eq. (6), in the caller's dtype): a part of r outside
    range(K_SS) counts ||r_null||^2 / mu.
    """
    B, n = r.shape
    d = K.diagonal(dim1=-2, dim2=-1)  # (B, n)
    live = support & (d > 0)  # (B, n)
    a = torch.where(live, d.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(d))  # (B, n)
    Ks = K * a.unsqueeze(-1) * a.unsqueeze(-2)  # (B, n, n) unit diagonal on the support, 0 off it
    mu = max(1e-14 * max(n, 10), 4 * n * eps) * Ks.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1.0)  # (B,)
    L, bad = None, None
    for _ in range(6):  # round-off of the data may leave Ks + mu I indefinite: a larger shift, a smaller (safe) gap
        A = Ks + torch.where(live, mu.unsqueeze(-1), torch.ones_like(d)).diag_embed()  # (B, n, n)
        L_try, bad_try = torch.linalg.cholesky_ex(A)
        L = L_try if L is None else torch.where((bad != 0)[:, None, None], L_try, L)
        bad = bad_try if bad is None else torch.where(bad != 0, bad_try, bad)
        if not sync_free and not bool((bad != 0).any()):  # sync-free: every shift runs (each only where bad)
            break
        mu = torch.where(bad != 0, mu * 1e3, mu)
    L = torch.where((bad != 0)[:, None, None], torch.eye(n, dtype=K.dtype, device=K.device) / mu.sqrt()[:, None, None]
                    * 1e3, L)  # never factored: the gap counts as (almost) nothing, the cosine test decides

    def quad(v):  # 1/2 v^T A^(-1) v, (B, n) -> (B,)
        y = torch.linalg.solve_triangular(L, v.unsqueeze(-1), upper=False).squeeze(-1)
        return 0.5 * (y * y).sum(-1)

    return (quad(a * r) - quad(a * one_ulp)).clamp_min(0.0)


def certify(K, b, c, method: str, w, *, cap=None, ridge=None, dtype=torch.float64, sync_free=False,
            residual=accurate_residual) -> dict:
    """Certificate of weights w for the program of `method` on (K, b, c) as given; see the module docstring.

    K (B, n, n), b (B, n), c (B,), w (B, n): tensors of any float dtype and device (read in float64);
    cap (B,) for the capped simplex (None: 1, the simplex); ridge (B,) for the subspace (None: 0).
    dtype: the caller's dtype, which sets the tolerances.
    Returns (B,) tensors: objective (eq. (5), in the caller's units), feasibility (eq. (1)),
    certificate (eq. (2), (3) or (4)), passed (bool); and certificate_kind.
    Raises ValueError for a method without an iterative program. sync_free: no host read (the support gap of eq.
    (3') is applied per problem where ridge = 0, every Cholesky shift is tried). residual: the function that computes
    accurate_residual (batched/compiled.py passes its compiled copy, bitwise the same; theory/batched_solvers.md).
    """
    if method not in ("simplex", "capped_simplex", "cone", "subspace"):
        raise ValueError(f"method={method!r} has no iterative program to certify.")
    K, b, c, w = (x.to(torch.float64) for x in (K, b, c, w))
    scale = _power_of_two_scale(K, c)  # (B,) exact rescaling: every residual below is scale-free
    K, b, c = K / scale[:, None, None], b / scale[:, None], c / scale
    cert_tol, feas_tol = tolerances(dtype)
    eps = torch.finfo(dtype if dtype in CERT_TOL else torch.float32).eps  # weights and data are stored in dtype
    r = residual(K, b, w)  # (B, n) gradient of f, r_i = <g_i, G w - g_T> (accurate_residual)
    wr, bw = accurate_dot(w, r), accurate_dot(b, w)  # (B,) w^T K w - b^T w, b^T w
    wKw = (wr + bw).clamp_min(0.0)  # (B,) ||G w||^2
    objective = _objective_from_residual(r, b, c, w)  # (B,) eq. (5), from the same r
    one_ulp = eps * (K.abs() @ w.abs().unsqueeze(-1)).squeeze(-1)  # (B, n) r moved by rounding w, eq. (6)
    # L(w) = (sum_i |w_i| ||g_i||)^2: a Gram matrix carries errors of eps ||g_i|| ||g_j|| per entry, so f is not
    # defined more finely than eps (c + L(w)) (eq. (6))
    lengths = (w.abs() * K.diagonal(dim1=-2, dim2=-1).clamp_min(0.0).sqrt()).sum(-1) ** 2  # (B,)
    # the size the gaps are measured against: c; when g_T = 0 exactly (a GRPO batch whose target groups all have
    # equal rewards) there is no target length, and the longest unit, max_i K_ii, sets the scale (eq. (2))
    target_scale = torch.where(c > 0, c, K.diagonal(dim1=-2, dim2=-1).amax(-1))  # (B,)
    feas = torch.zeros_like(c)
    if method in ("simplex", "capped_simplex"):
        u = torch.ones_like(c) if cap is None else cap.to(torch.float64)  # (B,)
        feas = torch.stack([(-w).amax(-1), (w - u.unsqueeze(-1)).amax(-1), (w.sum(-1) - 1.0).abs()]).amax(0) / u
        step = w - lmo(r, u)  # (B, n)
        gap = accurate_dot(r, step)  # (B,) >= f(w) - f*, eq. (2)
        # eq. (6): the gap moved by rounding w, and the resolution of f in the Gram form itself
        floor = (one_ulp * step.abs()).sum(-1) + eps * (r.abs() * w.abs()).sum(-1) + 8 * eps * (c + lengths)
        gap = torch.minimum(gap, objective)  # f* >= 0, so f(w) itself also bounds f(w) - f* (eq. (2'))
        cert = (gap - floor).clamp_min(0.0) / (target_scale + wKw).clamp_min(torch.finfo(torch.float64).tiny)
        kind = "frank_wolfe_gap_relative"
    else:
        # eqs. (3)-(4): |r_i| <= ||g_i|| ||G w - g_T|| <= sqrt(K_ii) (sqrt(c) + ||G w||)
        norm = K.diagonal(dim1=-2, dim2=-1).clamp_min(0.0).sqrt() * (c.clamp_min(0.0).sqrt()
                                                                       + wKw.sqrt()).unsqueeze(-1)  # (B, n)
        if method == "cone":
            feas = (-w).amax(-1).clamp_min(0.0) / w.abs().amax(-1).clamp_min(1.0)
            viol = torch.where(w > 0, r.abs(), (-r).clamp_min(0.0))  # (B, n) r >= 0; r_i = 0 where w_i > 0
            kind = "kkt_cosine_and_support_gap"
        else:
            rho = torch.zeros_like(c) if ridge is None else ridge.to(torch.float64) / scale  # (B,)
            n = w.shape[-1]
            viol = (r + rho.unsqueeze(-1) * (w - 1.0 / n)).abs()  # (B, n) eq. (4): the ridge pulls toward 1/n
            norm = norm + rho.unsqueeze(-1) * (w.abs() + 1.0 / n)
            kind = "normal_equations_cosine_and_gap"
        viol = (viol - one_ulp).clamp_min(0.0)  # (B, n) eq. (6)
        cert = torch.where(viol > 0, viol / norm.clamp_min(torch.finfo(torch.float64).tiny),
                           torch.zeros_like(viol)).amax(-1)  # (B,) 0 / 0 (a zero unit) counts as 0
        no_ridge = ridge is None or sync_free or not bool((ridge > 0).any())
        if no_ridge:
            # eq. (3'): the cosine test is blind to a residual along a nearly dependent pair of units; the
            # stationarity gap on the support, 1/2 r_S^T (K_SS + mu I)^(-1) r_S, is not (and it reads a part of
            # r outside range(K_SS), where K has lost a direction b still sees, as a large gap)
            support = w > 0 if method == "cone" else torch.ones_like(w, dtype=torch.bool)
            gap = _support_gap(K, r, one_ulp, support, eps, sync_free)  # (B,)
            gap = (torch.minimum(gap, objective) - 8 * eps * (c + lengths)).clamp_min(0.0)  # eqs. (2'), (6)
            if ridge is not None:  # sync-free: only the problems without a ridge
                gap = torch.where(ridge.to(gap) > 0, torch.zeros_like(gap), gap)
            cert = torch.maximum(cert, gap / (target_scale + wKw).clamp_min(torch.finfo(torch.float64).tiny))
            if method == "cone":  # w = 0 is feasible: an answer worse than no update is never optimal
                worse = objective - 0.5 * c - 8 * eps * (c + lengths)  # (B,)
                cert = torch.where(worse > 0, torch.full_like(cert, float("inf")), cert)
    finite = torch.isfinite(w).all(-1) & torch.isfinite(cert) & torch.isfinite(objective)
    passed = finite & (cert <= cert_tol) & (feas <= feas_tol)
    return {"objective": objective * scale, "feasibility": feas, "certificate": cert, "passed": passed,
            "certificate_kind": kind}


def certify_one(K, b, c, method: str, w, *, cap=None, ridge=None, dtype=torch.float64) -> dict:
    """`certify` for one problem given as float64 numpy arrays: K (n, n), b (n,), c, w (n,) -> floats and kind."""
    def t(x):
        return torch.as_tensor(np.asarray(x, dtype=np.float64)).unsqueeze(0)

    out = certify(t(K), t(b), t(c), method, t(w), cap=None if cap is None else t(cap),
                  ridge=None if ridge is None else t(ridge), dtype=dtype)
    return {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


def describe_failure(method: str, cert: float, feas: float, dtype: torch.dtype) -> str:
    """A one-line reason for a failed certificate, with the hint of what to try."""
    cert_tol, feas_tol = tolerances(dtype)
    parts = []
    if not math.isfinite(cert) or cert > cert_tol:
        parts.append(f"optimality residual {cert:.2e} > {cert_tol:.0e}")
    if feas > feas_tol:
        parts.append(f"infeasibility {feas:.2e} > {feas_tol:.0e}")
    return "; ".join(parts) or "non-finite weights"

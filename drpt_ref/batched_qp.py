"""Batched QP solver for the capped simplex, the simplex and the cone: FISTA with restarts + polish.

Solves B problems at once (theory/batched_solvers.md, section 3):

    minimize_w   f(w) = 1/2 w^T K w - b^T w                                     eq. (1)
    subject to   w in C_u = {0 <= w <= u, sum w = 1}   (capped simplex; u = 1: simplex)
            or   w in R^n_+                             (cone)

1. Scaling (eq. (9)): Jacobi variables w = a * z, a = diag(K)^(-1/2), so K^ = diag(a) K diag(a) has a
   unit diagonal; f is divided by L^ ~ lambda_max(K^) (power iteration), so every problem of the
   batch has the same step size 1.
2. Accelerated projected gradient (FISTA) with the gradient-based adaptive restart of
   O'Donoghue & Candes (eq. (10)); projections from `batched_projections` (exact, sort based).
3. At the start, and then every `check_every` iterations, polish steps (eq. (11)): on the free set
   F of the iterate (entries strictly inside their bounds) the proximal Newton step
       delta = argmin_{delta_F, a^T delta = 0} f(z + delta) + rho/2 ||delta||^2
   by a batched Cholesky of K^_FF + rho I (rho = POLISH_RIDGE, the only ridge; its effect on the
   objective is at most rho/2 ||delta*||^2 in scaled units, eq. (12)); of the projected full step
   and the step cut at the first bound, the better one is kept if f decreases. With the right free
   set the polish is exact, so singular K (many optimal w) costs nothing extra.
4. The certificate (eq. (13)) decides convergence, never the iteration count:
   simplex sets: min(Frank-Wolfe gap, f(w) + c/2 + round-off) / S, both upper bounds on f(w) - f*
   (eq. (13b)), S = max_i K_ii + ||b||_inf; cone: the relative Jacobi-scaled KKT residual.
   Converged problems leave the batch (one host sync per check); stragglers are reported.

Shapes:
    K (B, n, n), b (B, n), cap (B,) or None (cone)  ->  w (B, n), certificate (B,), converged (B,),
    iterations (B,); history (T, B) when trace=True (certificate of the iterate at each iteration)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drpt_ref.batched_projections import frank_wolfe_gap, project_capped_simplex, project_weighted_capped_simplex

# rho of eq. (11), relative to the scaled problem (lambda_max(K~) <= 1): large enough that the
# Cholesky of K~_FF + rho I succeeds when K~_FF is singular (its backward error is ~ n eps), small
# enough that its objective error rho/2 ||delta*||^2 (eq. (12)) is below the tolerance.
POLISH_RIDGE = {torch.float64: 1e-12, torch.float32: 1e-5}
# Default certificate tolerances (scaled units, eq. (13)): a few hundred times the round-off floor
# n * eps of evaluating the gradient (theory/batched_solvers.md, section 5).
DEFAULT_TOL = {torch.float64: 1e-11, torch.float32: 2e-5}
DEFAULT_MAX_ITER = 5000
POWER_ITERATIONS = 15
DIAG_FLOOR = 1e-20  # zero columns of G (K_ii = 0) get a_i = (1e-20 max K_ii)^(-1/2): any weight, no effect
POLISH_ROUNDS = 3  # projected Newton rounds from the start point (then polish_rounds per check): each may fix
# the free set found by the last
STEP_SAFETY = 1.25  # L = 1.25 * Rayleigh quotient after POWER_ITERATIONS, capped by the trace


@dataclass
class QPResult:
    w: torch.Tensor  # (B, n)
    certificate: torch.Tensor  # (B,)
    converged: torch.Tensor  # (B,) bool
    iterations: torch.Tensor  # (B,) int
    certificate_kind: str
    history: torch.Tensor | None = None  # (T, B)


def bmv(K: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Batched product K x for symmetric K, computed as x^T K (3x faster on CPU). (B, n, n), (B, n) -> (B, n)."""
    return (x.unsqueeze(-2) @ K).squeeze(-2)


def lambda_max_upper(K: torch.Tensor) -> torch.Tensor:
    """An estimate of lambda_max(K) that errs upward: STEP_SAFETY * power iteration, <= trace, eq. (9)."""
    n = K.shape[-1]
    gen = torch.Generator(device=K.device).manual_seed(0)
    x = 1.0 + 0.1 * torch.rand(K.shape[:-1], generator=gen, device=K.device, dtype=K.dtype)  # (B, n)
    for _ in range(POWER_ITERATIONS):
        x = bmv(K, x)
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(K.dtype).tiny)
    rayleigh = (x * bmv(K, x)).sum(-1)  # (B,)
    trace = K.diagonal(dim1=-2, dim2=-1).sum(-1)  # (B,)
    return torch.minimum(STEP_SAFETY * rayleigh, trace).clamp_min(0.0) + 0 * n  # (B,)


class _Set:
    """The feasible set in Jacobi coordinates z = w / a (eq. (9)): {a^T z = 1, 0 <= z <= u / a} or z >= 0."""

    def __init__(self, a: torch.Tensor, cap: torch.Tensor | None):
        self.a, self.cap = a, cap  # (B, n) and (B,) or None for the cone
        self.h = None if cap is None else cap.unsqueeze(-1) / a  # (B, n) upper bounds on z

    def take(self, keep: torch.Tensor) -> _Set:
        return _Set(self.a[keep], None if self.cap is None else self.cap[keep])

    def project(self, v: torch.Tensor) -> torch.Tensor:
        if self.cap is None:
            return v.clamp_min(0.0)
        return project_weighted_capped_simplex(v, self.a, self.h)

    def certificate(self, g: torch.Tensor, z: torch.Tensor, b: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        """Eq. (13): FW gap in w times unit (simplex sets), or relative Jacobi-scaled KKT residual (cone). (B,)"""
        if self.cap is None:  # scaled problem: lambda_max = 1, so min(z, g) compares like with like
            resid = torch.minimum(z, g).abs().amax(-1)
            return resid / (b.abs().amax(-1) + z.abs().amax(-1)).clamp_min(torch.finfo(z.dtype).tiny)
        return unit * frank_wolfe_gap(g / self.a, z * self.a, self.cap).clamp_min(0.0)  # gradient in w is g / a

    def free(self, z: torch.Tensor) -> torch.Tensor:
        if self.cap is None:
            return z > 0
        return (z > 0) & (z < self.h)  # (B, n)


def _objective(K, b, z):
    return 0.5 * (z * bmv(K, z)).sum(-1) - (b * z).sum(-1)  # (B,)


def polish(K, b, z, feasible_set: _Set, rho: float) -> torch.Tensor:
    """Proximal Newton step on the free face, eq. (11); returns the projected candidate. (B, n)"""
    F = feasible_set.free(z)  # (B, n)
    Ff = F.to(K.dtype)
    g = bmv(K, z) - b  # (B, n)
    A = K * (Ff.unsqueeze(-1) * Ff.unsqueeze(-2))  # (B, n, n) K_FF, zero outside
    A.diagonal(dim1=-2, dim2=-1).add_(torch.where(F, rho, 1.0))  # + rho I on F, identity rows off F
    chol, info = torch.linalg.cholesky_ex(A)  # (B, n, n); a failed factor gives NaN, zeroed below
    ok = info == 0  # (B,)
    rhs = torch.stack([-g * Ff, feasible_set.a * Ff], dim=-1)  # (B, n, 2)
    half = torch.linalg.solve_triangular(chol, rhs, upper=False)  # (B, n, 2); cholesky_solve is slow on CPU
    sol = torch.linalg.solve_triangular(chol.mT, half, upper=True)  # (B, n, 2)
    a1, a2 = sol[..., 0] * Ff, sol[..., 1] * Ff  # (B, n)
    if feasible_set.cap is None:
        delta = a1
    else:  # the multiplier of a^T delta = 0
        denom = (feasible_set.a * a2).sum(-1, keepdim=True)  # (B, 1)
        num = (feasible_set.a * a1).sum(-1, keepdim=True)  # (B, 1)
        mu = torch.where(denom > 0, num / denom.clamp_min(torch.finfo(K.dtype).tiny), torch.zeros_like(denom))
        delta = a1 - mu * a2  # (B, n)
    delta = torch.where(ok.unsqueeze(-1) & torch.isfinite(delta), delta, torch.zeros_like(delta))
    # two candidates: the projection of the full step, and the step cut at the first bound it hits
    # (the classic active-set move: f decreases along delta up to 1, and >= 1 bound joins the active set)
    big = torch.full_like(z, float("inf"))
    to_zero = torch.where(delta < 0, z / (-delta), big)  # (B, n)
    to_cap = big if feasible_set.h is None else torch.where(delta > 0, (feasible_set.h - z) / delta, big)
    step = torch.minimum(to_zero, to_cap).amin(-1, keepdim=True).clamp(0.0, 1.0)  # (B, 1)
    cut = (z + step * delta).clamp_min(0.0)  # (B, n)
    if feasible_set.h is not None:
        cut = torch.minimum(cut, feasible_set.h)
    return feasible_set.project(z + delta), cut  # (B, n) each


def solve_qp(K, b, cap=None, *, c=None, max_iter=None, tol=None, check_every=10, use_polish=True,
             trace=False, polish_rounds=3) -> QPResult:
    """Minimize 1/2 w^T K w - b^T w over the capped simplex (cap (B,)) or the cone (cap None)."""
    B, n = b.shape
    dtype, device = b.dtype, b.device
    max_iter = DEFAULT_MAX_ITER if max_iter is None else int(max_iter)
    tol = DEFAULT_TOL.get(dtype, 2e-5) if tol is None else float(tol)
    rho = POLISH_RIDGE.get(dtype, 1e-5)
    tiny = torch.finfo(dtype).tiny

    # eq. (9): Jacobi scaling w = a z with a = diag(K)^(-1/2), then divide f by L = lambda_max(K^) (step 1)
    d = K.diagonal(dim1=-2, dim2=-1)  # (B, n)
    d_max = d.amax(-1, keepdim=True)  # (B, 1)
    d = torch.where(d_max > 0, torch.maximum(d, DIAG_FLOOR * d_max), torch.ones_like(d))
    a = d.rsqrt()  # (B, n)
    Kz, bz = K * (a.unsqueeze(-1) * a.unsqueeze(-2)), b * a  # (B, n, n), (B, n)
    L_hat = lambda_max_upper(Kz).clamp_min(tiny)  # (B,) <= trace = n
    Ks, bs = Kz / L_hat[:, None, None], bz / L_hat[:, None]  # (B, n, n), (B, n) f / L_hat in z
    Ls = torch.ones_like(L_hat)  # (B,) scaled Lipschitz constant
    # certificate units, eq. (13): FW gaps are reported relative to S = max_i K_ii + ||b||_inf (the
    # range of f over the simplex); cone residuals relative to ||b^||_inf + L^ ||z||_inf (set.certificate)
    S = (d_max.squeeze(-1) + b.abs().amax(-1)).clamp_min(tiny)  # (B,)
    cert_unit = L_hat / S if cap is not None else torch.ones_like(S)  # (B,)
    # eq. (13b): f(w) + 1/2 c = 1/2 ||G w - g_T||^2 >= 0 bounds f(w) - f* too; decisive when f* = 0
    # (g_T in the hull, or 0 in the hull of G), where the FW gap only falls like sqrt(f - f*)
    half_c = None if (c is None or cap is None) else 0.5 * c / S  # (B,) in units of S
    eps_n = 64 * n * torch.finfo(dtype).eps  # round-off margin of evaluating eq. (2)

    def certify(Kx, bx, z, unit, hc):
        g = bmv(Kx, z) - bx  # (A, n)
        cert = set_a.certificate(g, z, bx, unit)  # (A,) eq. (13)
        if hc is None:
            return cert
        quad, lin = 0.5 * (z * (g + bx)).sum(-1), (bx * z).sum(-1)  # (A,) 1/2 z^T K z and b^T z, scaled
        value = unit * (quad - lin) + hc + eps_n * (hc + unit * (quad.abs() + lin.abs()))  # (A,) eq. (13b)
        return torch.minimum(cert, value.clamp_min(0.0))
    full_set = _Set(a, cap)

    if cap is not None:  # start at uniform weights (feasible for every cap u >= 1/n)
        z = torch.full((B, n), 1.0 / n, dtype=dtype, device=device) / a  # (B, n)
    else:  # cone: one projected gradient step from 0, so the first polish sees the support of b^
        z = bs.clamp_min(0.0)  # (B, n)
    z_out = z.clone()
    cert_out = torch.full((B,), float("inf"), dtype=dtype, device=device)
    iters_out = torch.zeros(B, dtype=torch.long, device=device)
    history = [] if trace else None
    hist_row = cert_out.clone()

    active = torch.arange(B, device=device)
    Ka, ba, La, Ua, Ca, set_a = Ks, bs, Ls, cert_unit, half_c, full_set
    y, t = z.clone(), torch.ones(B, dtype=dtype, device=device)
    it = 0
    first = use_polish  # with the polish, start by Newton steps from the uniform point (often enough)
    while active.numel() > 0 and (it < max_iter or first):
        steps = 0 if first else min(check_every, max_iter - it)
        first, f_z = False, None
        for _ in range(steps):  # eq. (10): FISTA with gradient restart
            g = bmv(Ka, y) - ba  # (A, n)
            z_new = set_a.project(y - g / La.unsqueeze(-1))  # (A, n)
            restart = ((y - z_new) * (z_new - z)).sum(-1) > 0  # (A,)
            t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
            momentum = torch.where(restart, torch.zeros_like(t), (t - 1.0) / t_new)  # (A,)
            y = z_new + momentum.unsqueeze(-1) * (z_new - z)
            t = torch.where(restart, torch.ones_like(t), t_new)
            z = z_new
            if trace:
                hist_row[active] = certify(Ka, ba, z, Ua, Ca)
                history.append(hist_row.clone())
        it += steps
        for _ in range(0 if not use_polish else POLISH_ROUNDS if steps == 0 else polish_rounds):  # eq. (11)
            cand, cut = polish(Ka, ba, z, set_a, rho)
            f_cand, f_cut = _objective(Ka, ba, cand), _objective(Ka, ba, cut)  # (A,)
            cand = torch.where((f_cut < f_cand).unsqueeze(-1), cut, cand)
            f_cand = torch.minimum(f_cand, f_cut)
            f_z = _objective(Ka, ba, z) if f_z is None else f_z
            better = f_cand <= f_z  # (A,)
            f_z = torch.where(better, f_cand, f_z)
            z = torch.where(better.unsqueeze(-1), cand, z)
            y = torch.where(better.unsqueeze(-1), z, y)
            t = torch.where(better, torch.ones_like(t), t)
        cert = certify(Ka, ba, z, Ua, Ca)  # (A,) eq. (13)
        z_out[active], cert_out[active], iters_out[active] = z, cert, it
        if trace:  # the polished certificate replaces that of the last iteration (is row 0 at the start)
            hist_row[active] = cert
            if steps == 0:
                history.append(hist_row.clone())
            else:
                history[-1] = hist_row.clone()
        keep = ~(cert <= tol)  # (A,) NaN counts as not converged
        if not bool(keep.any()):  # the one host sync per check
            break
        if not bool(keep.all()):
            active, Ka, ba, La, Ua = active[keep], Ka[keep], ba[keep], La[keep], Ua[keep]
            Ca = None if Ca is None else Ca[keep]
            set_a = set_a.take(keep)
            z, y, t = z[keep], y[keep], t[keep]
    w = z_out * a  # (B, n) back to sample weights
    if cap is not None:  # re-project in w: a * z loses digits to cancellation when a spans decades (float32)
        w = project_capped_simplex(w, cap)  # moves w by ~ its infeasibility, so f by <= ||g|| * that
    else:
        w = w.clamp_min(0.0)
    kind = "kkt_residual_jacobi_scaled" if cap is None else "frank_wolfe_gap_scaled"
    hist = torch.stack(history) if trace and history else None
    return QPResult(w, cert_out, cert_out <= tol, iters_out, kind, hist)

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
3. After `first_check` and then every `check_every` iterations, the polish (eq. (11)): a batched
   primal active-set method started at the FISTA iterate. Each step solves the face of the free
   set F (entries strictly inside their bounds) by the proximal Newton step
       delta = argmin_{delta_F, a^T delta = 0} f(z + delta) + rho/2 ||delta||^2
   on the compact block K^_FF + rho I: the free indices are gathered into a (Bg, s_max) index tensor
   and problems are grouped by |F|, so a factorization costs O(|F|^3), not O(n^3) (eq. (11c));
   rho = POLISH_RIDGE is the only ridge, its effect on f is at most rho/2 ||delta*||^2 in scaled
   units (eq. (12)). The step goes as far as the bounds allow (or to a longer projected step if that
   is lower, eq. (11e)); after a full step, bounds whose reduced gradient points into the set are
   freed (eq. (11d)). f never increases; with the right free set one step is exact, so singular K
   (many optimal w) costs nothing extra.
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

from drpt_ref.batched_projections import (
    frank_wolfe_gap,
    project_capped_simplex,
    project_weighted_capped_simplex,
    project_weighted_simplex,
)

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
POLISH_ROUNDS = 1  # polishes per check, each certified (converged problems leave before the next)
FIRST_CHECK = 10  # FISTA iterations before the first polish and check (enough to find most faces)
CHECK_EVERY = 10  # FISTA iterations between later checks
GROUP_RATIO = 1.26  # face-size groups of eq. (11c): padding at most doubles a group's s^3 factorization cost
GROUP_SMALL = 24  # free sets up to this size share one group
LONG_STEPS = (1, 3, 7, 15, 31)  # 0-based breakpoints of the long steps of eq. (11e)
ACTIVE_SET_STEPS = 32  # most steps of the active-set method per polish, eq. (11d)
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


def lambda_max_upper(K: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """An estimate of lambda_max(diag(a) K diag(a)) that errs upward: STEP_SAFETY * power iteration,
    <= trace, eq. (9). The scaled matrix is applied as a * K (a * x), never formed. (B,)"""
    gen = torch.Generator(device=K.device).manual_seed(0)
    x = 1.0 + 0.1 * torch.rand(K.shape[:-1], generator=gen, device=K.device, dtype=K.dtype)  # (B, n)
    for _ in range(POWER_ITERATIONS):
        x = a * bmv(K, a * x)
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(K.dtype).tiny)
    rayleigh = (x * a * bmv(K, a * x)).sum(-1)  # (B,)
    trace = (a * a * K.diagonal(dim1=-2, dim2=-1)).sum(-1)  # (B,)
    return torch.minimum(STEP_SAFETY * rayleigh, trace).clamp_min(0.0)  # (B,)


class _Set:
    """The feasible set in Jacobi coordinates z = w / a (eq. (9)): {a^T z = 1, 0 <= z <= u / a} or z >= 0."""

    def __init__(self, a: torch.Tensor, cap: torch.Tensor | None, uncapped: bool = False):
        self.a, self.cap, self.uncapped = a, cap, uncapped  # (B, n) and (B,) or None for the cone
        self.h = None if cap is None else cap.unsqueeze(-1) / a  # (B, n) upper bounds on z

    def take(self, keep: torch.Tensor) -> _Set:
        return _Set(self.a[keep], None if self.cap is None else self.cap[keep], self.uncapped)

    def repeat(self, m: int) -> _Set:
        """The set of each problem m times in a row (for m candidates of one problem, flattened)."""
        return _Set(self.a.repeat_interleave(m, 0), None if self.cap is None else self.cap.repeat_interleave(m, 0),
                    self.uncapped)

    def project(self, v: torch.Tensor) -> torch.Tensor:
        if self.cap is None:
            return v.clamp_min(0.0)
        if self.uncapped:  # cap u >= 1: z_i <= u / a_i is implied by a^T z = 1, z >= 0
            return project_weighted_simplex(v, self.a)  # eq. (5'')
        return project_weighted_capped_simplex(v, self.a, self.h)

    def certificate(self, g: torch.Tensor, z: torch.Tensor, b: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        """Eq. (13): FW gap in w times unit (simplex sets), or relative Jacobi-scaled KKT residual (cone). (B,)"""
        if self.cap is None:  # scaled problem: lambda_max = 1, so min(z, g) compares like with like
            resid = torch.minimum(z, g).abs().amax(-1)
            return resid / (b.abs().amax(-1) + z.abs().amax(-1)).clamp_min(torch.finfo(z.dtype).tiny)
        return unit * frank_wolfe_gap(g / self.a, z * self.a, self.cap).clamp_min(0.0)  # gradient in w is g / a

    def free(self, z: torch.Tensor) -> torch.Tensor:
        if self.cap is None or self.uncapped:
            return z > 0
        return (z > 0) & (z < self.h)  # (B, n)


def _objective(K, b, z):
    return 0.5 * (z * bmv(K, z)).sum(-1) - (b * z).sum(-1)  # (B,)


def _groups(sizes: list[int]) -> list[list[int]]:
    """Problems sorted by free-set size, cut into groups whose padded size s_max is small (eq. (11c)).

    A group is padded to its largest member; a new group starts when the size exceeds GROUP_RATIO
    times the group's smallest (so padding at most doubles the O(s^3) factorization cost), sizes
    up to GROUP_SMALL share one group (their factorizations cost less than the launch overhead).
    Size 0 (the face is a point, e.g. a vertex of the capped simplex) needs no step and no group.
    """
    order = sorted((s, i) for i, s in enumerate(sizes) if s > 0)
    groups, first = [], 0
    for s, i in order:
        if not groups or s > max(GROUP_SMALL, GROUP_RATIO * first):
            groups.append([])
            first = s
        groups[-1].append(i)
    return groups


def face_step(K, g, feasible_set: _Set, F: torch.Tensor, rho: float, r_eq: torch.Tensor | None = None):
    """The proximal Newton step on the free face F, solved on the compact block K_FF, eq. (11)-(11c).

    delta = argmin { g^T delta + 1/2 delta^T (K_FF + rho I) delta : delta_i = 0 off F, a^T delta = r_eq }
    (no equality for the cone; r_eq = 0 unless given). For each group of problems (by |F|, `_groups`)
    the free indices are gathered into a (Bg, s_max) index tensor, K_FF + rho I (identity on the
    padding) is factored once by Cholesky and solved for two right-hand sides; the multiplier mu of
    the equality is in closed form, and delta is scattered back.
    K (A, n, n), g (A, n), F (A, n) bool, r_eq (A,) -> delta (A, n), mu (A,)
    """
    n = g.shape[-1]
    sizes = F.sum(-1)  # (A,)
    order = torch.sort(F.to(torch.int8), dim=-1, descending=True, stable=True).indices  # (A, n) free first
    delta, mu_all = torch.zeros_like(g), torch.zeros_like(g[:, 0])  # (A, n), (A,)
    for members in _groups(sizes.tolist()):  # the host read of this step
        idx = torch.tensor(members, device=g.device)  # (Bg,)
        s = int(sizes[idx].max())
        cols = order[idx, :s]  # (Bg, s) free indices, then padding (indices of bounded entries)
        valid = torch.arange(s, device=g.device) < sizes[idx].unsqueeze(-1)  # (Bg, s)
        vf = valid.to(g.dtype)
        flat = idx.view(-1, 1, 1) * (n * n) + cols.unsqueeze(-1) * n + cols.unsqueeze(-2)  # (Bg, s, s) into K
        KFF = K.reshape(-1).index_select(0, flat.view(-1)).view(-1, s, s)  # gathered block (a flat gather is fastest)
        KFF = KFF * (vf.unsqueeze(-1) * vf.unsqueeze(-2))
        KFF.diagonal(dim1=-2, dim2=-1).add_(torch.where(valid, rho, 1.0))  # + rho I on F, identity on padding
        chol, info = torch.linalg.cholesky_ex(KFF)  # (Bg, s, s); a failed factor gives NaN, zeroed below
        gF = g[idx].gather(-1, cols) * vf  # (Bg, s)
        if feasible_set.cap is None:
            rhs = -gF.unsqueeze(-1)  # (Bg, s, 1)
        else:
            rhs = torch.stack([-gF, feasible_set.a[idx].gather(-1, cols) * vf], dim=-1)  # (Bg, s, 2)
        half = torch.linalg.solve_triangular(chol, rhs, upper=False)  # cholesky_solve is slow on CPU
        sol = torch.linalg.solve_triangular(chol.mT, half, upper=True)  # (Bg, s, 1 or 2)
        step = sol[..., 0]  # (Bg, s)
        mu = torch.zeros_like(step[:, :1])  # (Bg, 1)
        if feasible_set.cap is not None:  # the multiplier of a^T delta = r_eq, eq. (11b)
            aF = rhs[..., 1]
            denom, num = (aF * sol[..., 1]).sum(-1, keepdim=True), (aF * step).sum(-1, keepdim=True)  # (Bg, 1)
            if r_eq is not None:
                num = num - r_eq[idx].unsqueeze(-1)
            mu = torch.where(denom > 0, num / denom.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(denom))
            step = step - mu * sol[..., 1]
        ok = (info == 0).unsqueeze(-1) & torch.isfinite(step).all(-1, keepdim=True)  # (Bg, 1)
        step = torch.where(ok, step * vf, torch.zeros_like(step))
        delta[idx] = torch.zeros(len(members), n, dtype=g.dtype, device=g.device).scatter(-1, cols, step)
        mu_all[idx] = torch.where(ok, mu, torch.zeros_like(mu)).squeeze(-1)
    return delta, mu_all


def polish(K, b, z, fs: _Set, rho: float, steps: int, dual_floor: torch.Tensor) -> torch.Tensor:
    """Eq. (11d): a primal active-set method from the feasible z (the FISTA iterate), batched.

    Each step solves the face of the current free set F (`face_step`) and moves z toward its
    minimizer, as far as the bounds allow: a blocked step fixes the entries that reach a bound; a
    full step lands on the face minimizer, and then every bounded entry whose reduced gradient
    r = g + mu a points into the set by more than dual_floor (A,) is freed. f never increases. A
    problem leaves the loop when a full step frees nothing (its face is optimal up to dual_floor)
    or after `steps` steps; the certificate (13) judges the result. (A, n, n), (A, n), (A, n) -> (A, n)
    """
    A_, n = z.shape
    h_all = torch.full_like(z, float("inf")) if fs.h is None else fs.h  # (A, n)
    z = z.clone()
    live = torch.arange(A_, device=z.device)  # (L,) problems still in the loop
    Kl, bl, zl, sl, hl, dl = K, b, z, fs, h_all, dual_floor
    F = fs.free(z)  # (L, n)
    upper = ~F & (z >= h_all)  # (L, n) at the cap (never for the cone or the simplex)
    g = bmv(Kl, zl) - bl  # (L, n)
    go = torch.ones(A_, dtype=torch.bool, device=z.device)  # (L,) false: done, frozen until the next compaction
    for _ in range(steps):
        delta, mu = face_step(Kl, g, sl, F & go.unsqueeze(-1), rho)  # (L, n), (L,); frozen: no free set, no step
        big = torch.full_like(zl, float("inf"))
        to_zero = torch.where(F & (delta < 0), zl / (-delta), big)  # (L, n)
        to_cap = torch.where(F & (delta > 0), (hl - zl) / delta, big)
        ratios = torch.minimum(to_zero, to_cap)  # (L, n) step at which each free entry meets its bound
        t = ratios.amin(-1, keepdim=True).clamp(0.0, 1.0)  # (L, 1)
        full = t.squeeze(-1) >= 1.0  # (L,)
        hit_lo, hit_hi = F & ~full.unsqueeze(-1) & (to_zero <= t), F & ~full.unsqueeze(-1) & (to_cap <= t)
        cut = torch.where(hit_lo, 0.0, torch.where(hit_hi, hl, zl + t * delta)).clamp_min(0.0)  # (L, n)
        # eq. (11e): longer steps, projected, at the 2nd, 4th, ... breakpoint; several bounds join at once
        kth = torch.sort(ratios, dim=-1).values[:, [k for k in LONG_STEPS if k < n]].clamp(max=1.0)  # (L, m)
        longs = sl.repeat(kth.shape[-1]).project((zl.unsqueeze(1) + kth.unsqueeze(-1) * delta.unsqueeze(1)).flatten(
            0, 1)).view(zl.shape[0], -1, n)  # (L, m, n)
        cands = torch.cat([cut.unsqueeze(1), longs], dim=1)  # (L, m + 1, n)
        f_c = 0.5 * (cands * (cands @ Kl)).sum(-1) - (cands * bl.unsqueeze(1)).sum(-1)  # (L, m + 1)
        best = f_c.argmin(-1)  # (L,) ties: the cut step
        zl = cands.gather(1, best.view(-1, 1, 1).expand(-1, 1, n)).squeeze(1)  # (L, n)
        jumped = (best > 0).unsqueeze(-1)
        hit_lo = (hit_lo & ~jumped) | (jumped & F & (zl <= 0))
        hit_hi = (hit_hi & ~jumped) | (jumped & F & (zl >= hl))
        full = full & ~jumped.squeeze(-1)
        g = bmv(Kl, zl) - bl  # (L, n)
        r = g if sl.cap is None else g + mu.unsqueeze(-1) * sl.a  # (L, n) reduced gradient, valid after a full step
        scale = 1.0 if sl.cap is None else sl.a  # violations in w units: r_i / a_i (simplex sets)
        enter = full.unsqueeze(-1) & ~F & ~upper & (r < -dl.unsqueeze(-1) * scale)  # (L, n) leave 0
        leave = full.unsqueeze(-1) & upper & (r > dl.unsqueeze(-1) * scale)  # leave the cap
        F = (F & ~hit_lo & ~hit_hi) | enter | leave
        upper = (upper & ~leave) | hit_hi
        go = go & (~full | (enter | leave).any(-1))  # (L,)
        n_go = int(go.sum())  # the host read of this step
        if n_go == 0:
            break
        if 2 * n_go <= go.numel():  # compact when half are done (copying K rows costs about one product)
            z[live], k = zl, go
            live, zl, g, F, upper, dl, go = live[k], zl[k], g[k], F[k], upper[k], dl[k], go[k]
            Kl, bl, hl, sl = Kl[k], bl[k], hl[k], sl.take(k)
    z[live] = zl
    return z


def solve_qp(K, b, cap=None, *, c=None, max_iter=None, tol=None, check_every=CHECK_EVERY, first_check=FIRST_CHECK,
             use_polish=True, trace=False, polish_rounds=POLISH_ROUNDS) -> QPResult:
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
    L_hat = lambda_max_upper(K, a).clamp_min(tiny)  # (B,) <= trace = n
    a_s = a / L_hat.sqrt().unsqueeze(-1)  # (B, n)
    Ks, bs = K * (a_s.unsqueeze(-1) * a_s.unsqueeze(-2)), b * a / L_hat[:, None]  # (B, n, n), (B, n) f / L_hat in z
    # certificate units, eq. (13): FW gaps are reported relative to S = max_i K_ii + ||b||_inf (the
    # range of f over the simplex); cone residuals relative to ||b^||_inf + L^ ||z||_inf (set.certificate)
    S = (d_max.squeeze(-1) + b.abs().amax(-1)).clamp_min(tiny)  # (B,)
    cert_unit = L_hat / S if cap is not None else torch.ones_like(S)  # (B,)
    # eq. (13b): f(w) + 1/2 c = 1/2 ||G w - g_T||^2 >= 0 bounds f(w) - f* too; decisive when f* = 0
    # (g_T in the hull, or 0 in the hull of G), where the FW gap only falls like sqrt(f - f*)
    half_c = None if (c is None or cap is None) else 0.5 * c / S  # (B,) in units of S
    eps_n = 64 * n * torch.finfo(dtype).eps  # round-off margin of evaluating eq. (2)
    uncapped = cap is not None and bool((cap >= 1.0).all())  # the simplex: caps implied, eq. (5'')

    def certify(Kx, bx, z, unit, hc):
        g = bmv(Kx, z) - bx  # (A, n)
        cert = set_a.certificate(g, z, bx, unit)  # (A,) eq. (13)
        if hc is None:
            return cert
        quad, lin = 0.5 * (z * (g + bx)).sum(-1), (bx * z).sum(-1)  # (A,) 1/2 z^T K z and b^T z, scaled
        value = unit * (quad - lin) + hc + eps_n * (hc + unit * (quad.abs() + lin.abs()))  # (A,) eq. (13b)
        return torch.minimum(cert, value.clamp_min(0.0))

    if cap is not None:  # start at uniform weights (feasible for every cap u >= 1/n)
        z = torch.full((B, n), 1.0 / n, dtype=dtype, device=device) / a  # (B, n)
    else:  # cone: one projected gradient step from 0
        z = bs.clamp_min(0.0)  # (B, n)
    z_out = z.clone()
    cert_out = torch.full((B,), float("inf"), dtype=dtype, device=device)
    iters_out = torch.zeros(B, dtype=torch.long, device=device)
    history = [] if trace else None
    hist_row = cert_out.clone()

    active = torch.arange(B, device=device)
    # dual_floor of eq. (11d): a bound whose violation cannot raise the certificate above tol / 10 stays
    dual_floor = 0.1 * tol / cert_unit if cap is not None else 0.1 * tol * bs.abs().amax(-1)  # (B,)
    Ka, ba, Ua, Ca, Da, set_a = Ks, bs, cert_unit, half_c, dual_floor, _Set(a, cap, uncapped)
    y, t = z.clone(), torch.ones(B, dtype=dtype, device=device)
    it = 0
    while active.numel() > 0:
        steps = min(first_check if it == 0 else check_every, max_iter - it)
        for _ in range(steps):  # eq. (10): FISTA with gradient restart, step 1 (scaled problem)
            g = bmv(Ka, y) - ba  # (A, n)
            z_new = set_a.project(y - g)  # (A, n)
            dz = z_new - z  # (A, n)
            restart = ((y - z_new) * dz).sum(-1) > 0  # (A,)
            t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
            momentum = torch.where(restart, torch.zeros_like(t), (t - 1.0) / t_new)  # (A,)
            y = z_new + momentum.unsqueeze(-1) * dz
            t = torch.where(restart, torch.ones_like(t), t_new)
            z = z_new
            if trace:
                hist_row[active] = certify(Ka, ba, z, Ua, Ca)
                history.append(hist_row.clone())
        it += steps
        if trace and steps == 0:
            history.append(hist_row.clone())
        for _round in range(polish_rounds if use_polish else 1):  # eq. (11): polish, then certify
            if use_polish:
                cand = polish(Ka, ba, z, set_a, rho, ACTIVE_SET_STEPS, Da)
                better = (cand != z).any(-1)  # (A,)
                z = torch.where(better.unsqueeze(-1), cand, z)
                y = torch.where(better.unsqueeze(-1), z, y)
                t = torch.where(better, torch.ones_like(t), t)
            cert = certify(Ka, ba, z, Ua, Ca)  # (A,) eq. (13)
            z_out[active], cert_out[active], iters_out[active] = z, cert, it
            if trace:  # the polished certificate replaces that of the last iteration
                hist_row[active] = cert
                history[-1] = hist_row.clone()
            keep = ~(cert <= tol)  # (A,) NaN counts as not converged
            n_keep = int(keep.sum())  # the host sync of this check
            if n_keep < keep.numel():  # converged problems leave the batch
                active, Ka, ba, Ua, Da = active[keep], Ka[keep], ba[keep], Ua[keep], Da[keep]
                Ca = None if Ca is None else Ca[keep]
                set_a = set_a.take(keep)
                z, y, t = z[keep], y[keep], t[keep]
            if n_keep == 0:
                break
        if it >= max_iter:
            break
    w = z_out * a  # (B, n) back to sample weights
    if cap is not None:  # re-project in w: a * z loses digits to cancellation when a spans decades (float32)
        w = project_capped_simplex(w, cap)  # moves w by ~ its infeasibility, so f by <= ||g|| * that
    else:
        w = w.clamp_min(0.0)
    kind = "kkt_residual_jacobi_scaled" if cap is None else "frank_wolfe_gap_scaled"
    hist = torch.stack(history) if trace and history else None
    return QPResult(w, cert_out, cert_out <= tol, iters_out, kind, hist)

"""Batched QP solver for the capped simplex, the simplex and the cone: FISTA with restarts + polish.

Solves B problems at once (theory/batched_solvers.md, section 3):

    minimize_w   f(w) = 1/2 w^T K w - b^T w                                     eq. (1)
    subject to   w in C_u = {0 <= w <= u, sum w = 1}   (capped simplex; u = 1: simplex)
            or   w in R^n_+                             (cone)

1. Scaling (eq. (9)): Jacobi variables w = a * z, a = diag(K)^(-1/2), so K^ = diag(a) K diag(a) has a
   unit diagonal; f is divided by L^ ~ lambda_max(K^) (power iteration), so every problem of the
   batch has the same step size 1. On the simplex sets L^ is taken on the tangent space a^perp of
   the constraint a^T z = 1 (eq. (9')): a direction shared by all samples (the `correlated` family)
   then no longer sets the step.
2. Accelerated projected gradient (FISTA) with the gradient-based adaptive restart of
   O'Donoghue & Candes (eq. (10)); projections from `batched/projections.py` (exact, sort based).
   In float64 the power iteration and the first `first_check` iterations run on a float32 copy of
   K^ (eq. (10'), the "scout"): they only have to find the face; the polish and the certificate
   work in float64 on K itself, and the scout's iterate is lifted to a float64 point of the same face.
3. After `first_check` and then every `check_every` iterations, the polish of `batched/polish.py`
   (eqs. (11)-(12)): a batched primal active-set method on compact faces, started at the iterate.
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

from drpt_ref.batched.polish import ACTIVE_SET_STEPS, POLISH_RIDGE, ScaledGram, bmv, polish
from drpt_ref.batched.projections import JacobiSet, project_capped_simplex

# Default certificate tolerances (scaled units, eq. (13)): a few hundred times the round-off floor
# n * eps of evaluating the gradient (theory/batched_solvers.md, section 5).
DEFAULT_TOL = {torch.float64: 1e-11, torch.float32: 2e-5}
DEFAULT_MAX_ITER = 5000
POWER_ITERATIONS = 15
DIAG_FLOOR = 1e-20  # zero columns of G (K_ii = 0) get a_i = (1e-20 max K_ii)^(-1/2): any weight, no effect
POLISH_ROUNDS = 1  # polishes per check, each certified (converged problems leave before the next)
FIRST_CHECK = 20  # FISTA iterations before the first polish and check (enough to find most faces)
CHECK_EVERY = 10  # FISTA iterations between later checks
L_FLOOR = 1e-6  # eq. (9'): f flat on the tangent space (n = 1, identical columns): any step is safe, keep it finite
# the power iteration's start 1 + 0.1 frac(j phi), j = 1..n: distinct entries (the all-ones vector has no component
# in the simplex's tangent space when K's diagonal is constant), the same on every device, and drawn without a
# random generator, so that torch.compile traces the whole solve (batched/compiled.py)
GOLDEN = (5**0.5 - 1) / 2
STEP_SAFETY = 1.25  # L = 1.25 * Rayleigh quotient after POWER_ITERATIONS, capped by the trace
# eq. (10'): in float64 the power iteration and the first FISTA iterations (which only look for the
# face; the polish and the certificate then work in float64) run on a float32 copy of K
SCOUT_DTYPE = {torch.float64: torch.float32}
# sync-free schedule (no host read, for a training step): active-set steps of its one polish; from a FISTA iterate
# the face is usually found in a few (a problem it does not certify is re-solved by the synchronising schedule)
SYNC_FREE_POLISH_STEPS = 3


def certificate_kind(cap) -> str:
    """The kind of eq. (13)'s certificate: the scaled Frank-Wolfe gap on the simplex sets, the KKT residual on the
    cone (cap None)."""
    return "kkt_residual_jacobi_scaled" if cap is None else "frank_wolfe_gap_scaled"


@dataclass
class QPResult:
    w: torch.Tensor  # (B, n)
    certificate: torch.Tensor  # (B,)
    converged: torch.Tensor  # (B,) bool
    iterations: torch.Tensor  # (B,) int
    certificate_kind: str
    history: torch.Tensor | None = None  # (T, B)


def lambda_max_upper(K_hat: torch.Tensor, normal: torch.Tensor | None = None) -> torch.Tensor:
    """An estimate of lambda_max(K^) that errs upward: STEP_SAFETY * power iteration, <= trace, eq. (9).

    K^ (B, n, n) is the unit-diagonal Jacobi-scaled Gram (any dtype, e.g. the float32 scout copy).
    With a unit `normal` (B, n) the iteration runs on the tangent space normal^perp (eq. (9')).
    The vector is normalized every 4 products (its norm grows at most n^4 in between). (B,)"""
    n = K_hat.shape[-1]
    j = torch.arange(1, n + 1, device=K_hat.device, dtype=K_hat.dtype)  # (n,)
    x = (1.0 + 0.1 * torch.frac(j * GOLDEN)).expand(K_hat.shape[:-1])  # (B, n) the start: distinct entries
    nrm = None if normal is None else normal.to(K_hat.dtype)  # (B, n)
    for step in range(POWER_ITERATIONS + 1):
        if nrm is not None:  # stay in the tangent space of a^T z = 1
            x = x - nrm * (nrm * x).sum(-1, keepdim=True)
        if step % 4 == 0 or step == POWER_ITERATIONS:
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(K_hat.dtype).tiny)
        Kx = bmv(K_hat, x)  # (B, n)
        if step == POWER_ITERATIONS:
            break
        x = Kx
    rayleigh = (x * Kx).sum(-1)  # (B,)
    trace = K_hat.diagonal(dim1=-2, dim2=-1).sum(-1)  # (B,)
    return torch.minimum(STEP_SAFETY * rayleigh, trace).clamp_min(0.0)  # (B,)


def fista_step(Kx: ScaledGram, bx, fs: JacobiSet, z, y, t, exact: bool = True, sort=torch.sort):
    """One iteration of eq. (10) (FISTA with gradient restart, step 1), in the dtype of Kx; sort: the sort of the
    projection (compiled.py passes a faster CPU sort). K^ (A, n, n), (A, n), z, y (A, n), t (A,) -> z, y, t"""
    g = Kx.mv(y) - bx  # (A, n)
    z_new = fs.project(y - g, exact=exact, sort=sort)  # (A, n)
    dz = z_new - z  # (A, n)
    restart = ((y - z_new) * dz).sum(-1) > 0  # (A,)
    t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
    momentum = torch.where(restart, 0.0, (t - 1.0) / t_new)  # (A,)
    y = z_new + momentum.unsqueeze(-1) * dz
    t = torch.where(restart, 1.0, t_new)
    return z_new, y, t


def fista(Kx: ScaledGram, bx, fs: JacobiSet, z, y, t, steps: int, record=None, exact: bool = True,
          step=fista_step):
    """Eq. (10): `steps` iterations of FISTA with gradient restart, step 1 (scaled problem), in the
    dtype of Kx. K^ (A, n, n), (A, n), state z, y (A, n), t (A,) -> z, y, t; record(z) after each iteration.
    exact=False (the scout, whose iterate is lifted by an exact projection) skips the Newton step of the
    projections (sums to cumsum round-off). step: the iteration (fista_step; compiled.py passes its copy)."""
    for _ in range(steps):
        z, y, t = step(Kx, bx, fs, z, y, t, exact)
        if record is not None:
            record(z)
    return z, y, t


def _scale(K, cap, first_dtype):
    """Eqs. (9), (9'): a = diag(K)^(-1/2) (B, n), max K_ii (B, 1), L^ (B,) and K^ / L^ in first_dtype (B, n, n).

    K^ is formed in place in a copy of K (the float32 scout copy, or the working copy without a
    scout); L^ estimates lambda_max(K^) on a^perp for the simplex sets, on R^n for the cone.
    """
    d = K.diagonal(dim1=-2, dim2=-1)  # (B, n)
    d_max = d.amax(-1, keepdim=True)  # (B, 1)
    d = torch.where(d_max > 0, torch.maximum(d, DIAG_FLOOR * d_max), torch.ones_like(d))
    a = d.rsqrt()  # (B, n)
    normal = None if cap is None else a / a.norm(dim=-1, keepdim=True)  # (B, n) unit normal of a^T z = 1
    a_f = a.to(first_dtype)  # (B, n)
    K_first = K.to(first_dtype, copy=True).mul_(a_f.unsqueeze(-1)).mul_(a_f.unsqueeze(-2))  # (B, n, n) K^
    L_hat = lambda_max_upper(K_first, normal).to(K.dtype).clamp_min(L_FLOOR)  # (B,) <= trace = n
    K_first.div_(L_hat.to(first_dtype).view(-1, 1, 1))  # (B, n, n) K^ / L^: step size 1
    return a, d_max, L_hat, K_first


def solve_qp(K, b, cap=None, *, c=None, max_iter=None, tol=None, check_every=CHECK_EVERY, first_check=FIRST_CHECK,
             use_polish=True, trace=False, polish_rounds=POLISH_ROUNDS, uncapped=None, sync_free=False,
             scout_step=fista_step) -> QPResult:
    """Minimize 1/2 w^T K w - b^T w over the capped simplex (cap (B,)) or the cone (cap None).

    uncapped: True when every cap is >= 1 (the simplex; None: read from cap). sync_free=True: no host read (a fixed
    schedule, section 3 of theory/batched_solvers.md: `first_check` iterations, one polish of SYNC_FREE_POLISH_STEPS
    steps on faces padded to n, one certificate); the caller reads `converged` and re-solves what failed.
    scout_step: the FISTA iteration of the scout (eq. (10'); fista_step, or the compiled copy of compiled.py,
    which runs on the full batch only, so one shape)."""
    B, n = b.shape
    dtype, device = b.dtype, b.device
    max_iter = DEFAULT_MAX_ITER if max_iter is None else int(max_iter)
    tol = DEFAULT_TOL.get(dtype, 2e-5) if tol is None else float(tol)
    tiny = torch.finfo(dtype).tiny
    if uncapped is None:  # the simplex: caps implied, eq. (5'')
        uncapped = cap is not None and bool((cap >= 1.0).all())
    # eq. (10'): with the polish on, a float32 scout finds the faces; without it FISTA alone must converge
    scout = SCOUT_DTYPE.get(dtype) if (use_polish and device.type != "mps") else None

    a, d_max, L_hat, K_first = _scale(K, cap, scout or dtype)  # eqs. (9), (9')
    a_s = a / L_hat.sqrt().unsqueeze(-1)  # (B, n) z -> w scaling of K^ / L^
    bs = b * a / L_hat[:, None]  # (B, n): f / L_hat in z
    Ks = ScaledGram(K, a_s) if scout is not None else ScaledGram(K_first, None)  # K^ in the working dtype
    # certificate units, eq. (13): FW gaps are reported relative to S = max_i K_ii + ||b||_inf (the
    # range of f over the simplex); cone residuals relative to ||b^||_inf + L^ ||z||_inf (set.certificate)
    S = (d_max.squeeze(-1) + b.abs().amax(-1)).clamp_min(tiny)  # (B,)
    cert_unit = L_hat / S if cap is not None else torch.ones_like(S)  # (B,)
    # eq. (13b): f(w) + 1/2 c = 1/2 ||G w - g_T||^2 >= 0 bounds f(w) - f* too; decisive when f* = 0
    # (g_T in the hull, or 0 in the hull of G), where the FW gap only falls like sqrt(f - f*)
    half_c = None if (c is None or cap is None) else 0.5 * c / S  # (B,) in units of S
    eps_n = 64 * n * torch.finfo(dtype).eps  # round-off margin of evaluating eq. (2)
    set_a = JacobiSet(a, cap, uncapped)

    def certify(Kx, bx, z, unit, hc):
        g = Kx.mv(z) - bx  # (A, n)
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
    # the ridge of eq. (12), relative to the diagonal 1 / L^ of the scaled K (Cholesky's backward error is)
    rho = POLISH_RIDGE.get(dtype, 1e-5) * L_hat.reciprocal().clamp_min(1.0)  # (B,)
    Ka, ba, Ua, Ca, Da, Ra = Ks, bs, cert_unit, half_c, dual_floor, rho
    y, t = z.clone(), torch.ones(B, dtype=dtype, device=device)

    def record(zk):
        hist_row[active] = certify(Ka, ba, zk.to(dtype), Ua, Ca)
        history.append(hist_row.clone())

    it = 0
    while active.numel() > 0:
        steps = min(first_check if it == 0 else check_every, max_iter - it)
        if it == 0 and scout is not None:  # eq. (10'): the scout iterations on the float32 copy
            state = (z.to(scout), y.to(scout), t.to(scout))
            z32, _, _ = fista(ScaledGram(K_first, None), bs.to(scout), set_a, *state, steps, record if trace else None,
                              exact=False, step=scout_step)
            z = set_a.lift(z32, dtype)  # (B, n) feasible in float64, with the scout's face
            y, t = z.clone(), torch.ones_like(t)
        else:
            z, y, t = fista(Ka, ba, set_a, z, y, t, steps, record if trace else None)
        it += steps
        if trace and steps == 0:
            history.append(hist_row.clone())
        for _round in range(polish_rounds if use_polish else 1):  # eq. (11): polish, then certify
            if use_polish:
                cand = polish(Ka, ba, z, set_a, Ra, SYNC_FREE_POLISH_STEPS if sync_free else ACTIVE_SET_STEPS, Da,
                              sync_free=sync_free)
                better = (cand != z).any(-1)  # (A,)
                z = torch.where(better.unsqueeze(-1), cand, z)
                y = torch.where(better.unsqueeze(-1), z, y)
                t = torch.where(better, torch.ones_like(t), t)
            cert = certify(Ka, ba, z, Ua, Ca)  # (A,) eq. (13)
            z_out[active], cert_out[active], iters_out[active] = z, cert, it
            if trace:  # the polished certificate replaces that of the last iteration
                hist_row[active] = cert
                history[-1] = hist_row.clone()
            if sync_free:  # one schedule, no early exit: the caller reads the certificate
                break
            keep = ~(cert <= tol)  # (A,) NaN counts as not converged
            n_keep = int(keep.sum())  # the host sync of this check
            if n_keep < keep.numel():  # converged problems leave the batch
                active, Ka, ba, Ua, Da, Ra = active[keep], Ka.take(keep), ba[keep], Ua[keep], Da[keep], Ra[keep]
                Ca = None if Ca is None else Ca[keep]
                set_a = set_a.take(keep)
                z, y, t = z[keep], y[keep], t[keep]
            if n_keep == 0:
                break
        if it >= max_iter or sync_free:
            break
    w = z_out * a  # (B, n) back to sample weights
    if cap is not None:  # re-project in w: a * z loses digits to cancellation when a spans decades (float32)
        w = project_capped_simplex(w, cap)  # moves w by ~ its infeasibility, so f by <= ||g|| * that
    else:
        w = w.clamp_min(0.0)
    hist = torch.stack(history) if trace and history else None
    return QPResult(w, cert_out, cert_out <= tol, iters_out, certificate_kind(cap), hist)

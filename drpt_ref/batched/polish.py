"""The active-set polish of the batched QP solver: proximal Newton steps on compact faces, batched.

Started at a feasible iterate z of FISTA (theory/batched_solvers.md, eqs. (11)-(11e)), a primal
active-set method for B problems at once on

    minimize_z   1/2 z^T K^ z - b^T z   over   {a^T z = 1, 0 <= z <= h}   or   z >= 0 (cone)

Each step solves the face of the free set F (entries strictly inside their bounds) by

    delta = argmin { g^T delta + 1/2 delta^T (K^_FF + rho I) delta : delta_i = 0 off F, a^T delta = 0 }

on the compact block K^_FF + rho I (free indices gathered, problems grouped by |F|, eq. (11c)),
moves as far as the bounds allow or to a longer projected step if that is lower (eq. (11e)), and
frees the bounds whose reduced gradient points into the set after a full step (eq. (11d)).
f never increases; with the right free set one step is exact, so a singular K costs nothing extra.
K^ is a `ScaledGram`: products and gathered blocks of diag(s) K diag(s), never formed.

Shapes:
    K^ (A, n, n), b (A, n), z (A, n), F (A, n) bool  ->  z (A, n); face_step: delta (A, n), mu (A,)
"""

from __future__ import annotations

import torch

from drpt_ref.batched.projections import JacobiSet

# rho of eq. (11), relative to the diagonal of K^ (the caller multiplies by max(1, 1 / L^)): large
# enough that the Cholesky of K^_FF + rho I succeeds when K^_FF is singular (its backward error is
# ~ s eps times the diagonal), small enough that its objective error rho/2 ||delta*||^2 (eq. (12))
# is below the tolerance.
POLISH_RIDGE = {torch.float64: 1e-12, torch.float32: 1e-5}
# eq. (11c): a group of faces costs about 30 tensor launches plus its padded factorizations (s^3 / 3
# flops each); on a CPU core the launches of one group take about as long as one factorization at s = 128
GROUP_LAUNCH = 128**3 // 2
LONG_STEPS = (1, 3, 7, 15, 31)  # 0-based breakpoints of the long steps of eq. (11e)
ACTIVE_SET_STEPS = 32  # most steps of the active-set method per polish, eq. (11d)


def bmv(K: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Batched product K x for symmetric K, computed as x^T K (3x faster on CPU). (B, n, n), (B, n) -> (B, n)."""
    return (x.unsqueeze(-2) @ K).squeeze(-2)


class ScaledGram:
    """K^ = diag(s) K diag(s) (the Jacobi-scaled Gram of eq. (9), divided by L^), applied without forming it.

    Forming K^ would cost a pass over K and a K-sized allocation; every use needs only products
    K^ x = s * K (s * x) and gathered blocks K^_FF = s_F s_F^T * K_FF. K (A, n, n), s (A, n).
    """

    def __init__(self, K: torch.Tensor, s: torch.Tensor | None):
        self.K, self.s = K, None if s is None else s.to(K.dtype)  # s None: K is K^ itself (formed)

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        """K^ x for x (A, n), or K^ x_j for each row of x (A, m, n)."""
        if self.s is None:
            return x @ self.K if x.ndim == 3 else bmv(self.K, x)
        if x.ndim == 3:  # (A, m, n) -> (A, m, n)
            return ((x * self.s.unsqueeze(1)) @ self.K) * self.s.unsqueeze(1)
        return self.s * bmv(self.K, self.s * x)  # (A, n)

    def take(self, keep: torch.Tensor) -> ScaledGram:
        return ScaledGram(self.K[keep], None if self.s is None else self.s[keep])  # copies the kept rows of K

    def block(self, idx: torch.Tensor, cols: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """mask_i mask_j K^[idx][:, cols, cols] for problems idx (Bg,), columns cols (Bg, s) and a 0/1
        mask (Bg, s) of the valid columns (padding rows and columns come out zero): one flat gather."""
        n = self.K.shape[-1]
        flat = idx.view(-1, 1, 1) * (n * n) + cols.unsqueeze(-1) * n + cols.unsqueeze(-2)  # (Bg, s, s) into K
        KFF = self.K.reshape(-1).index_select(0, flat.view(-1)).view(*cols.shape, cols.shape[-1])  # (Bg, s, s)
        sF = mask if self.s is None else self.s[idx].gather(-1, cols) * mask  # (Bg, s)
        return KFF.mul_(sF.unsqueeze(-1)).mul_(sF.unsqueeze(-2))


def _groups(sizes: list[int]) -> list[tuple[list[int], int]]:
    """Problems sorted by free-set size, cut into groups that are each padded to their largest member
    (eq. (11c)); returns (members, padded size) per group.

    One pass over the sorted sizes: the next problem joins the current group when padding the group's
    members up to its size costs less than the launches of a new group (GROUP_LAUNCH, in units of the
    s^3 of a factorization), otherwise it starts a new group. Size 0 (the face is a point, e.g. a
    vertex of the capped simplex) needs no step and no group.
    """
    groups = []
    for s, i in sorted((s, i) for i, s in enumerate(sizes) if s > 0):
        if groups and len(groups[-1][0]) * (s**3 - groups[-1][1] ** 3) <= GROUP_LAUNCH:
            groups[-1][0].append(i)
            groups[-1] = (groups[-1][0], s)
        else:
            groups.append(([i], s))
    return groups


def face_step(K: ScaledGram, g, feasible_set: JacobiSet, F: torch.Tensor, rho: torch.Tensor,
              r_eq: torch.Tensor | None = None, sync_free: bool = False):
    """The proximal Newton step on the free face F, solved on the compact block K^_FF, eq. (11)-(11c).

    delta = argmin { g^T delta + 1/2 delta^T (K^_FF + rho I) delta : delta_i = 0 off F, a^T delta = r_eq }
    (no equality for the cone; r_eq = 0 unless given). For each group of problems (by |F|, `_groups`)
    the free indices are gathered into a (Bg, s_max) index tensor, K^_FF + rho I (rho I on the padding,
    decoupled) is factored once by Cholesky and solved for two right-hand sides; the multiplier mu of
    the equality is in closed form, and delta is scattered back. sync_free: one group, every face padded to n
    (no host read of the sizes).
    K^ (A, n, n), g (A, n), F (A, n) bool, rho (A,), r_eq (A,) -> delta (A, n), mu (A,)
    """
    sizes = F.sum(-1)  # (A,)
    order = torch.sort(F.to(torch.int8), dim=-1, descending=True, stable=True).indices  # (A, n) free first
    delta, mu_all = torch.zeros_like(g), torch.zeros_like(g[:, 0])  # (A, n), (A,)
    groups = [(None, g.shape[-1])] if sync_free else _groups(sizes.tolist())  # the host read of this step
    for members, s in groups:
        idx = torch.arange(g.shape[0], device=g.device) if members is None else torch.tensor(members, device=g.device)
        cols = order[idx, :s]  # (Bg, s) free indices, then padding (indices of bounded entries)
        vf = (torch.arange(s, device=g.device) < sizes[idx].unsqueeze(-1)).to(g.dtype)  # (Bg, s) 1 on F
        KFF = K.block(idx, cols, vf)  # (Bg, s, s), zero on the padding
        # + rho I: on the padding the block becomes rho I, decoupled, so the solution is 0 there
        KFF.diagonal(dim1=-2, dim2=-1).add_(rho[idx].unsqueeze(-1))
        chol, info = torch.linalg.cholesky_ex(KFF)  # (Bg, s, s); a failed factor gives NaN, zeroed below
        rhs = (-g[idx].gather(-1, cols) * vf).unsqueeze(-1)  # (Bg, s, 1)
        if feasible_set.cap is not None:
            rhs = torch.cat([rhs, (feasible_set.a[idx].gather(-1, cols) * vf).unsqueeze(-1)], dim=-1)  # (Bg, s, 2)
        half = torch.linalg.solve_triangular(chol, rhs, upper=False)  # cholesky_solve is slow on CPU
        sol = torch.linalg.solve_triangular(chol.mT, half, upper=True)  # (Bg, s, 1 or 2)
        step = sol[..., 0]  # (Bg, s)
        mu = torch.zeros_like(step[:, 0])  # (Bg,)
        if feasible_set.cap is not None:  # the multiplier of a^T delta = r_eq, eq. (11b); a_F^T x_2 > 0
            aF, x2 = rhs[..., 1], sol[..., 1]  # (Bg, s) each
            num = (aF * step).sum(-1) if r_eq is None else (aF * step).sum(-1) - r_eq[idx]  # (Bg,)
            mu = num / (aF * x2).sum(-1).clamp_min(torch.finfo(g.dtype).tiny)  # (Bg,)
            step = step - mu.unsqueeze(-1) * x2
        ok = (info == 0) & torch.isfinite(step).all(-1)  # (Bg,)
        delta[idx.unsqueeze(-1), cols] = torch.where(ok.unsqueeze(-1), step, 0.0)  # padding entries get 0
        mu_all[idx] = torch.where(ok, mu, 0.0)
    return delta, mu_all


def _long_steps(K: ScaledGram, b, fs: JacobiSet, z, cut, delta, ratios, blocked):
    """Eq. (11e): the projected steps P(z + t_k delta) at the LONG_STEPS-th smallest bound-hitting step
    (capped at 1), evaluated with the cut step in one batched product; where a step was cut (blocked (L,)),
    the lowest f wins (ties: the cut). -> the new z (L, n), and (L, 1) true where a long step won."""
    n = z.shape[-1]
    kth = torch.sort(ratios, dim=-1).values[:, [k for k in LONG_STEPS if k < n]].clamp(max=1.0)  # (L, m)
    longs = fs.project(z.unsqueeze(1) + kth.unsqueeze(-1) * delta.unsqueeze(1))  # (L, m, n)
    cands = torch.cat([cut.unsqueeze(1), longs], dim=1)  # (L, m + 1, n)
    f_c = 0.5 * (cands * K.mv(cands)).sum(-1) - (cands * b.unsqueeze(1)).sum(-1)  # (L, m + 1)
    f_c[:, 1:] = torch.where(blocked.unsqueeze(-1), f_c[:, 1:], float("inf"))  # a full step is the face minimizer
    best = f_c.argmin(-1)  # (L,) ties: the cut step
    return cands.gather(1, best.view(-1, 1, 1).expand(-1, 1, n)).squeeze(1), (best > 0).unsqueeze(-1)


def polish(K: ScaledGram, b, z, fs: JacobiSet, rho: torch.Tensor, steps: int, dual_floor: torch.Tensor,
           sync_free: bool = False) -> torch.Tensor:
    """Eq. (11d): a primal active-set method from the feasible z (the FISTA iterate), batched; rho (A,).

    Each step solves the face of the current free set F (`face_step`) and moves z toward its
    minimizer, as far as the bounds allow: a blocked step fixes the entries that reach a bound; a
    full step lands on the face minimizer, and then every bounded entry whose reduced gradient
    r = g + mu a points into the set by more than dual_floor (A,) is freed. f never increases. A
    problem leaves the loop when a full step frees nothing (its face is optimal up to dual_floor)
    or after `steps` steps; the certificate (13) judges the result. (A, n, n), (A, n), (A, n) -> (A, n)
    sync_free: no host read: every step runs (a finished problem is frozen, not removed), faces padded to n.
    """
    A_, n = z.shape
    if steps < 1:
        return z.clone()
    capped = fs.cap is not None and not fs.uncapped  # entries can sit at a cap (capped simplex only)
    z = z.clone()
    live = torch.arange(A_, device=z.device)  # (L,) problems still in the loop
    Kl, bl, zl, sl, dl, rl = K, b, z, fs, dual_floor, rho
    hl = fs.h if capped else None  # (L, n) the caps
    F = fs.free(z)  # (L, n)
    upper = ~F & (z >= hl) if capped else None  # (L, n) at the cap
    g = Kl.mv(zl) - bl  # (L, n)
    go = torch.ones(A_, dtype=torch.bool, device=z.device)  # (L,) false: done, frozen until the next compaction
    for _ in range(steps):
        # (L, n), (L,); frozen: no free set, no step
        delta, mu = face_step(Kl, g, sl, F & go.unsqueeze(-1), rl, sync_free=sync_free)
        ratios = torch.where(F & (delta < 0), zl / (-delta), float("inf"))  # (L, n) step at which z_i meets 0
        if capped:  # ... or its cap
            ratios = torch.minimum(ratios, torch.where(F & (delta > 0), (hl - zl) / delta, float("inf")))
        t = ratios.amin(-1, keepdim=True).clamp(0.0, 1.0)  # (L, 1)
        full = t.squeeze(-1) >= 1.0  # (L,)
        hit = F & (ratios <= t) & ~full.unsqueeze(-1)  # (L, n) the entries that block the step
        bound = torch.where(delta < 0, 0.0, hl) if capped else 0.0  # the bound each blocking entry lands on
        cut = torch.where(hit, bound, zl + t * delta).clamp_min(0.0)  # (L, n)
        blocked = ~full & go  # (L,)
        # eq. (11e): where a long step wins, its entries at a bound leave F instead (sync-free: always evaluated)
        if sync_free or bool(blocked.any()):
            zl, jumped = _long_steps(Kl, bl, sl, zl, cut, delta, ratios, blocked)
            at_bound = (zl <= 0) | (zl >= hl) if capped else zl <= 0
            hit = torch.where(jumped, F & at_bound, hit)  # (L, n)
        else:
            zl = cut
        g = Kl.mv(zl) - bl  # (L, n)
        r = g if sl.cap is None else g + mu.unsqueeze(-1) * sl.a  # (L, n) reduced gradient, valid after a full step
        floor = dl.unsqueeze(-1) * (1.0 if sl.cap is None else sl.a)  # (L, n) dual_floor in w units (r_i / a_i)
        enter = full.unsqueeze(-1) & ~F & (r < -floor)  # (L, n) leave 0 (or the cap, below)
        if capped:
            leave = full.unsqueeze(-1) & upper & (r > floor)  # (L, n) leave the cap
            enter = (enter & ~upper) | leave
            upper = (upper & ~leave) | (hit & (zl >= hl))
        F = (F & ~hit) | enter  # the blocking entries leave F (an entry that just entered at 0 and grows stays)
        go = go & (~full | enter.any(-1))  # (L,)
        if sync_free:
            continue
        n_go = int(go.sum())  # the host read of this step
        if n_go == 0:
            break
        if 2 * n_go <= go.numel():  # compact when half are done (copying K rows costs about one product)
            z[live], k = zl, go
            live, zl, g, F, dl, rl, go = live[k], zl[k], g[k], F[k], dl[k], rl[k], go[k]
            Kl, bl, sl = Kl.take(k), bl[k], sl.take(k)
            hl, upper = (hl[k], upper[k]) if capped else (None, None)
    z[live] = zl
    return z

"""Batched Euclidean projections and linear minimization oracles onto the (capped) simplex, in torch.

These are the two set operations the batched QP solver needs (theory/batched_solvers.md, section 2):

    projection   P_C(v) = argmin_{w in C} 1/2 ||w - v||^2                      eq. (4)
    LMO          min_{s in C} g^T s    (the Frank-Wolfe linear oracle)        eq. (6)

for the capped simplex C_u = {w : 0 <= w <= u, sum w = 1} with a per-problem cap u in [1/n, 1]
(u = 1/k; u = 1 is the plain simplex). Both are exact, sort based and loop free over the batch:

* simplex projection: sort v descending, the threshold tau is (cumsum_rho - 1) / rho at the last
  index rho where v_(rho) > tau (the classic algorithm, eq. (5));
* capped simplex projection: phi(tau) = sum_i clip(v_i - tau, 0, u) is piecewise linear and
  decreasing with breakpoints {v_i - u} and {v_i}; sort the 2n breakpoints, evaluate phi at all of
  them by a cumulative sum of slopes, and interpolate the crossing phi(tau) = 1 (eq. (5'));
* both end with one Newton step on tau over the identified free set, so sum w = 1 holds to
  round-off (n * eps) rather than to the accumulated error of the cumulative sums.

The LMO puts u on the smallest entries of g: the sorted weights are clip(1 - j u, 0, u), j = 0..n-1.

Shapes:
    v, g (B, n); cap u (B,) or a Python float; outputs (B, n) or (B,). The weighted projections also
    take v (B, m, n) with a, h (B, 1, n): m points of each problem at once.
"""

from __future__ import annotations

import torch


def _as_cap(cap, v: torch.Tensor) -> torch.Tensor:
    """The cap u as a (B, 1) tensor of v's dtype and device."""
    if isinstance(cap, torch.Tensor):
        return cap.to(dtype=v.dtype, device=v.device).reshape(-1, 1)  # (B, 1)
    return torch.full((v.shape[0], 1), float(cap), dtype=v.dtype, device=v.device)  # (B, 1)


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of v onto the simplex {w >= 0, sum w = 1}, eq. (5)."""
    n = v.shape[-1]
    v_sorted, _ = torch.sort(v, dim=-1, descending=True)  # (B, n)
    cumsum = v_sorted.cumsum(-1) - 1.0  # (B, n)
    j = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)  # (n,)
    positive = v_sorted - cumsum / j > 0  # (B, n), true on a prefix
    rho = positive.sum(-1, keepdim=True).clamp_min(1)  # (B, 1)
    tau = cumsum.gather(-1, rho - 1) / rho.to(v.dtype)  # (B, 1)
    a = torch.ones_like(v)
    tau = _newton_tau(v, tau, a, torch.full_like(v, float("inf")))
    return (v - tau).clamp_min(0.0)  # (B, n)


def _newton_tau(v, tau, a, h):
    """One Newton step on phi(tau) = 1 over the free set {0 < v - tau a < h} (exact once the set is right)."""
    z = v - tau * a  # (B, n)
    free = (z > 0) & (z < h)  # (B, n)
    phi = (a * torch.minimum(z.clamp_min(0.0), h)).sum(-1, keepdim=True)  # (B, 1)
    curvature = (a * a * free).sum(-1, keepdim=True)  # (B, 1)
    step = (phi - 1.0) / curvature.clamp_min(torch.finfo(v.dtype).tiny)  # (B, 1)
    return tau + torch.where(curvature > 0, step, torch.zeros_like(step))


def project_weighted_capped_simplex(v: torch.Tensor, a: torch.Tensor, h: torch.Tensor,
                                    exact: bool = True, sort=torch.sort) -> torch.Tensor:
    """argmin_z 1/2 ||z - v||^2 s.t. a^T z = 1, 0 <= z <= h (a > 0, a^T h >= 1), eq. (5').

    The capped simplex is a = 1, h = u; the solver uses a = 1/sqrt(diag K) (Jacobi scaling, eq. (9)).
    z(tau) = clip(v - tau a, 0, h) and phi(tau) = a^T z(tau) is piecewise linear and decreasing with
    breakpoints (v_i - h_i)/a_i (slope -= a_i^2) and v_i/a_i (slope += a_i^2).
    Lower precisions are computed in float64 (O(B n log n), small next to the O(B n^2) gradient):
    in float32 the cumulative sum of slopes a_i^2 spanning decades loses the crossing.
    sort(x, dim=-1, descending=False) -> values, indices: torch.sort, or the faster CPU sort of compiled.py.
    """
    if v.dtype != torch.float64 and v.device.type != "mps":
        out = project_weighted_capped_simplex(v.double(), a.double(), h.double(), exact, sort)
        return out.to(v.dtype)  # (B, n)
    a, h = a.expand_as(v), h.expand_as(v)  # views: a and h may broadcast over leading dimensions of v
    points = torch.cat([(v - h) / a, v / a], dim=-1)  # (B, 2n) breakpoints of phi
    a2 = a * a  # (B, n)
    slope_inc = torch.cat([-a2, a2], dim=-1)  # (B, 2n)
    t, order = sort(points, dim=-1)  # (B, 2n)
    slope = slope_inc.gather(-1, order).cumsum(-1)  # (B, 2n) slope of phi on (t_j, t_{j+1})
    dt = t.diff(dim=-1)  # (B, 2n-1)
    phi0 = (a * h).sum(-1, keepdim=True)  # (B, 1) phi at the smallest breakpoint: every entry at its cap
    phi = torch.cat([phi0, phi0 + (slope[..., :-1] * dt).cumsum(-1)], dim=-1)  # (B, 2n) phi(t_j)
    crossed = phi[..., 1:] <= 1.0  # (B, 2n-1); phi reaches 0 at the last breakpoint
    last = torch.full_like(crossed[..., 0], crossed.shape[-1] - 1, dtype=torch.long)  # (B,)
    j = torch.where(crossed.any(-1), crossed.to(torch.uint8).argmax(-1), last).unsqueeze(-1)  # (B, 1) first crossing
    t_j, phi_j, s_j = t.gather(-1, j), phi.gather(-1, j), slope.gather(-1, j)  # (B, 1) each
    tiny = torch.finfo(v.dtype).tiny
    tau = torch.where(s_j < 0, t_j + (phi_j - 1.0) / (-s_j).clamp_min(tiny), t_j)  # (B, 1) interpolate
    if exact:
        tau = _newton_tau(v, tau, a, h)
    return torch.minimum((v - tau * a).clamp_min(0.0), h)  # (B, n)


def project_weighted_simplex(v: torch.Tensor, a: torch.Tensor, exact: bool = True, sort=torch.sort) -> torch.Tensor:
    """argmin_z 1/2 ||z - v||^2 s.t. a^T z = 1, z >= 0 (a > 0): eq. (5') without caps, eq. (5'').

    The simplex in Jacobi variables (its caps z_i <= 1/a_i are implied). The breakpoints t_i = v_i/a_i
    sorted descending; with the j largest active, phi(t) = sum a_i v_i - t sum a_i^2 over them, so
    tau_j = (cumsum(a v)_j - 1) / cumsum(a^2)_j and tau = tau_rho at the last j with t_(j) > tau_j
    (phi(t_(j)) < 1 holds on a prefix, as in eq. (5)). One sort of n instead of 2n.
    """
    if v.dtype != torch.float64 and v.device.type != "mps":  # as in eq. (5'): cumsums of a^2 in float64
        return project_weighted_simplex(v.double(), a.double(), exact, sort).to(v.dtype)  # (B, n)
    a = a.expand_as(v)  # a view: a may broadcast over leading dimensions of v
    t_sorted, order = sort(v / a, dim=-1, descending=True)  # (B, n) breakpoints, descending
    a_s = a.gather(-1, order)  # (B, n)
    s_aa = (a_s * a_s).cumsum(-1)  # (B, n)
    tau_j = ((a_s * a_s * t_sorted).cumsum(-1) - 1.0) / s_aa  # (B, n) a_i v_i = a_i^2 t_i
    rho = (t_sorted > tau_j).sum(-1, keepdim=True).clamp_min(1)  # (B, 1) length of the prefix
    tau = tau_j.gather(-1, rho - 1)  # (B, 1)
    if exact:
        tau = _newton_tau(v, tau, a, torch.full_like(v, float("inf")))
    return (v - tau * a).clamp_min(0.0)  # (B, n)


def project_capped_simplex(v: torch.Tensor, cap) -> torch.Tensor:
    """Euclidean projection of each row of v onto {0 <= w <= u, sum w = 1}, u = cap in [1/n, 1], eq. (5')."""
    u = _as_cap(cap, v)  # (B, 1)
    return project_weighted_capped_simplex(v, torch.ones_like(v), u.expand_as(v))


def lmo_weights_sorted(n: int, cap, like: torch.Tensor) -> torch.Tensor:
    """The LMO vertex in sorted order: clip(1 - j u, 0, u) for j = 0..n-1, eq. (6). Shape (B, n)."""
    u = _as_cap(cap, like)  # (B, 1)
    j = torch.arange(n, dtype=like.dtype, device=like.device)  # (n,)
    return torch.minimum((1.0 - j * u).clamp_min(0.0), u)  # (B, n)


def lmo_value(g: torch.Tensor, cap) -> torch.Tensor:
    """min over the capped simplex of g^T s (cap u = 1 for the simplex), eq. (6). Shape (B,)."""
    g_sorted, _ = torch.sort(g, dim=-1)  # (B, n) ascending
    return (lmo_weights_sorted(g.shape[-1], cap, g) * g_sorted).sum(-1)  # (B,)


def frank_wolfe_gap(g: torch.Tensor, w: torch.Tensor, cap) -> torch.Tensor:
    """g^T w - min_s g^T s >= f(w) - f*, the Frank-Wolfe gap of a convex f with gradient g at w, eq. (7)."""
    return (g * w).sum(-1) - lmo_value(g, cap)  # (B,)


def topk_vertex(b: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """1/k on the k largest entries of each row of b (ties: lowest index first), eq. (8). k (B,) integers."""
    n = b.shape[-1]
    order = torch.sort(b, dim=-1, descending=True, stable=True).indices  # (B, n) stable: low index first
    kk = k.to(device=b.device).reshape(-1, 1)  # (B, 1)
    chosen = torch.arange(n, device=b.device).unsqueeze(0) < kk  # (B, n) in sorted order
    w_sorted = chosen.to(b.dtype) / kk.to(b.dtype)  # (B, n)
    return torch.zeros_like(b).scatter(-1, order, w_sorted)  # (B, n)


class JacobiSet:
    """The feasible set in Jacobi coordinates z = w / a (eq. (9)): {a^T z = 1, 0 <= z <= u / a} or z >= 0."""

    def __init__(self, a: torch.Tensor, cap: torch.Tensor | None, uncapped: bool = False):
        self.a, self.cap, self.uncapped = a, cap, uncapped  # (B, n) and (B,) or None for the cone
        self.h = None if cap is None else cap.unsqueeze(-1) / a  # (B, n) upper bounds on z

    def take(self, keep: torch.Tensor) -> JacobiSet:
        return JacobiSet(self.a[keep], None if self.cap is None else self.cap[keep], self.uncapped)

    def project(self, v: torch.Tensor, exact: bool = True, sort=torch.sort) -> torch.Tensor:
        """Eq. (5'), (5''); exact=False skips the final Newton step on tau (sum to cumsum round-off).
        v (A, n), or (A, m, n) for m points of each problem; sort: see project_weighted_capped_simplex."""
        if self.cap is None:
            return v.clamp_min(0.0)
        a = self.a if v.ndim == 2 else self.a.unsqueeze(1)  # (A, n) or (A, 1, n)
        if self.uncapped:  # cap u >= 1: z_i <= u / a_i is implied by a^T z = 1, z >= 0
            return project_weighted_simplex(v, a, exact, sort)  # eq. (5'')
        return project_weighted_capped_simplex(v, a, self.h if v.ndim == 2 else self.h.unsqueeze(1), exact, sort)

    def certificate(self, g: torch.Tensor, z: torch.Tensor, b: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        """Eq. (13): FW gap in w times unit (simplex sets), or relative Jacobi-scaled KKT residual (cone). (B,)"""
        if self.cap is None:  # scaled problem: lambda_max = 1, so min(z, g) compares like with like
            resid = torch.minimum(z, g).abs().amax(-1)
            return resid / (b.abs().amax(-1) + z.abs().amax(-1)).clamp_min(torch.finfo(z.dtype).tiny)
        return unit * frank_wolfe_gap(g / self.a, z * self.a, self.cap).clamp_min(0.0)  # gradient in w is g / a

    def lift(self, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A feasible point of `dtype` near the lower-precision feasible z, on the same face (eq. (10')).

        Projecting z itself would let tau absorb z's round-off of a^T z = 1 and move every bound
        entry off its bound; moving the bound entries of z far outside first (by 1 / a_i, much more
        than tau a_i) keeps them at their bounds, and the projection only adjusts the free ones."""
        z = z.to(dtype)  # (A, n)
        if self.cap is None:
            return z.clamp_min(0.0)
        far = 1.0 / self.a  # (A, n) no entry of a feasible z exceeds 1 / a_i
        v = torch.where(z <= 0, -far, z)  # (A, n)
        if not self.uncapped:
            v = torch.where(z >= self.h, self.h + far, v)
        return self.project(v)

    def free(self, z: torch.Tensor) -> torch.Tensor:
        if self.cap is None or self.uncapped:
            return z > 0
        return (z > 0) & (z < self.h)  # (B, n)

"""Exact projection onto the (capped) simplex hull of the general gradients, from K and b alone.

Solves, for a cap u = 1/k with 1/n <= u <= 1 (u = 1 is the plain simplex),

    minimize_w  f(w) = 1/2 w^T K w - b^T w          (+ 1/2 c, a constant)
    subject to  0 <= w_i <= u,  1^T w = 1                     # eq. (1) in theory/capped_simplex.md

in two stages:
1. FISTA with adaptive restart (Beck-Teboulle; O'Donoghue-Candes): gradient steps 1/L with
   L = lambda_max(K), each followed by the exact sort-based Euclidean projection onto the set
   (`project_capped_simplex`, eq. (3)). A cheap warm start that guesses which weights sit at 0
   and at u; on its own it is hopeless when K is ill-conditioned (badly scaled samples).
2. A primal active-set method from that point: minimize f on a face of the set by solving the
   equality-constrained KKT system (eq. (4)) by least squares (K_FF may be singular), fix the
   bound that blocks, release the bound whose multiplier has the wrong sign. It is finite and
   exact, whatever the conditioning.

The active-set method stops when the KKT conditions (eq. (2)) hold up to round-off, or when the
Frank-Wolfe gap (eq. (5)) falls below its round-off floor (eq. (8)),

    gap(w) = grad f(w)^T (w - s),   s = argmin_{v in W} grad f(w)^T v     >=  f(w) - f*;

the solver reports converged only if, in addition, the gap is below tol * scale,
scale = max(max_i K_ii, c) (the squared length of the longest vector involved).

Shapes: K (n, n), b (n,), v (n,) -> w (n,).
"""

from __future__ import annotations

import numpy as np


def project_capped_simplex(v: np.ndarray, cap: float) -> np.ndarray:
    """Euclidean projection of v onto {0 <= w <= cap, 1^T w = 1}, exact (eq. (3) in theory/capped_simplex.md).

    The solution is w = clip(v - gamma, 0, cap), where gamma solves phi(gamma) = 1 for the
    non-increasing piecewise-linear phi(gamma) = sum_i clip(v_i - gamma, 0, cap). Its breakpoints
    are v_i and v_i - cap; we sort them, find the segment where phi crosses 1, and interpolate.
    """
    n = v.shape[0]
    if cap * n < 1.0 - 1e-12:
        raise ValueError(f"cap={cap} is below 1/n = {1.0 / n}: the set {{0 <= w <= cap, sum w = 1}} is empty.")
    breaks = np.sort(np.concatenate([v, v - cap]))  # (2n,) ascending, phi is non-increasing along it
    phi = np.clip(v[None, :] - breaks[:, None], 0.0, cap).sum(axis=1)  # (2n,) phi at every breakpoint
    j = int(np.searchsorted(-phi, -1.0, side="right")) - 1  # last breakpoint with phi >= 1
    j = min(max(j, 0), 2 * n - 2)
    lo, hi, phi_lo, phi_hi = breaks[j], breaks[j + 1], phi[j], phi[j + 1]
    slope = phi_lo - phi_hi
    gamma = lo if slope <= 0 else lo + (phi_lo - 1.0) / slope * (hi - lo)  # phi is linear on [lo, hi]
    return np.clip(v - gamma, 0.0, cap)


def linear_minimizer(r: np.ndarray, cap: float) -> np.ndarray:
    """argmin_{s in W} r^T s: fill the cap on the smallest entries of r (the Frank-Wolfe vertex)."""
    order = np.argsort(r, kind="stable")  # (n,)
    s = np.zeros_like(r)
    full = int(np.floor(1.0 / cap + 1e-12))  # entries that get the whole cap
    s[order[:full]] = cap
    if full < r.shape[0]:
        s[order[full]] = max(1.0 - full * cap, 0.0)  # the remainder, for fractional k = 1/cap
    return s


def frank_wolfe_gap(K, b, w, cap, with_floor: bool = False):
    """eq. (5) in theory/capped_simplex.md: an upper bound on f(w) - f*, zero exactly at the optimum.

    with_floor=True also returns the round-off level of the computed gap, eq. (8): below it the
    gap cannot be told from zero.
    """
    r = K @ w - b  # (n,) gradient of f
    step = w - linear_minimizer(r, cap)  # (n,)
    gap = float(r @ step)
    if not with_floor:
        return gap
    floor = 64 * np.finfo(float).eps * float((np.abs(K) @ np.abs(w) + np.abs(b)) @ np.abs(step))
    return gap, floor


def solve_on_face(K, b, zero, upper, cap):
    """Minimize f on the face {w_Z = 0, w_U = cap, 1^T w = 1} (eq. (4)); returns (w, eta, null_dir).

    eta is the common value of the gradient on the free weights (the multiplier of 1^T w = 1).
    K_FF may be singular (duplicate or dependent samples): least squares returns the minimizer
    of least norm, and every minimizer of the face gives the same direction G w. The system is
    solved in Jacobi-scaled form (eq. (4')): samples whose gradient norms span decades would
    otherwise make least squares discard the small ones as noise.
    """
    free = ~(zero | upper)
    nF = int(free.sum())
    w = np.where(upper, cap, 0.0)  # (n,)
    if nF == 0:
        return w, None, None
    # [K_FF 1][w_F ]   [b_F - K_FU cap 1]
    # [1^T  0][-eta] = [1 - |U| cap     ]          eq. (4) in theory/capped_simplex.md
    A = np.zeros((nF + 1, nF + 1))  # (nF+1, nF+1)
    A[:nF, :nF] = K[np.ix_(free, free)]
    A[:nF, nF] = A[nF, :nF] = 1.0
    rhs = np.concatenate([b[free] - K[np.ix_(free, upper)].sum(axis=1) * cap, [1.0 - upper.sum() * cap]])
    # eq. (4'): x = S y with S = diag(K_ii^(-1/2) on F, sigma) gives S A S y = S rhs, unit diagonal on F
    d = np.diag(A)[:nF]  # (nF,)
    a = 1.0 / np.sqrt(np.where(d > 0, d, max(d.max(), 1.0)))  # (nF,) zero columns: any scale
    S = np.append(a, 1.0 / np.linalg.norm(a))  # (nF+1,) sigma = 1 / ||a||: unit norm border column
    A_s, rhs_s = S[:, None] * A * S[None, :], S * rhs  # (nF+1, nF+1), (nF+1,)
    y = np.linalg.lstsq(A_s, rhs_s, rcond=None)[0]  # (nF+1,)
    sol = S * y  # (nF+1,) back to (w_F, -eta)
    w[free] = sol[:nF]
    # a least-squares solve is backward stable (residual ~ eps); a residual far above that means the
    # system has no solution. The residual rho then lies in null(A_s) = S^-1 null(A), so S rho is a
    # null vector of A: K_FF (S rho)_F = -(S rho)_eta 1 and 1^T (S rho)_F = 0, a direction of the face
    # with zero curvature along which f is linear (eq. (9)).
    rho = rhs_s - A_s @ y  # (nF+1,)
    size = np.abs(A_s).max() * np.abs(y).max() + np.abs(rhs_s).max()
    if np.abs(rho).max() <= 1e-10 * size:
        return w, -sol[nF], None
    null_dir = np.zeros_like(w)
    null_dir[free] = a * rho[:nF]
    return w, -sol[nF], null_dir


def _null_direction_step(r, x, p, free, zero, upper, cap, capped):
    """Move along a zero-curvature direction p of the face, downhill, until a bound blocks (eq. (9)).

    Returns None, and the caller steps toward the least-squares point as usual, when no bound blocks
    (p is zero on the free weights: the residual lives only in the multiplier row) or when one blocks
    at length zero (a weight just released, which would be fixed again: a cycle between two faces)."""
    if r @ p > 0:
        p = -p  # f is linear along p: go the way it decreases
    with np.errstate(divide="ignore", invalid="ignore"):
        to_zero = np.where(free & (p < 0), -x / p, np.inf)  # (n,)
        to_cap = np.where(free & (p > 0) & capped, (cap - x) / p, np.inf)  # (n,)
    ratio = np.minimum(to_zero, to_cap)  # (n,)
    if not np.isfinite(ratio).any() or ratio.min() <= 0.0:
        return None  # no bound blocks, or one blocks at once (a weight just released): no move along p
    i = int(np.argmin(ratio))
    x = x + ratio[i] * p  # the face is bounded, so some bound blocks
    (zero if to_zero[i] <= to_cap[i] else upper)[i] = True
    x[i] = 0.0 if zero[i] else cap
    return x


def active_set(K, b, x, cap, max_iter):
    """Primal active-set method (Nocedal-Wright, Alg. 16.3) from a feasible x; returns (x, kkt_reached, iterations).

    Each iteration minimizes f on the current face (eq. (4)); if that point is infeasible it
    steps toward it until the first bound blocks and fixes that weight; if it is feasible it
    releases the fixed weight whose multiplier has the wrong sign (eq. (2), the KKT conditions),
    and stops when none has. f never increases, so the method ends on the optimal face in
    finitely many steps unless it cycles on a degenerate vertex, which max_iter catches.
    A multiplier counts as wrong-signed only beyond the round-off of computing it, eq. (8).
    """
    capped = cap < 1.0  # on the plain simplex the cap w <= 1 is implied by the sum: never fix it
    zero = x <= 0.0
    upper = (x >= cap) if capped else np.zeros_like(zero)
    eps = np.finfo(float).eps
    for it in range(1, max_iter + 1):
        gap, floor = frank_wolfe_gap(K, b, x, cap, with_floor=True)
        if gap <= floor:  # optimal to working precision (this also ends cycling on degenerate faces)
            return x, True, it - 1
        cand, eta, null_dir = solve_on_face(K, b, zero, upper, cap)
        free = ~(zero | upper)
        if null_dir is not None:
            # b has a part outside range(K_FF) (e.g. a Gram matrix rounded in float32): f is linear
            # along a null direction of the face, so follow it downhill to a bound, eq. (9)
            moved = _null_direction_step(K @ x - b, x, null_dir, free, zero, upper, cap, capped)
            if moved is not None:
                x = moved
                continue
        step = cand - x  # (n,) zero on the fixed weights
        with np.errstate(divide="ignore", invalid="ignore"):
            to_zero = np.where(free & (step < 0), -x / step, np.inf)  # (n,) ratio test at w_i = 0
            to_cap = np.where(free & (step > 0) & capped, (cap - x) / step, np.inf)  # (n,) at w_i = cap
        s = min(1.0, to_zero.min(), to_cap.min())
        x = x + s * step
        if s < 1.0:  # a bound blocks: fix the blocking weight and stay on the smaller face
            i = int(np.argmin(np.minimum(to_zero, to_cap)))
            (zero if to_zero[i] <= to_cap[i] else upper)[i] = True
            x[i] = 0.0 if zero[i] else cap
            continue
        r = K @ x - b  # (n,) gradient
        noise = 64 * eps * (np.abs(K) @ np.abs(x) + np.abs(b))  # (n,) round-off in r, eq. (8)
        # optimal on this face: check the multipliers of the fixed weights, eq. (2)
        if eta is None:  # a vertex: move weight from the worst capped to the best zero weight
            if not (zero.any() and upper.any()):  # cap = 1/n: the set is the single point 1/n
                return x, True, it
            i = np.flatnonzero(zero)[np.argmin(r[zero])]
            j = np.flatnonzero(upper)[np.argmax(r[upper])]
            if r[i] >= r[j] - noise[i] - noise[j]:  # KKT holds at the vertex
                return x, True, it
            zero[i] = upper[j] = False
        else:
            viol = np.where(zero, eta - r, 0.0) + np.where(upper, r - eta, 0.0) - noise  # (n,) > 0: wrong sign
            i = int(np.argmax(viol))
            if viol[i] <= 0.0:  # KKT holds on this face
                return x, True, it
            zero[i] = upper[i] = False
    return x, False, max_iter


def solve_capped_simplex_qp(K, b, c, cap: float, max_iter: int | None = None, tol: float = 1e-11,
                            fista_iter: int = 100):
    """FISTA warm start, then the active-set method, for eq. (1); returns (w, info) with the FW gap."""
    n = K.shape[0]
    max_iter = 20 * n + 100 if max_iter is None else max_iter
    scale = float(max(np.max(np.diag(K)), c, np.finfo(float).tiny))
    target_gap = tol * scale
    L = float(np.linalg.eigvalsh(K)[-1])  # Lipschitz constant of grad f
    x = project_capped_simplex(np.full(n, 1.0 / n), cap)  # (n,) feasible start: the mean
    y, t, it = x.copy(), 1.0, 0
    while L > 0.0 and it < fista_iter:  # a warm start only: the active-set method decides
        it += 1
        x_new = project_capped_simplex(y - (K @ y - b) / L, cap)  # eq. (6): projected gradient step
        if (y - x_new) @ (x_new - x) > 0.0:  # adaptive restart: momentum points uphill
            t = 1.0
        t_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        y = x_new + ((t - 1.0) / t_new) * (x_new - x)  # eq. (7): Nesterov extrapolation
        x, t = x_new, t_new
    x, kkt_reached, as_iter = active_set(K, b, x, cap, max_iter)
    gap = frank_wolfe_gap(K, b, x, cap)
    info = {
        # converged: the KKT conditions hold up to round-off, and the gap certifies it
        "converged": bool(kkt_reached and gap <= target_gap),
        "iterations": it + as_iter,
        "certificate": max(gap, 0.0) / scale,  # relative Frank-Wolfe gap, gap / max(max K_ii, c)
        "certificate_kind": "frank_wolfe_gap",
        "fista_iterations": it,
        "active_set_iterations": as_iter,
    }
    return x, info

"""Random and degenerate projection problems, for tests, notebooks and benchmarks.

A problem is a general-gradient matrix G (p, n) and a target gradient g_T (p,), from which
K = G^T G, b = G^T g_T, c = ||g_T||^2 (theory/notation.md, eq. (3)). The families cover the cases a
gradient Gram matrix really shows: rank-deficient G (p < n, or low rank), duplicate samples,
g_T inside span(G) or inside the hull, g_T = 0, badly scaled columns, a single sample.

Shapes:
    G (p, n), g_T (p,)  ->  K (n, n), b (n,), c ()
    random_batch: G (B, p, n), g_T (B, p) -> K (B, n, n), b (B, n), c (B,)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FAMILIES = (
    "gaussian",  # i.i.d. normal columns, p and n free
    "low_rank",  # G = U V^T with rank r < min(p, n): K singular
    "duplicates",  # some columns repeated exactly: K singular, weights not unique
    "in_span",  # g_T = G v: the subspace projection is g_T itself
    "in_hull",  # g_T = G w with w on the simplex: simplex, cone, subspace all reach it
    "zero_target",  # g_T = 0
    "badly_scaled",  # column norms spread over 1e-2 .. 1e2
    "single",  # n = 1
    "correlated",  # columns share a common direction (like real gradients): ill-conditioned K
)
# The families on which a solver can report convergence on a wrong answer (theory/certificates.md): each
# draw mixes the degeneracies, and `scale` moves the whole problem toward either end of the dtype's range.
HARD_FAMILIES = (
    "zero_units",  # some columns exactly zero (GRPO groups with equal rewards)
    "wide",  # more units than the rank: n > p, or rank r < min(p, n)
    "decades",  # column norms over 1e-4 .. 1e4 (K over sixteen decades)
    "target_in_set",  # g_T = G w with w on a face of the simplex (some weights 0): on the set's boundary
    "target_orthogonal",  # g_T orthogonal to span(G): every projection's optimum is w with G w = 0 or the
    "tiny",  # n = 1 or 2, any of the above
)


@dataclass
class Problem:
    """One projection problem with its primal data (for checks in R^p) and Gram data."""

    G: np.ndarray  # (p, n)
    g_T: np.ndarray  # (p,)
    family: str

    @property
    def K(self) -> np.ndarray:
        return self.G.T @ self.G  # (n, n)

    @property
    def b(self) -> np.ndarray:
        return self.G.T @ self.g_T  # (n,)

    @property
    def c(self) -> float:
        return float(self.g_T @ self.g_T)

    @property
    def n(self) -> int:
        return self.G.shape[1]


def random_problem(rng: np.random.Generator, family: str, p: int | None = None, n: int | None = None) -> Problem:
    """Draw one problem of `family` (see FAMILIES); p in [2, 200] and n in [1, 64] unless given."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is unknown; use one of {FAMILIES}.")
    p = int(rng.integers(2, 201)) if p is None else p
    n = (1 if family == "single" else int(rng.integers(2, 65))) if n is None else n
    G = rng.standard_normal((p, n))  # (p, n)
    g_T = rng.standard_normal(p) + 0.5 * G.mean(axis=1)  # (p,) partly aligned with the general data
    if family == "low_rank":
        r = int(rng.integers(1, max(2, min(p, n) // 2) + 1))
        G = rng.standard_normal((p, r)) @ rng.standard_normal((r, n))  # (p, n) rank r
    elif family == "duplicates" and n >= 2:
        idx = rng.integers(0, max(1, n // 2), size=n - n // 2)
        G[:, n // 2 :] = G[:, idx]  # second half copies columns of the first half
    elif family == "in_span":
        g_T = G @ rng.standard_normal(n)  # (p,)
    elif family == "in_hull":
        g_T = G @ rng.dirichlet(np.ones(n))  # (p,)
    elif family == "zero_target":
        g_T = np.zeros(p)
    elif family == "badly_scaled":
        G = G * 10.0 ** rng.uniform(-2, 2, size=n)  # (p, n) column norms over four decades (K: eight)
    elif family == "correlated":
        G = G + 5.0 * rng.standard_normal((p, 1))  # (p, n) a shared component dominates K
    return Problem(G=G, g_T=g_T, family=family)


def hard_problem(rng: np.random.Generator, family: str, scale: float = 1.0) -> Problem:
    """One draw of a HARD_FAMILIES family, all vectors multiplied by `scale`; p in [1, 12], n in [1, 12]."""
    if family not in HARD_FAMILIES:
        raise ValueError(f"family={family!r} is unknown; use one of {HARD_FAMILIES}.")
    n = int(rng.integers(1, 3)) if family == "tiny" else int(rng.integers(2, 13))
    p = int(rng.integers(1, max(2, n))) if family == "wide" else int(rng.integers(1, 13))
    r = int(rng.integers(1, min(p, n) + 1))
    G = rng.standard_normal((p, r)) @ rng.standard_normal((r, n))  # (p, n) rank r
    g_T = rng.standard_normal(p) + 0.5 * G.mean(axis=1)  # (p,)
    if family in ("zero_units", "tiny") or rng.uniform() < 0.3:
        G[:, rng.uniform(size=n) < 0.4] = 0.0  # exact zero units
    if family in ("decades", "tiny") or rng.uniform() < 0.3:
        G = G * 10.0 ** rng.uniform(-4, 4, size=n)  # (p, n)
    if family == "target_in_set" or (family == "tiny" and rng.uniform() < 0.3):
        v = rng.dirichlet(np.ones(n)) * (rng.uniform(size=n) < 0.6)
        g_T = G @ (v / v.sum() if v.sum() > 0 else np.full(n, 1.0 / n))  # (p,) on a face of the hull
    elif family == "target_orthogonal":
        Q = np.linalg.svd(G, full_matrices=True)[0] if G.any() else np.eye(p)
        rank = int(np.linalg.matrix_rank(G)) if G.any() else 0
        g_T = Q[:, rank:] @ rng.standard_normal(p - rank) if rank < p else np.zeros(p)  # (p,)
    return Problem(G=G * scale, g_T=g_T * scale, family=family)


def problem_stream(seed: int, count: int, p_max: int = 200, n_max: int = 64):
    """`count` problems cycling through FAMILIES, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        family = FAMILIES[i % len(FAMILIES)]
        p = int(rng.integers(2, p_max + 1))
        n = 1 if family == "single" else int(rng.integers(2, n_max + 1))
        yield random_problem(rng, family, p=p, n=n)


def random_params(rng: np.random.Generator, method: str, problem: Problem) -> dict:
    """A legal parameter draw for `method` on `problem`, scaled to the problem's own units."""
    n = problem.n
    if method == "mix":
        return {"lam": float(rng.uniform(0, 1))}
    if method == "ball":
        dist = np.linalg.norm(problem.g_T - problem.G.mean(axis=1))
        return {"radius": float(rng.uniform(0, 1.5) * dist)}
    if method == "topk":
        return {"k": int(rng.integers(1, n + 1))}
    if method == "capped_simplex":
        return {"k": float(rng.uniform(1, n))}
    if method == "softmax":
        spread = float(np.ptp(problem.b)) if n > 1 else 0.0
        return {"tau": float(10.0 ** rng.uniform(-1, 1) * max(spread, 1e-3 * (abs(problem.b).max() + 1.0)))}
    if method == "subspace":
        scale = float(np.trace(problem.K)) / n
        return {"ridge": 0.0 if rng.uniform() < 0.5 else float(10.0 ** rng.uniform(-3, 0) * max(scale, 1e-12))}
    return {}

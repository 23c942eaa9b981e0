"""The methods whose projection has a closed form: target, mean, mix, ball, topk and softmax.

Each function solves its program exactly in float64 numpy and returns (alpha, w, info):

    target    C = R^p                          alpha = 1, w = 0              eq. (1) in theory/endpoints.md
    mean      C = {G 1/n}                      alpha = 0, w = 1/n            eq. (2) in theory/endpoints.md
    mix       C = {lam g_T + (1-lam) G 1/n}    alpha = lam, w = (1-lam)/n    eq. (3) in theory/endpoints.md
    ball      C = {d : ||d - G 1/n|| <= r}     alpha = t, w = (1-t)/n        eq. (3) in theory/ball.md
    topk      max b^T w, 0 <= w <= 1/k, 1^T w = 1      w = 1/k on the top-k of b     eq. (3) in theory/topk.md
    softmax   max b^T w - tau KL(w || 1/n), 1^T w = 1  w = softmax(b / tau)          eq. (3) in theory/softmax.md

Shapes: K (n, n), b (n,), c scalar -> alpha scalar, w (n,).
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax


def _closed_info(**extra) -> dict:
    return {"converged": True, "iterations": 0, "certificate": 0.0, "certificate_kind": "closed_form", **extra}


def mean_distance(K, b, c) -> float:
    """||g_T - G 1/n||, from ||g_T||^2 - 2 b^T 1/n + 1^T K 1/n^2 (eq. (2) in theory/ball.md)."""
    n = K.shape[0]
    sq = float(c) - 2.0 * float(b.sum()) / n + float(K.sum()) / n**2
    return float(np.sqrt(max(sq, 0.0)))  # clip round-off below zero: the distance is a norm


def solve_target(K, b, c):
    return 1.0, np.zeros(K.shape[0]), _closed_info()


def solve_mean(K, b, c):
    n = K.shape[0]
    return 0.0, np.full(n, 1.0 / n), _closed_info()


def solve_mix(K, b, c, lam: float):
    n = K.shape[0]
    return lam, np.full(n, (1.0 - lam) / n), _closed_info()


def solve_ball(K, b, c, radius: float):
    """Projection onto the ball around the mean gradient: move from the mean toward g_T by radius."""
    n = K.shape[0]
    dist = mean_distance(K, b, c)
    t = 1.0 if dist <= radius else radius / dist  # eq. (3) in theory/ball.md
    return t, np.full(n, (1.0 - t) / n), _closed_info(mean_distance=dist)


def topk_indices(b: np.ndarray, k: int) -> np.ndarray:
    """The k largest entries of b; ties go to the lowest index (a stable sort of -b)."""
    return np.argsort(-b, kind="stable")[:k]


def solve_topk(K, b, c, k: int):
    """Hard selection: the vertex of the capped simplex that maximizes b^T w (eq. (3) in theory/topk.md)."""
    w = np.zeros(K.shape[0])
    w[topk_indices(b, k)] = 1.0 / k
    return 0.0, w, _closed_info()


def solve_softmax(K, b, c, tau: float):
    """Entropic reweighting: w = softmax(b / tau) maximizes b^T w - tau KL(w || 1/n) (eq. (3) in theory/softmax.md)."""
    with np.errstate(over="ignore"):  # a tiny tau: (b - max b) / tau is -inf off the maximum, exp gives 0
        w = np.exp(log_softmax((b - b.max()) / tau))  # (n,) shifted: b / tau itself may overflow
    return 0.0, w, _closed_info()

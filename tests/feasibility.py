"""The constraints of every method, as the largest violation by (alpha, w): shared by the solver tests."""

import numpy as np


def violation(method, params, alpha, w) -> float:
    """Largest violation of the method's constraints by (alpha, w) (numpy, one problem)."""
    n = w.shape[0]
    if method in ("topk", "capped_simplex", "simplex", "softmax"):
        cap = 1.0 / params["k"] if "k" in params else np.inf
        return max(-w.min(), (w - cap).max(), abs(w.sum() - 1.0))
    if method == "cone":
        return max(-w.min(), 0.0)
    if method == "target":
        return max(abs(alpha - 1.0), np.abs(w).max())
    if method in ("mean", "mix"):
        lam = params.get("lam", 0.0)
        return max(abs(alpha - lam), np.abs(w - (1.0 - lam) / n).max())
    if method == "ball":
        return max(-alpha, alpha - 1.0, np.abs(w - (1.0 - alpha) / n).max())
    return 0.0  # subspace: unconstrained

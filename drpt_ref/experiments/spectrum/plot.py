"""The path of each knob between the two ends of the spectrum, as a picture.

For one problem (K, b, c), sweeps k (capped simplex, n -> 1), tau (softmax, large -> small),
ridge (subspace, large -> 0), radius (ball, 0 -> dist) and lam (mix, 0 -> 1), and plots the
objective 1/2 ||d - g_T||^2 relative to the mean's: 1 is standard training, 0 is target-only.
The nested sets simplex, cone and subspace are drawn as horizontal lines (theory/nesting.md).

Shapes: K (n, n), b (n,), c scalar.
"""

from __future__ import annotations

import numpy as np

from drpt_ref.core.project import project


def knob_paths(K, b, c, points: int = 25) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """knob name -> (strength in [0, 1] from the mean end to the target end, relative objective)."""
    n = K.shape[0]
    f_mean = float(project(K, b, c, "mean").objective) or 1.0
    dist = float(np.sqrt(max(c - 2 * b.sum() / n + K.sum() / n**2, 0.0)))
    s = np.linspace(0.0, 1.0, points)  # (points,) position along each path
    spread = float(np.ptp(b)) or 1.0
    ridge0 = float(np.trace(K)) / n
    sweeps = {
        "capped_simplex k = n..1": [("capped_simplex", {"k": float(n - t * (n - 1))}) for t in s],
        "softmax tau": [("softmax", {"tau": spread * 10.0 ** (3 - 5 * t)}) for t in s],
        "subspace ridge": [("subspace", {"ridge": 0.0 if t == 1 else ridge0 * 10.0 ** (4 - 8 * t)}) for t in s],
        "ball radius": [("ball", {"radius": t * dist}) for t in s],
        "mix lam": [("mix", {"lam": float(t)}) for t in s],
    }
    return {name: (s, np.array([float(project(K, b, c, m, **p).objective) / f_mean for m, p in sweep]))
            for name, sweep in sweeps.items()}


def plot_knob_paths(K, b, c, path: str, points: int = 25) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f_mean = float(project(K, b, c, "mean").objective) or 1.0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (s, rel) in knob_paths(K, b, c, points).items():
        ax.plot(s, rel, marker=".", label=name)
    for method, style in (("simplex", ":"), ("cone", "--"), ("subspace", "-.")):
        ax.axhline(float(project(K, b, c, method).objective) / f_mean, color="gray", ls=style, label=method)
    ax.set_xlabel("knob position: standard training (0) -> target-only (1)")
    ax.set_ylabel("1/2 ||d - g_T||^2 relative to the mean")
    ax.set_title("The bias side of the spectrum: distance to the target gradient")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

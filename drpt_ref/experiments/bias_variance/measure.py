"""Measured bias and variance of each method's update direction, by resampling the target batch.

On a problem whose true target gradient g* is known, draw R target batches of m units, each giving
g_T^(r), project each onto every method's feasible set (fixed general batch G), and measure

    bias^2   = || E_r[d^(r)] - g* ||^2                                  eq. (1) in theory/bias_variance.md
    variance = E_r || d^(r) - E_r[d^(r)] ||^2                            eq. (2)
    mse      = E_r || d^(r) - g* ||^2 = bias^2 + variance                eq. (3)
    dist^2   = || P_C(g*) - g* ||^2, the bias the set alone would cause  eq. (4) (monotone along the chain)

conditional on G, then averaged over S independent general batches (the general noise therefore
shows up in the bias, never in the variance: standard training has variance 0 exactly). Every
number is divided by ||g*||^2. Two problems:

    linear   least squares with synthetic target / general distributions; g* in closed form (this file)
    gpt2     small_models/gpt2-tiny on the task suite; g* = the gradient of a large target set
             (experiments/bias_variance/gpt2.py)

The spectrum (`spectrum`): the nested chain mean -> capped simplex -> simplex -> cone -> subspace ->
target, and one path per knob (k, tau, ridge, radius, lam) from the mean end (position 0) to the weak
end (position 1), with the relative knobs of dr_step.method_params (theory/dr_step.md, eq. (2)).

Shapes:
    G (S, p, n) general unit gradients;  g_T (S, R, p) target-batch gradients;  g* (p,)
    per setting: alpha (R,), w (R, n)  ->  d (R, p) = alpha g_T + w G^T
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from drpt_ref.batched.solve import project_batched
from drpt_ref.training.dr_step import Knobs, method_params

PROBLEMS = ("linear", "gpt2")
CHAIN = ("mean", "capped_simplex", "simplex", "cone", "subspace", "target")  # eq. (1) of theory/nesting.md + R^p
KNOB_PATHS = ("capped_simplex k", "softmax tau", "subspace ridge", "ball radius", "mix lam")


@dataclass(frozen=True)
class Setting:
    """One point of the spectrum: a method and its (relative) knob, at a position in [0, 1]."""

    path: str  # "chain" or one of KNOB_PATHS
    position: float  # 0 = the mean end (strong regularization), 1 = the weak end
    method: str
    knobs: Knobs = field(default_factory=Knobs)
    label: str = ""  # the knob value in words


def spectrum(n: int, points: int = 9) -> list[Setting]:
    """The chain and the knob paths for a general batch of n units, `points` positions per path."""
    if points < 2:
        raise ValueError(f"points={points} must be >= 2 (the two ends of each knob path)")
    k_chain = max(1.0, n / 4)
    chain = [Setting("chain", i / (len(CHAIN) - 1), m, Knobs(k=k_chain), f"k={k_chain:g}" if m == "capped_simplex"
                     else "") for i, m in enumerate(CHAIN)]
    out = list(chain)
    for s in np.linspace(0.0, 1.0, points):
        s = float(s)
        k = float(n ** (1.0 - s))  # k = n (mean) .. 1 (simplex), geometric
        tau = 10.0 ** (2.0 - 4.0 * s)  # tau_rel = 100 (near the mean) .. 0.01 (near top-1)
        ridge = 0.0 if s == 1.0 else 10.0 ** (3.0 - 6.0 * s)  # ridge_rel = 1000 (near the mean) .. 0 (span)
        out += [Setting("capped_simplex k", s, "capped_simplex", Knobs(k=k), f"k={k:.3g}"),
                Setting("softmax tau", s, "softmax", Knobs(tau_rel=tau), f"tau_rel={tau:.3g}"),
                Setting("subspace ridge", s, "subspace", Knobs(ridge_rel=ridge), f"ridge_rel={ridge:.3g}"),
                Setting("ball radius", s, "ball", Knobs(radius_rel=s), f"radius_rel={s:.3g}"),
                Setting("mix lam", s, "mix", Knobs(lam=s), f"lam={s:.3g}")]
    return out


def directions(G: torch.Tensor, gT: torch.Tensor, setting: Setting) -> tuple[torch.Tensor, bool]:
    """d^(r) for the R target batches, one projection per batch, solved as one batch of problems.

    G (p, n), gT (R, p) -> d (R, p), all converged
    """
    R, n = gT.shape[0], G.shape[1]
    K = (G.T @ G).expand(R, n, n)  # (R, n, n): the same general batch for every resample
    b = gT @ G  # (R, n) b^(r) = G^T g_T^(r)
    c = (gT * gT).sum(-1)  # (R,)
    params = method_params(setting.method, setting.knobs, K, b, c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # convergence is recorded instead
        res = project_batched(K, b, c, setting.method, **params)
    d = res.alpha[:, None] * gT + res.weights @ G.T  # (R, p), eq. (1) of theory/notation.md
    return d, bool(res.info["converged"].all())


def measure(G: torch.Tensor, gT: torch.Tensor, g_star: torch.Tensor, settings: list[Setting],
            progress: bool = False) -> list[dict]:
    """bias^2, variance, mse (relative to ||g*||^2) of every setting, averaged over the S general draws.

    G (S, p, n), gT (S, R, p), g_star (p,) -> one row per setting
    """
    if G.dim() != 3 or gT.dim() != 3 or G.shape[0] != gT.shape[0] or G.shape[1] != gT.shape[2]:
        raise ValueError(f"G must be (S, p, n) and gT (S, R, p); got {tuple(G.shape)} and {tuple(gT.shape)}")
    scale = float(g_star @ g_star)
    if not scale > 0:
        raise ValueError("g_star must be nonzero: the numbers are relative to ||g*||^2")
    R = gT.shape[1]
    rows = []
    for st in tqdm(settings, desc="bias-variance", disable=not progress):
        bias2, var, dist2, ok = 0.0, 0.0, 0.0, True
        for G_s, gT_s in zip(G, gT):
            d, conv = directions(G_s, gT_s, st)
            d_bar = d.mean(0)  # (p,) E_r d^(r)
            bias2 += float(((d_bar - g_star) ** 2).sum()) / len(G)  # eq. (1)
            var += float(((d - d_bar) ** 2).sum(-1).mean()) / len(G)  # eq. (2)
            d_star, conv_star = directions(G_s, g_star[None], st)  # the noise-free projection P_C(g*)
            dist2 += float(((d_star[0] - g_star) ** 2).sum()) / len(G)  # eq. (4): dist(g*, C)^2
            ok &= conv and conv_star
        rows.append(dict(path=st.path, position=st.position, method=st.method, knob=st.label,
                         bias2=bias2 / scale, variance=var / scale, mse=(bias2 + var) / scale,
                         dist2=dist2 / scale, mc_floor=var / scale / R, converged=ok))
    return rows


# ---- the linear problem ----------------------------------------------------------------------------------------

@dataclass
class LinearConfig:
    """Least squares, loss 1/2 (x . theta - y)^2, x ~ N(0, I_p), y = x . theta_c + noise, at theta = 0."""

    dim: int = 40  # p, the number of parameters
    n_general: int = 24  # n, general units per batch (the columns of G)
    m_target: int = 2  # m, target units per batch (scarce: the target-only direction is noisy)
    unit_size: int = 32  # samples per unit: a unit's loss is their mean (the tokens of one sequence)
    noise: float = 0.5  # sigma, the label noise of every task
    helpful: float = 0.25  # share of general units from the helpful task (theta_h near theta_T)
    misaligned: float = 0.25  # share from the misaligned task (theta_m = -theta_T: gradient -g*)
    unrelated_tasks: int = 3  # the rest is split evenly over this many unrelated tasks (random theta_u)
    helpful_scale: float = 0.5  # theta_h = helpful_scale theta_T + shift: aligned with the target, weaker
    helpful_shift: float = 0.3  # ||shift|| / ||theta_T||
    resamples: int = 400  # R target batches per general batch
    general_draws: int = 8  # S general batches (bias and variance are conditional on G, then averaged)
    seed: int = 0


def _unit_gradients(rng: np.random.Generator, theta_c: np.ndarray, shape: tuple, cfg: LinearConfig) -> np.ndarray:
    """Gradients at theta = 0 of units drawn from task(s) theta_c.

    theta_c (*shape, p) -> (*shape, p): g = X^T (X 0 - y) / s with X (s, p), y = X theta_c + sigma eps
    """
    X = rng.standard_normal(shape + (cfg.unit_size, cfg.dim))  # (*shape, s, p)
    y = np.einsum("...sp,...p->...s", X, theta_c) + cfg.noise * rng.standard_normal(shape + (cfg.unit_size,))
    return -np.einsum("...sp,...s->...p", X, y) / cfg.unit_size


def linear_problem(cfg: LinearConfig):
    """G (S, p, n), g_T (S, R, p), g* (p,) and the task of each general unit (n,), all seeded by cfg.seed.

    The target population gradient at theta = 0 is g* = E[x x^T](0 - theta_T) = -theta_T (eq. (4)).
    """
    for name in ("dim", "n_general", "m_target", "unit_size", "resamples", "general_draws", "unrelated_tasks"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 1")
    if not (0 <= cfg.helpful and 0 <= cfg.misaligned and cfg.helpful + cfg.misaligned <= 1):
        raise ValueError(f"helpful={cfg.helpful} and misaligned={cfg.misaligned} must be shares summing to <= 1")
    rng = np.random.default_rng(cfg.seed)
    p, n = cfg.dim, cfg.n_general
    theta_T = rng.standard_normal(p)
    theta_T /= np.linalg.norm(theta_T)  # ||g*|| = 1
    shift = rng.standard_normal(p)
    theta_h = cfg.helpful_scale * theta_T + cfg.helpful_shift * shift / np.linalg.norm(shift)
    theta_u = rng.standard_normal((cfg.unrelated_tasks, p)) / math.sqrt(p)  # unit norm on average, ~orthogonal
    n_h, n_m = round(cfg.helpful * n), round(cfg.misaligned * n)
    tasks = ["helpful"] * n_h + ["misaligned"] * n_m + [f"unrelated{i % cfg.unrelated_tasks}" for i in
                                                        range(n - n_h - n_m)]
    theta_of = {"helpful": theta_h, "misaligned": -theta_T,
                **{f"unrelated{i}": theta_u[i] for i in range(cfg.unrelated_tasks)}}
    theta_c = np.stack([theta_of[t] for t in tasks])  # (n, p)
    S, R, m = cfg.general_draws, cfg.resamples, cfg.m_target
    G = _unit_gradients(rng, np.broadcast_to(theta_c, (S, n, p)), (S, n), cfg).transpose(0, 2, 1)  # (S, p, n)
    gT = _unit_gradients(rng, np.broadcast_to(theta_T, (S, R, m, p)), (S, R, m), cfg).mean(2)  # (S, R, p)
    return torch.from_numpy(G.copy()), torch.from_numpy(gT), torch.from_numpy(-theta_T), tasks


def run_linear(cfg: LinearConfig, points: int = 9, progress: bool = False) -> list[dict]:
    """The rows of the linear problem's spectrum."""
    G, gT, g_star, _ = linear_problem(cfg)
    return measure(G, gT, g_star, spectrum(cfg.n_general, points), progress)


def chain_rows(rows: list[dict]) -> list[dict]:
    """The rows of the nested chain, in the order of CHAIN."""
    return sorted((r for r in rows if r["path"] == "chain"), key=lambda r: r["position"])

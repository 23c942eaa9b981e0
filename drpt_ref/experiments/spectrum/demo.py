"""`drpt spectrum`: every method of the family on one synthetic problem, checked against cvxpy.

Draws a general batch G (p, n) and a target gradient g_T from a family of `core/instances.py`, solves
every projection with the exact solver and with its cvxpy program, and prints one table: the
knob, alpha, the objective 1/2 ||d - g_T||^2, the cvxpy objective and the gap between them, the
solver's certificate, and the weights' support. It then checks the nesting of the sets
(theory/nesting.md, eq. (2)) and, with --plot, draws the bias-variance path of each knob.

    drpt spectrum                          # the shipped defaults: p = 200, n = 32, gaussian family
    drpt spectrum --family duplicates --n 64 --seed 3 --plot spectrum.png

Shapes: G (p, n), g_T (p,) -> K (n, n), b (n,), c scalar.
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass

import numpy as np

from drpt_ref.core.instances import FAMILIES, random_problem
from drpt_ref.core.methods import METHODS
from drpt_ref.core.project import project
from drpt_ref.flags import add_config_arguments


@dataclass
class SpectrumConfig:
    p: int = 200  # parameters (rows of G); the Gram form never sees them
    n: int = 32  # general samples in the batch
    family: str = "gaussian"  # problem family from drpt_ref.core.instances.FAMILIES
    seed: int = 0  # seed of the problem draw
    k: float = 4.0  # selection size for topk (rounded) and capped_simplex
    tau_rel: float = 0.3  # softmax temperature, relative to the spread of b
    ridge_rel: float = 0.1  # subspace ridge, relative to the mean diagonal of K
    radius_rel: float = 0.5  # ball radius, relative to ||g_T - mean||
    lam: float = 0.5  # mix coefficient


def default_params(cfg: SpectrumConfig, K, b, c) -> dict[str, dict]:
    """The knob of each method, scaled to the problem's own units."""
    n = K.shape[0]
    dist = float(np.sqrt(max(c - 2 * b.sum() / n + K.sum() / n**2, 0.0)))
    spread = float(np.ptp(b)) or 1.0
    return {
        "target": {},
        "mean": {},
        "mix": {"lam": cfg.lam},
        "ball": {"radius": cfg.radius_rel * dist},
        "topk": {"k": int(min(max(round(cfg.k), 1), n))},
        "capped_simplex": {"k": float(min(max(cfg.k, 1.0), n))},
        "simplex": {},
        "softmax": {"tau": cfg.tau_rel * spread},
        "cone": {},
        "subspace": {"ridge": cfg.ridge_rel * float(np.trace(K)) / n},
    }


def make_problem(cfg: SpectrumConfig):
    """The one synthetic problem of the run, drawn from the config's family and seed."""
    return random_problem(np.random.default_rng(cfg.seed), cfg.family, p=cfg.p, n=cfg.n)


def run_spectrum(cfg: SpectrumConfig) -> list[dict]:
    """Solve every method exactly and with cvxpy; return one row per method."""
    pr = make_problem(cfg)
    K, b, c = pr.K, pr.b, pr.c
    rows = []
    for method, params in default_params(cfg, K, b, c).items():
        t0 = time.perf_counter()
        exact = project(K, b, c, method, **params)
        t1 = time.perf_counter()
        with warnings.catch_warnings():  # an inaccurate reference shows in the table as its status
            warnings.simplefilter("ignore")
            ref = project(K, b, c, method, solver="cvxpy", **params)
        t2 = time.perf_counter()
        rows.append({
            "method": method,
            "params": ", ".join(f"{k}={v:.3g}" for k, v in params.items()) or "-",
            "alpha": float(exact.alpha),
            "objective": float(exact.objective),
            "value_gap": abs(exact.info["program_value"] - ref.info["program_value"]),
            "cvxpy_status": ref.info["status"],
            "certificate": f"{exact.info['certificate_kind']}={exact.info['certificate']:.1e}",
            "support": int(np.count_nonzero(np.asarray(exact.weights) > 1e-12)),
            "ms_exact": 1e3 * (t1 - t0),
            "ms_cvxpy": 1e3 * (t2 - t1),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'method':<15}{'params':<22}{'alpha':>7}{'objective':>13}{'|exact-cvxpy|':>15}  " \
           f"{'certificate':<34}{'support':>8}{'ms exact':>10}{'ms cvxpy':>10}  cvxpy status"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<15}{r['params']:<22}{r['alpha']:>7.3f}{r['objective']:>13.6g}"
                     f"{r['value_gap']:>15.2e}  {r['certificate']:<34}{r['support']:>8d}"
                     f"{r['ms_exact']:>10.2f}{r['ms_cvxpy']:>10.2f}  {r['cvxpy_status']}")
    return "\n".join(lines)


def nesting_holds(rows: list[dict], cfg: SpectrumConfig) -> bool:
    """subspace(ridge=0) <= cone <= simplex <= capped_simplex <= mean (theory/nesting.md, eq. (2))."""
    pr = make_problem(cfg)
    f = {r["method"]: r["objective"] for r in rows}
    chain = [float(project(pr.K, pr.b, pr.c, "subspace").objective)]
    chain += [f[m] for m in ("cone", "simplex", "capped_simplex", "mean")]
    return all(a <= b_ * (1 + 1e-9) + 1e-12 for a, b_ in zip(chain, chain[1:]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, SpectrumConfig, {"family": FAMILIES})
    parser.add_argument("--plot", default=None, metavar="PNG", help="also draw the objective along each knob")


def run(args: argparse.Namespace) -> int:
    cfg = SpectrumConfig(**{k: getattr(args, k) for k in SpectrumConfig().__dict__})
    if cfg.n < 1 or cfg.p < 1:
        raise SystemExit(f"--n and --p must be >= 1 (got n={cfg.n}, p={cfg.p}).")
    rows = run_spectrum(cfg)
    print(f"Dr. Post-Training projections: family={cfg.family}, p={cfg.p}, n={cfg.n}, seed={cfg.seed}")
    print(format_table(rows))
    ok = nesting_holds(rows, cfg)
    worst = max(r["value_gap"] for r in rows)
    print(f"\nnesting subspace <= cone <= simplex <= capped_simplex <= mean: {'holds' if ok else 'VIOLATED'}")
    print(f"worst |exact - cvxpy| program value: {worst:.2e}   methods: {len(METHODS)}")
    if args.plot:
        from drpt_ref.experiments.spectrum.plot import plot_knob_paths

        pr = make_problem(cfg)
        plot_knob_paths(pr.K, pr.b, pr.c, args.plot)
        print(f"plot written to {args.plot}")
    return 0 if ok else 1

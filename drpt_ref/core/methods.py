"""The catalogue of feasible sets: method names, their parameters, and the checks on them.

Every method of the family projects the target gradient g_T onto a feasible set C and returns
d = alpha * g_T + G w (theory/notation.md, eq. (1)). This file is the single place that says
which methods exist, which parameters each takes, and what values are legal, so that the exact
solvers (`project`), the cvxpy programs (`cvxpy_program`) and the batched torch solvers
(`project_batched`) all refuse the same bad input with the same message.

    method           parameter        set (theory note)
    target           -                all of R^p                         theory/endpoints.md
    mean             -                {mean of G}                        theory/endpoints.md
    mix              lam in [0, 1]    {lam g_T + (1 - lam) mean}         theory/endpoints.md
    ball             radius >= 0      ball(mean, radius)                 theory/ball.md
    topk             k int in [1, n]  LP over the capped simplex         theory/topk.md
    capped_simplex   k real in [1, n] {0 <= w <= 1/k, sum w = 1}         theory/capped_simplex.md
    simplex          -                conv(G)                            theory/simplex.md
    softmax          tau > 0          entropic LP over the simplex       theory/softmax.md
    cone             -                {G w : w >= 0}                     theory/cone.md
    subspace         ridge >= 0       span(G) (+ ridge toward 1/n)       theory/subspace.md

Shapes: parameters are Python scalars here; `project_batched` also accepts (B,) tensors and
checks them elementwise with the same rules.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

# name -> {parameter: default}; a default of None means the parameter is required.
METHODS: dict[str, dict[str, float | int | None]] = {
    "target": {},
    "mean": {},
    "mix": {"lam": None},
    "ball": {"radius": None},
    "topk": {"k": None},
    "capped_simplex": {"k": None},
    "simplex": {},
    "softmax": {"tau": None},
    "cone": {},
    "subspace": {"ridge": 0.0},
}

# The nested chain of G-spanned sets, innermost first (theory/nesting.md, eq. (1)).
NESTED_CHAIN = ("mean", "capped_simplex", "simplex", "cone", "subspace")


def _is_real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def check_method(method) -> str:
    """Return `method` if it is a known method name, else raise a ValueError listing them."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(
            f"method={method!r} is not a known method; use one of {sorted(METHODS)} "
            "(see drpt_ref/core/methods.py for what each one projects onto)."
        )
    return method


def check_scalar_param(method: str, name: str, value, n: int) -> float | int:
    """Validate one scalar parameter of `method` for a problem with n general samples."""
    if name == "k" and method == "topk":
        if not isinstance(value, Integral) or isinstance(value, bool):
            raise ValueError(
                f"k={value!r} for method 'topk' must be an integer in [1, n={n}]; "
                "for a fractional k use method 'capped_simplex'."
            )
        if not 1 <= value <= n:
            raise ValueError(f"k={value} for method 'topk' must lie in [1, n={n}] (n = number of general samples).")
        return int(value)
    if not _is_real(value) or not math.isfinite(float(value)):
        raise ValueError(f"{name}={value!r} for method {method!r} must be a finite real number.")
    value = float(value)
    if name == "k" and not 1.0 <= value <= n:
        raise ValueError(
            f"k={value} for method 'capped_simplex' must lie in [1, n={n}]: the cap 1/k must allow sum w = 1 "
            "(k = 1 is the simplex, k = n is the mean)."
        )
    if name == "lam" and not 0.0 <= value <= 1.0:
        raise ValueError(f"lam={value} for method 'mix' must lie in [0, 1] (0 = mean, 1 = target).")
    if name == "radius" and value < 0.0:
        raise ValueError(f"radius={value} for method 'ball' must be >= 0 (0 = mean, large = target).")
    if name == "tau" and value <= 0.0:
        raise ValueError(
            f"tau={value} for method 'softmax' must be > 0 (tau -> 0 is top-1 selection, use method 'topk' with k=1)."
        )
    if name == "ridge" and value < 0.0:
        raise ValueError(f"ridge={value} for method 'subspace' must be >= 0 (0 = plain projection onto span(G)).")
    return value


def check_solver_options(max_iter, tol) -> None:
    """Refuse a bad iteration limit or tolerance (None keeps the solver's default)."""
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, Integral) or max_iter < 1):
        raise ValueError(f"max_iter={max_iter!r} must be an integer >= 1 (or None for the solver's default).")
    if tol is not None and (not _is_real(tol) or not math.isfinite(float(tol)) or float(tol) < 0.0):
        raise ValueError(f"tol={tol!r} must be a finite real number >= 0 (or None for the solver's default; "
                         "0 runs to max_iter unless the certificate is exactly 0).")


def fill_params(method: str, params: dict) -> dict:
    """The parameters of `method` with defaults filled; refuses unknown and missing ones (values unchecked)."""
    check_method(method)
    spec = METHODS[method]
    unknown = sorted(set(params) - set(spec))
    if unknown:
        allowed = ", ".join(sorted(spec)) or "none"
        raise ValueError(f"unknown parameter(s) {unknown} for method {method!r}; it takes: {allowed}.")
    missing = [name for name, default in spec.items() if name not in params and default is None]
    if missing:
        raise ValueError(f"method {method!r} needs the parameter {missing[0]!r} (see drpt_ref/core/methods.py).")
    return {name: params.get(name, default) for name, default in spec.items()}


def check_params(method: str, params: dict, n: int) -> dict:
    """Fill defaults, refuse unknown or missing parameters, and validate each value."""
    return {name: check_scalar_param(method, name, value, n) for name, value in fill_params(method, params).items()}

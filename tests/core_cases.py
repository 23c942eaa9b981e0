"""The shared bank of core test cases: random problems, a parameter draw per method, and the
exact and cvxpy solutions, computed once per test session (about half a minute)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from conftest import N_CORE_PROBLEMS

from drpt_ref import METHODS, Direction, project, solve_cvxpy
from drpt_ref.core.instances import Problem, problem_stream, random_params


@dataclass
class Case:
    problem: Problem
    method: str
    params: dict
    exact: Direction
    ref_alpha: float
    ref_w: np.ndarray
    ref_info: dict


@functools.lru_cache(maxsize=1)
def core_cases() -> dict[str, list[Case]]:
    """method -> N_CORE_PROBLEMS cases over all families (p in [2, 200], n in [1, 64])."""
    rng = np.random.default_rng(2026)
    out: dict[str, list[Case]] = {m: [] for m in METHODS}
    for problem in problem_stream(seed=7, count=N_CORE_PROBLEMS, p_max=200, n_max=64):
        K, b, c = problem.K, problem.b, problem.c
        for method in METHODS:
            params = random_params(rng, method, problem)
            exact = project(K, b, c, method, **params)
            alpha, w, info = solve_cvxpy(K, b, c, method, **params)
            out[method].append(Case(problem, method, params, exact, alpha, w, info))
    return out


def joint_gram(problem: Problem) -> np.ndarray:
    """J = [[c, b^T], [b, K]] (n+1, n+1): the Gram matrix of (g_T, G), for direction distances."""
    F = np.column_stack([problem.g_T, problem.G])  # (p, n+1)
    return F.T @ F


def direction_gap_sq(problem: Problem, a1, w1, a2, w2) -> float:
    """||d1 - d2||^2 with d = alpha g_T + G w, computed in the primal (not from the solver's K)."""
    d1 = a1 * problem.g_T + problem.G @ w1  # (p,)
    d2 = a2 * problem.g_T + problem.G @ w2  # (p,)
    return float(np.sum((d1 - d2) ** 2))

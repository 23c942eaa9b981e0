"""The bank of batched problems for the tests of `project_batched`, with their cvxpy references.

Per method, BATCHED_PROBLEMS_PER_METHOD problems from every family of drpt_ref.core.instances, in
batches of one n each (a batch shares n): many small batches (n <= 64), one batch of B = 256 and
one of n = 256, plus n = 1 (the "single" family). References are solved once per session by
`solve_cvxpy` (Clarabel at 1e-11 gaps, float64) and shared by the float64 and float32 tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from conftest import BATCH_SHAPES

from drpt_ref.core.direction import program_value
from drpt_ref.core.instances import FAMILIES, Problem, random_params, random_problem
from drpt_ref.core.programs_cvxpy import solve_cvxpy


@dataclass
class Batch:
    problems: list[Problem]
    params: list[dict]  # one dict per problem
    ref_alpha: np.ndarray  # (B,)
    ref_w: np.ndarray  # (B, n)
    ref_value: np.ndarray  # (B,) the program's value at the cvxpy solution

    def tensors(self, dtype=torch.float64):
        K = torch.tensor(np.stack([p.K for p in self.problems]), dtype=dtype)  # (B, n, n)
        b = torch.tensor(np.stack([p.b for p in self.problems]), dtype=dtype)  # (B, n)
        c = torch.tensor(np.array([p.c for p in self.problems]), dtype=dtype)  # (B,)
        return K, b, c

    def param_tensors(self, method, dtype=torch.float64):
        """Per-problem parameters as (B,) tensors (k of topk: int64)."""
        if not self.params[0]:
            return {}
        return {name: torch.tensor([q[name] for q in self.params], dtype=torch.long if method == "topk" else dtype)
                for name in self.params[0]}


def make_batch(rng: np.random.Generator, method: str, B: int, n: int) -> Batch:
    families = ["single"] if n == 1 else [f for f in FAMILIES if f != "single"]
    problems = [random_problem(rng, families[i % len(families)], n=n) for i in range(B)]
    params = [random_params(rng, method, p) for p in problems]
    alphas, ws, values = [], [], []
    for p, prm in zip(problems, params):
        alpha, w, info = solve_cvxpy(p.K, p.b, p.c, method, **prm)
        alphas.append(alpha)
        ws.append(w)
        values.append(program_value(p.K, p.b, p.c, method, prm, alpha, w))
    return Batch(problems, params, np.array(alphas), np.stack(ws), np.array(values))


@cache
def batched_bank(method: str) -> tuple[Batch, ...]:
    rng = np.random.default_rng(2026 + sorted(FAMILIES).index("gaussian") + len(method))
    return tuple(make_batch(rng, method, B, n) for B, n in BATCH_SHAPES)


def f32_scale(method: str, problem: Problem, params: dict, ref: float) -> float:
    """The size of the terms of the program value (theory/batched_solvers.md, section 5): the float32
    tolerance is F32_RTOL times this (||b||_inf + tau log n for the topk and softmax values)."""
    if method in ("topk", "softmax"):
        return np.abs(problem.b).max() + params.get("tau", 0.0) * np.log(problem.n)
    return abs(ref) + 0.5 * problem.c + 0.5 * np.diag(problem.K).max()


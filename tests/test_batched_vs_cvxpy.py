"""`project_batched` against the cvxpy programs and against `project` (issue 3, acceptance 1-2).

Every method, on the bank of tests/batched_cases.py (>= 1,000 problems per method, all families,
B up to 256, n up to 256): the program values agree with cvxpy within OBJ_RTOL |ref| + OBJ_ATOL in
float64 and within F32_RTOL * scale in float32; the weights are feasible within FEAS_TOL; every
problem is certified (converged mask) with no warning; and each member equals `project` solved
alone (objective, and direction in the K-norm, since weights are not unique when K is singular).
"""

import warnings

import numpy as np
import pytest
import torch
from batched_cases import batched_bank, f32_scale
from conftest import BATCH_SHAPES, F32_RTOL, FEAS_TOL, N_EQUIV_PROBLEMS, obj_tol
from feasibility import violation

from drpt_ref import METHODS, project_batched
from drpt_ref.core.direction import program_value


def solve_bank(method, dtype):
    """project_batched on every batch of the bank; fails on any warning (a non-converged problem)."""
    out = []
    for batch in batched_bank(method):
        K, b, c = batch.tensors(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            out.append(project_batched(K, b, c, method, **batch.param_tensors(method, dtype)))
    return out


def test_bank_covers_the_issue():
    assert sum(B for B, _ in BATCH_SHAPES) >= 1000
    assert max(B for B, _ in BATCH_SHAPES) == 256 and max(n for _, n in BATCH_SHAPES) == 256


@pytest.mark.parametrize("method", sorted(METHODS))
def test_float64_matches_cvxpy_and_is_feasible(method):
    bad, worst_feas = [], 0.0
    for batch, res in zip(batched_bank(method), solve_bank(method, torch.float64)):
        assert bool(res.info["converged"].all()), res.info["certificate"].max()
        values = res.info["program_value"].numpy()
        for i, p in enumerate(batch.problems):
            alpha, w = float(res.alpha[i]), res.weights[i].numpy()
            # the reported objective is eq. (2) at the returned weights, recomputed here in numpy
            mine = program_value(p.K, p.b, p.c, method, batch.params[i], alpha, w)
            assert abs(mine - values[i]) <= obj_tol(mine), (method, i, mine, values[i])
            ref = batch.ref_value[i]
            if not abs(mine - ref) <= obj_tol(ref):
                bad.append((p.family, p.n, mine, ref))
            worst_feas = max(worst_feas, violation(method, batch.params[i], alpha, w))
    assert not bad, f"{len(bad)} objective mismatches vs cvxpy, first: {bad[:3]}"
    assert worst_feas <= FEAS_TOL


@pytest.mark.parametrize("method", sorted(METHODS))
def test_float32_within_stated_tolerance(method):
    bad = []
    for batch, res in zip(batched_bank(method), solve_bank(method, torch.float32)):
        for i, p in enumerate(batch.problems):
            alpha, w = float(res.alpha[i]), res.weights[i].double().numpy()
            mine = program_value(p.K, p.b, p.c, method, batch.params[i], alpha, w)
            ref = batch.ref_value[i]
            scale = f32_scale(method, p, batch.params[i], ref)
            if not abs(mine - ref) <= F32_RTOL * scale + 1e-30:
                bad.append((p.family, p.n, mine, ref, scale))
            assert violation(method, batch.params[i], alpha, w) <= 1e-5  # float32 round-off of a sum of n
    assert not bad, f"{len(bad)} float32 mismatches, first: {bad[:3]}"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_batched_equals_project_on_each_member(method):
    from drpt_ref import project

    checked = 0
    for batch, res in zip(batched_bank(method), solve_bank(method, torch.float64)):
        for i, p in enumerate(batch.problems[: max(1, N_EQUIV_PROBLEMS // len(BATCH_SHAPES))]):
            one = project(p.K, p.b, p.c, method, **batch.params[i])
            alpha, w = float(res.alpha[i]), res.weights[i].numpy()
            assert abs(float(res.objective[i]) - float(one.objective)) <= obj_tol(float(one.objective))
            # the same direction: ||d1 - d2||^2 = (w1-w2)^T K (w1-w2) - 2 (a1-a2) b^T (w1-w2) + (a1-a2)^2 c
            dw, da = w - one.weights, alpha - float(one.alpha)
            gap = dw @ p.K @ dw + 2 * da * (p.b @ dw) + da * da * p.c
            scale = p.c + np.diag(p.K).max()
            assert gap <= 1e-6 * scale + 1e-12, (method, p.family, gap, scale)
            checked += 1
    assert checked >= N_EQUIV_PROBLEMS * 0.9

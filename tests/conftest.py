"""Shared tolerances and fixtures. Every tolerance is defined once, here, with its reason."""

import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# --- core (issue 2): exact solvers against the cvxpy programs, float64 ---------------------------
# The acceptance bar of the issue. Clarabel is run at 1e-11 gaps, so its own error is far below it.
OBJ_RTOL = 1e-7
OBJ_ATOL = 1e-9
# Bounds and sums of the exact solvers' weights: they are clipped/projected exactly, so only
# round-off of a sum of n <= 256 terms remains (n * eps ~ 6e-14); 1e-9 is the bar.
FEAS_TOL = 1e-9
# Number of random problems per method (the issue asks for at least 500).
N_CORE_PROBLEMS = 504


def obj_tol(reference: float) -> float:
    """The allowed objective gap against a reference value."""
    return OBJ_RTOL * abs(reference) + OBJ_ATOL


@pytest.fixture(autouse=True)
def _quiet_cvxpy():
    """cvxpy warns on 'optimal_inaccurate'; the tests judge the numbers themselves."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Solution may be inaccurate")
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --- batched solvers (issue 3): project_batched against cvxpy --------------------------------------
# (B, n) of the batches every method is tested on: 1,016 problems per method, most of them small
# (cvxpy costs ~5 ms each), one batch with B = 256 and one with n = 256 (the extremes), and
# n = 1. The float64 bar is OBJ_RTOL/OBJ_ATOL and FEAS_TOL above, the issue's.
BATCH_SHAPES = ((256, 6), (4, 256), (8, 1), (64, 2), (64, 3), (64, 5), (64, 8), (64, 12), (64, 16),
                (64, 10), (64, 20), (64, 24), (48, 32), (48, 40), (40, 48), (36, 64))
# float32: |f32 - f_ref| <= F32_RTOL * scale, scale = |f_ref| + c/2 + max_i K_ii/2 (the size of the terms
# of eq. (2)) or ||b||_inf + tau log n for the topk/softmax program values. The entries of K, b, c
# themselves carry a relative error of eps32 = 6e-8 and evaluating eq. (2) adds n * eps32 <= 1.5e-5
# (n <= 256); the float32 certificate tolerance is 2e-5 (DEFAULT_TOL in batched/qp.py). 1e-4 is
# that error with a 5x margin (theory/batched_solvers.md, section 5).
F32_RTOL = 1e-4
# How many members of each method's bank are also solved by drpt_ref.core.project one at a time.
N_EQUIV_PROBLEMS = 200

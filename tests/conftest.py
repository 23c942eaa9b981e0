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

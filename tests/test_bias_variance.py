"""The claim of theory/bias_variance.md on the linear problem: as the feasible set grows, the measured bias
falls and the measured variance rises. Computed from resampled projections (small, seeded), never hard-coded."""

import numpy as np
import pytest
import torch

from drpt_ref.experiments.bias_variance.measure import (
    CHAIN,
    LinearConfig,
    chain_rows,
    linear_problem,
    measure,
    spectrum,
)

SMALL = LinearConfig(dim=20, n_general=12, resamples=100, general_draws=4, seed=0)
PATH_TOL = 0.02  # allowed step against the trend along a knob path, relative to ||g*||^2 (Monte Carlo noise)
PROJECTION_PATHS = ("capped_simplex k", "subspace ridge", "ball radius", "mix lam")  # softmax is no projection


@pytest.fixture(scope="module")
def rows():
    G, gT, g_star, _ = linear_problem(SMALL)
    return measure(G, gT, g_star, spectrum(SMALL.n_general, points=5))


def test_chain_bias_falls_and_variance_rises(rows):
    chain = chain_rows(rows)
    assert [r["method"] for r in chain] == list(CHAIN)
    main = [r for r in chain if r["method"] in ("mean", "simplex", "cone", "subspace", "target")]
    bias = np.array([r["bias2"] for r in main])
    var = np.array([r["variance"] for r in main])
    assert np.all(np.diff(bias) < 0), f"bias^2 along mean -> simplex -> cone -> subspace -> target: {bias}"
    assert np.all(np.diff(var) > 0), f"variance along the chain: {var}"
    dist2 = np.array([r["dist2"] for r in chain])  # the noise-free part, ordered by nesting (eq. (4))
    assert np.all(np.diff(dist2) <= 1e-6), f"dist(g*, C)^2 along the chain: {dist2}"
    assert var[0] < 1e-20  # standard training does not see the target batch
    assert bias[-1] < 3 * main[-1]["mc_floor"]  # target-only is unbiased up to the Monte Carlo floor
    capped = chain[1]
    assert bias[1] <= capped["bias2"] <= bias[0] and 0 < capped["variance"] <= var[1]  # between mean and simplex
    assert all(r["converged"] for r in rows)


@pytest.mark.parametrize("path", PROJECTION_PATHS)
def test_knob_paths_trade_bias_for_variance(rows, path):
    sub = sorted((r for r in rows if r["path"] == path), key=lambda r: r["position"])
    bias = np.array([r["bias2"] for r in sub])
    var = np.array([r["variance"] for r in sub])
    assert np.all(np.diff(bias) <= PATH_TOL), f"{path}: bias^2 {bias}"
    assert np.all(np.diff(var) >= -PATH_TOL), f"{path}: variance {var}"
    assert bias[-1] < bias[0] - 0.5 and var[-1] > var[0] + 0.02  # the path moves, end to end


def test_mix_is_exact():
    """mix is linear in g_T: bias^2 = (1 - lam)^2 ||mean - g*||^2 and variance = lam^2 var(g_T), eq. (5)."""
    G, gT, g_star, _ = linear_problem(SMALL)
    mix = [st for st in spectrum(SMALL.n_general, points=3) if st.path == "mix lam"]
    rows = {r["position"]: r for r in measure(G, gT, g_star, mix)}
    lam = 0.5
    scale = float(g_star @ g_star)
    bias = torch.stack([((1 - lam) * G[s].mean(1) + lam * gT[s].mean(0) - g_star).pow(2).sum() for s in range(4)])
    var = torch.stack([lam**2 * (gT[s] - gT[s].mean(0)).pow(2).sum(-1).mean() for s in range(4)])
    assert rows[0.5]["bias2"] == pytest.approx(float(bias.mean()) / scale, rel=1e-9)
    assert rows[0.5]["variance"] == pytest.approx(float(var.mean()) / scale, rel=1e-9)


def test_bad_input():
    with pytest.raises(ValueError, match="dim"):
        linear_problem(LinearConfig(dim=0))
    with pytest.raises(ValueError, match="points"):
        spectrum(8, points=1)

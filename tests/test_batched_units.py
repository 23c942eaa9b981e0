"""The pieces of the batched solvers against independent references, and their contracts.

Projections and LMOs (drpt_ref/batched/projections.py) against cvxpy and brute force; the QP
certificates against numpy recomputations; the warning on non-convergence; bad input; parameters
given as scalars or (B,) tensors; the trace.
"""

import itertools
import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from conftest import FEAS_TOL

from drpt_ref import project_batched
from drpt_ref.batched.projections import (
    frank_wolfe_gap,
    lmo_value,
    project_capped_simplex,
    project_simplex,
    project_weighted_capped_simplex,
    project_weighted_simplex,
    topk_vertex,
)
from drpt_ref.core.instances import random_problem

# Projections are exact algorithms: only round-off of sorted cumulative sums remains (n eps ~ 1e-14).
PROJ_TOL = 1e-10


def cvxpy_projection(v, cap, a=None):
    n = v.shape[0]
    a = np.ones(n) if a is None else a
    z = cp.Variable(n)
    cp.Problem(cp.Minimize(cp.sum_squares(z - v)), [z >= 0, z <= cap / a, a @ z == 1]).solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return z.value


def test_projections_match_cvxpy(rng):
    for _ in range(40):
        n = int(rng.integers(1, 30))
        v = rng.standard_normal((3, n)) * 10.0 ** rng.uniform(-2, 2)
        v[1, : n // 2] = v[1, 0]  # ties
        k = rng.uniform(1, n, size=3)
        vt = torch.tensor(v)
        simplex = project_simplex(vt).numpy()
        capped = project_capped_simplex(vt, torch.tensor(1.0 / k)).numpy()
        a = 10.0 ** rng.uniform(-2, 2, size=n)
        weighted = project_weighted_capped_simplex(vt, torch.tensor(a).expand(3, n), torch.tensor(1.0 / k[:, None] / a))
        for i in range(3):
            assert np.abs(simplex[i] - cvxpy_projection(v[i], 1.0)).max() <= 1e-7
            assert np.abs(capped[i] - cvxpy_projection(v[i], 1.0 / k[i])).max() <= 1e-7
            assert np.abs(weighted[i].numpy() - cvxpy_projection(v[i], 1.0 / k[i], a)).max() <= 1e-6
            assert abs(capped[i].sum() - 1.0) <= PROJ_TOL and capped[i].min() >= 0.0
            assert capped[i].max() <= 1.0 / k[i] + PROJ_TOL


def test_weighted_simplex_projection_matches_cvxpy(rng):
    """Eq. (5''): the uncapped weighted projection used for the simplex equals the capped one with the
    implied caps h = 1/a, and cvxpy."""
    for _ in range(20):
        n = int(rng.integers(1, 30))
        v = rng.standard_normal((3, n)) * 10.0 ** rng.uniform(-2, 2)
        v[1, : n // 2] = v[1, 0]  # ties
        a = 10.0 ** rng.uniform(-2, 2, size=(3, n))
        mine = project_weighted_simplex(torch.tensor(v), torch.tensor(a)).numpy()
        capped = project_weighted_capped_simplex(torch.tensor(v), torch.tensor(a), torch.tensor(1.0 / a)).numpy()
        assert np.abs(mine - capped).max() <= PROJ_TOL * max(1.0, np.abs(capped).max())
        for i in range(3):
            assert np.abs(mine[i] - cvxpy_projection(v[i], 1.0, a[i])).max() <= 1e-6
            assert abs(a[i] @ mine[i] - 1.0) <= PROJ_TOL and mine[i].min() >= 0.0


def test_projection_kkt_at_k_equal_n_and_k_one():
    v = torch.randn(4, 7, dtype=torch.float64)
    assert torch.allclose(project_capped_simplex(v, 1.0 / 7), torch.full((4, 7), 1.0 / 7, dtype=torch.float64))
    assert torch.allclose(project_capped_simplex(v, 1.0), project_simplex(v), atol=1e-14)


def test_lmo_and_topk_by_enumeration(rng):
    for n, k in [(5, 2), (6, 3), (7, 1), (4, 4)]:
        g = torch.tensor(rng.integers(-3, 4, size=(6, n)).astype(float))  # many ties
        vertices = [np.isin(np.arange(n), s) / k for s in itertools.combinations(range(n), k)]
        brute = torch.tensor([min(float(g[i].numpy() @ s) for s in vertices) for i in range(6)], dtype=torch.float64)
        assert torch.allclose(lmo_value(g, 1.0 / k), brute)
        w = topk_vertex(-g, torch.full((6,), k))
        assert torch.allclose((g * w).sum(-1), brute)  # the top-k of -g minimizes g^T s
        for i in range(6):  # ties: lowest index first (a stable descending sort)
            order = sorted(range(n), key=lambda j: (g[i, j].item(), j))
            assert set(np.flatnonzero(w[i].numpy())) == set(order[:k])


def test_frank_wolfe_gap_bounds_suboptimality(rng):
    """FW gap at any feasible w >= f(w) - f*, with f* from cvxpy (the certificate's meaning)."""
    p = random_problem(rng, "gaussian", p=30, n=12)
    w = torch.tensor(rng.dirichlet(np.ones(12)))[None]
    g = torch.tensor(p.K) @ w[0] - torch.tensor(p.b)
    f = 0.5 * w[0] @ torch.tensor(p.K) @ w[0] - torch.tensor(p.b) @ w[0]
    x = cp.Variable(12)
    fstar = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, cp.psd_wrap(p.K)) - p.b @ x), [x >= 0, cp.sum(x) == 1]).solve()
    assert float(frank_wolfe_gap(g[None], w, 1.0)) >= float(f) - fstar - 1e-9


@pytest.mark.parametrize("method", ["simplex", "capped_simplex", "cone"])
def test_certificates_recomputed_in_numpy(method, rng):
    """The reported certificate is small, and an independent numpy check of optimality agrees."""
    problems = [random_problem(rng, fam, n=20) for fam in ["gaussian", "low_rank", "duplicates", "badly_scaled"] * 4]
    K = torch.tensor(np.stack([p.K for p in problems]))
    b = torch.tensor(np.stack([p.b for p in problems]))
    c = torch.tensor([p.c for p in problems], dtype=torch.float64)
    params = {"k": 3.5} if method == "capped_simplex" else {}
    res = project_batched(K, b, c, method, **params)
    assert bool(res.info["converged"].all())
    for i, p in enumerate(problems):
        w = res.weights[i].numpy()
        g = p.K @ w - p.b
        if method == "cone":  # KKT: w >= 0, g >= 0 on w = 0, g = 0 on w > 0 (relative to the data's size)
            scale = np.abs(p.b).max() + np.abs(p.K).max() * np.abs(w).max() + 1e-300
            assert w.min() >= 0 and g.min() >= -1e-7 * scale and np.abs(g[w > 0]).max(initial=0) <= 1e-7 * scale
        else:
            cap = 1.0 / params.get("k", 1.0)
            gs = np.sort(g)
            s = np.clip(1.0 - np.arange(len(g)) * cap, 0.0, cap)
            gap = g @ w - s @ gs
            assert gap <= 1e-9 * (np.diag(p.K).max() + np.abs(p.b).max())
            assert abs(w.sum() - 1) <= FEAS_TOL and w.min() >= 0 and w.max() <= cap + FEAS_TOL


def test_warns_with_indices_certificate_and_hint():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(5, 40, 30, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 30, dtype=torch.float64)
    gT = torch.randn(5, 40, generator=g, dtype=torch.float64)
    K, b, c = G.mT @ G, (G.mT @ gT[..., None])[..., 0], (gT * gT).sum(-1)
    expected = r"did not reach .*max_iter=3.*problem \(certificate\) 0 \(.*Raise max_iter"
    with pytest.warns(RuntimeWarning, match=expected):
        res = project_batched(K, b, c, "simplex", max_iter=3, polish=False, repair=False)
    assert not bool(res.info["converged"].any())
    with warnings.catch_warnings():  # the default repair re-solves exactly: every problem certified, no warning
        warnings.simplefilter("error")
        repaired = project_batched(K, b, c, "simplex", max_iter=3, polish=False)
    assert bool(repaired.info["converged"].all()) and bool(repaired.info["repaired"].all())
    assert torch.isfinite(res.info["certificate"]).all()


def test_params_as_tensors_equal_scalars(rng):
    problems = [random_problem(rng, "gaussian", n=10) for _ in range(4)]
    K = torch.tensor(np.stack([p.K for p in problems]))
    b = torch.tensor(np.stack([p.b for p in problems]))
    c = torch.tensor([p.c for p in problems], dtype=torch.float64)
    cases = [("capped_simplex", "k", [1.0, 2.5, 4.0, 10.0]), ("topk", "k", [1, 2, 3, 10]),
             ("softmax", "tau", [0.1, 1.0, 3.0, 9.0]), ("mix", "lam", [0.0, 0.3, 0.7, 1.0]),
             ("ball", "radius", [0.0, 0.5, 2.0, 50.0]), ("subspace", "ridge", [0.0, 1e-3, 1.0, 9.0])]
    for method, name, values in cases:
        dtype = torch.long if method == "topk" else torch.float64
        batched = project_batched(K, b, c, method, **{name: torch.tensor(values, dtype=dtype)})
        for i, v in enumerate(values):
            one = project_batched(K[i : i + 1], b[i : i + 1], c[i : i + 1], method, **{name: v})
            assert torch.allclose(batched.objective[i], one.objective[0], rtol=1e-9, atol=1e-12), (method, v)


def test_bad_input_names_the_argument():
    K, b, c = torch.eye(3).expand(2, 3, 3).double(), torch.zeros(2, 3).double(), torch.ones(2).double()
    cases = [
        (dict(K=K[0]), "K must have shape"), (dict(b=b[:, :2]), "b must have shape"), (dict(c=c[:1]), "c = "),
        (dict(K=K.clone().index_put_((torch.tensor(0), torch.tensor(0), torch.tensor(1)), torch.tensor(0.5).double())),
         "not symmetric"),
        (dict(b=b.clone().fill_(float("nan"))), "b contains NaN"), (dict(K=-K), "not PSD"),
        (dict(K=K.clone().index_put_((torch.tensor(1), torch.tensor(2), torch.tensor(0)), torch.tensor(float("nan"))
                                     .double())), "K contains NaN"),
        (dict(K=K.clone().index_put_((torch.tensor(0), torch.tensor(1), torch.tensor(1)), torch.tensor(float("inf"))
                                     .double())), "K contains NaN or inf"),
        (dict(b=b + 5.0), "b and c do not match K"), (dict(K=np.eye(3)), "torch tensor"),
    ]
    for change, message in cases:
        args = dict(K=K, b=b, c=c) | change
        with pytest.raises(ValueError, match=message):
            project_batched(args["K"], args["b"], args["c"], "simplex")
    with pytest.raises(ValueError, match=r"k\[1\]: k=5.0 for method 'capped_simplex' must lie in \[1, n=3\]"):
        project_batched(K, b, c, "capped_simplex", k=torch.tensor([2.0, 5.0]))
    with pytest.raises(ValueError, match="tau=0.0"):
        project_batched(K, b, c, "softmax", tau=0.0)
    with pytest.raises(ValueError, match="integer tensor"):
        project_batched(K, b, c, "topk", k=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="not a known method"):
        project_batched(K, b, c, "hull")
    with pytest.raises(ValueError, match="unknown parameter"):
        project_batched(K, b, c, "simplex", k=2)


def test_full_validation_catches_a_non_psd_k_the_cheap_check_misses():
    K = torch.tensor([[[1.0, 0.9, -0.9], [0.9, 1.0, 0.9], [-0.9, 0.9, 1.0]]], dtype=torch.float64)  # minors ok, det < 0
    b, c = torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    project_batched(K, b, c, "mean")  # cheap: 2 x 2 minors only
    with pytest.raises(ValueError, match="not PSD"):
        project_batched(K, b, c, "mean", validate="full")


def test_trace_history_is_recorded_and_decreases():
    g = torch.Generator().manual_seed(1)
    G = torch.randn(3, 50, 20, generator=g, dtype=torch.float64)
    gT = torch.randn(3, 50, generator=g, dtype=torch.float64)
    K, b, c = G.mT @ G, (G.mT @ gT[..., None])[..., 0], (gT * gT).sum(-1)
    # tol=0 cannot be met, so all 400 iterations run; the answer is then judged by the certificate
    res = project_batched(K, b, c, "simplex", trace=True, polish=False, max_iter=400, tol=0.0, repair=False)
    hist = res.info["history"]
    assert hist.shape == (400, 3)
    assert bool((hist[-1] < 1e-2 * hist[0]).all())


def test_float32_input_returns_float32_and_no_loop_dependence():
    g = torch.Generator().manual_seed(2)
    G = torch.randn(7, 30, 16, generator=g)
    gT = torch.randn(7, 30, generator=g)
    K, b, c = G.mT @ G, (G.mT @ gT[..., None])[..., 0], (gT * gT).sum(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = project_batched(K, b, c, "capped_simplex", k=4.0)
    assert res.weights.dtype == torch.float32 and res.objective.shape == (7,)
    perm = torch.randperm(7, generator=g)
    res_p = project_batched(K[perm], b[perm], c[perm], "capped_simplex", k=4.0)
    assert torch.allclose(res_p.objective, res.objective[perm], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device in this environment")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    G = torch.randn(16, 40, 24, generator=g, dtype=torch.float64)
    gT = torch.randn(16, 40, generator=g, dtype=torch.float64)
    K, b, c = G.mT @ G, (G.mT @ gT[..., None])[..., 0], (gT * gT).sum(-1)
    for method, params in [("simplex", {}), ("capped_simplex", {"k": 3.0}), ("cone", {}), ("subspace", {})]:
        cpu = project_batched(K, b, c, method, **params)
        gpu = project_batched(K.cuda(), b.cuda(), c.cuda(), method, **params)
        assert torch.allclose(gpu.objective.cpu(), cpu.objective, rtol=1e-9, atol=1e-12)


def test_weighted_projections_of_many_points_equal_one_at_a_time():
    """v (B, m, n) with a, h (B, 1, n), as the long steps of the polish use them, equals m separate calls."""
    g = torch.Generator().manual_seed(4)
    v = torch.randn(5, 4, 9, generator=g, dtype=torch.float64)
    a = torch.rand(5, 9, generator=g, dtype=torch.float64) + 0.1
    h = 0.3 / a
    many = project_weighted_capped_simplex(v, a.unsqueeze(1), h.unsqueeze(1))
    many_s = project_weighted_simplex(v, a.unsqueeze(1))
    for j in range(4):
        assert torch.equal(many[:, j], project_weighted_capped_simplex(v[:, j], a, h))
        assert torch.equal(many_s[:, j], project_weighted_simplex(v[:, j], a))

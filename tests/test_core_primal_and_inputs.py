"""The Gram form against the primal, and the input contract of `project` (issue 2).

Primal: for small p, each set is written directly in R^p with a variable d (the ball without
any restriction to span(g_T, G)); the minimizer of ||d - g_T|| must be alpha g_T + G w from
`project`. Inputs: every kind of bad input is a ValueError that names the argument; degenerate
valid input works; numpy in gives numpy out, torch in gives torch out, in the input's dtype.
"""

import cvxpy as cp
import numpy as np
import pytest
import torch
from conftest import obj_tol

from drpt_ref import METHODS, cvxpy_program, project, project_batched
from drpt_ref.core.instances import random_params, random_problem


def primal_direction(G, g, method, params):
    """Solve min ||d - g_T|| over the set written in R^p; returns d (p,)."""
    p, n = G.shape
    d, w = cp.Variable(p), cp.Variable(n)
    mean = G.mean(axis=1)
    cons = {
        "target": [],
        "mean": [d == mean],
        "mix": [d == params.get("lam", 0) * g + (1 - params.get("lam", 0)) * mean],
        "ball": [cp.norm(d - mean) <= params.get("radius", 0)],
        "capped_simplex": [d == G @ w, w >= 0, w <= 1 / params.get("k", 1), cp.sum(w) == 1],
        "simplex": [d == G @ w, w >= 0, cp.sum(w) == 1],
        "cone": [d == G @ w, w >= 0],
        "subspace": [d == G @ w],
    }[method]
    cp.Problem(cp.Minimize(cp.sum_squares(d - g)), cons).solve(solver=cp.CLARABEL)
    return d.value


@pytest.mark.parametrize("method", ["target", "mean", "mix", "ball", "capped_simplex", "simplex", "cone", "subspace"])
def test_gram_form_equals_primal_projection(method, rng):
    """Twenty small problems per set: the direction from (K, b, c) is the projection computed in R^p."""
    for trial in range(20):
        family = ("gaussian", "low_rank", "duplicates", "in_hull", "single")[trial % 5]
        pr = random_problem(rng, family, p=int(rng.integers(2, 13)))
        params = random_params(rng, method, pr)
        if method == "subspace":
            params = {}  # ridge > 0 adds a penalty on w, not a set in R^p
        got = project(pr.K, pr.b, pr.c, method, **params)
        d = float(got.alpha) * pr.g_T + pr.G @ got.weights  # (p,)
        d_primal = primal_direction(pr.G, pr.g_T, method, params)
        scale = 1.0 + pr.c + np.abs(pr.K).max()
        assert np.sum((d - d_primal) ** 2) <= 1e-6 * scale, (family, method, params)


def test_linear_programs_match_primal(rng):
    """topk and softmax: the value of max <d, g_T> (- tau KL) over d = G w, written with G itself."""
    for _ in range(20):
        pr = random_problem(rng, "gaussian", p=int(rng.integers(2, 13)))
        k = int(rng.integers(1, pr.n + 1))
        w = cp.Variable(pr.n)
        lp = cp.Problem(cp.Maximize(pr.g_T @ (pr.G @ w)), [w >= 0, w <= 1 / k, cp.sum(w) == 1])
        lp.solve(solver=cp.CLARABEL)
        got = project(pr.K, pr.b, pr.c, "topk", k=k).info["program_value"]
        assert got == pytest.approx(lp.value, rel=1e-7, abs=1e-7)


# --- bad input ---------------------------------------------------------------------------------------

def _ok():
    G = np.random.default_rng(0).standard_normal((5, 3))
    g = np.ones(5)
    return G.T @ G, G.T @ g, float(g @ g)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda K, b, c: (K[:, :2], b, c), "K must have shape"),
        (lambda K, b, c: (K, b[:2], c), "b must have shape"),
        (lambda K, b, c: (K, b, np.ones(2)), "c = "),
        (lambda K, b, c: (K + np.triu(np.ones_like(K), 1), b, c), "K is not symmetric"),
        (lambda K, b, c: (K - 10 * np.eye(3), b, c), "K is not PSD"),
        (lambda K, b, c: (K, b * 100, c), "b and c do not match K"),
        (lambda K, b, c: (K, b, -1.0), "b and c do not match K"),
        (lambda K, b, c: (np.where(np.eye(3) > 0, np.nan, K), b, c), "K contains NaN or inf"),
        (lambda K, b, c: (K, b + np.array([np.inf, 0, 0]), c), "b contains NaN or inf"),
        (lambda K, b, c: (K, b, float("nan")), "c contains NaN or inf"),
        (lambda K, b, c: (np.zeros((0, 0)), np.zeros(0), 0.0), "n = 0"),
        (lambda K, b, c: ("K", b, c), "K must be a real array"),
    ],
)
def test_bad_arrays_are_named(mutate, match):
    K, b, c = mutate(*_ok())
    with pytest.raises(ValueError, match=match):
        project(K, b, c, "simplex")
    with pytest.raises(ValueError, match=match):
        cvxpy_program(K, b, c, "simplex")


@pytest.mark.parametrize(
    "method, params, match",
    [
        ("nope", {}, "method='nope' is not a known method"),
        ("simplex", {"k": 2}, "unknown parameter"),
        ("topk", {}, "needs the parameter 'k'"),
        ("topk", {"k": 0}, "k=0 for method 'topk' must lie in"),
        ("topk", {"k": 4}, "must lie in \\[1, n=3\\]"),
        ("topk", {"k": 1.5}, "must be an integer"),
        ("capped_simplex", {"k": 0.5}, "k=0.5 for method 'capped_simplex'"),
        ("capped_simplex", {"k": 3.5}, "k=3.5 for method 'capped_simplex'"),
        ("softmax", {"tau": 0.0}, "tau=0.0 .* must be > 0"),
        ("softmax", {"tau": -1.0}, "must be > 0"),
        ("softmax", {"tau": float("nan")}, "finite real"),
        ("mix", {"lam": 1.5}, "lam=1.5"),
        ("ball", {"radius": -1.0}, "radius=-1.0"),
        ("subspace", {"ridge": -1e-3}, "ridge=-0.001"),
    ],
)
def test_bad_parameters_are_named(method, params, match):
    with pytest.raises(ValueError, match=match):
        project(*_ok(), method, **params)
    with pytest.raises(ValueError, match=match):
        cvxpy_program(*_ok(), method, **params)


def test_unknown_solver():
    with pytest.raises(ValueError, match="solver='qp' is unknown"):
        project(*_ok(), "simplex", solver="qp")


# --- degenerate but valid input ----------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(METHODS))
def test_degenerate_inputs_work(method):
    """K = 0 with g_T = 0, a single sample, exact duplicates, g_T already in the set: finite and optimal."""
    cases = [
        (np.zeros((4, 4)), np.zeros(4), 0.0),  # all gradients zero
        (np.array([[2.0]]), np.array([1.0]), 1.0),  # n = 1
        (np.ones((3, 3)), np.ones(3), 1.0),  # three copies of one unit vector, g_T equal to it
    ]
    for K, b, c in cases:
        n = K.shape[0]
        params = {"mix": {"lam": 0.3}, "ball": {"radius": 0.5}, "topk": {"k": 1},
                  "capped_simplex": {"k": float(n)}, "softmax": {"tau": 0.1}, "subspace": {}}.get(method, {})
        got = project(K, b, c, method, **params)
        ref = project(K, b, c, method, solver="cvxpy", **params)
        assert np.all(np.isfinite(got.weights)) and np.isfinite(float(got.objective))
        assert got.info["converged"]
        assert got.info["program_value"] == pytest.approx(ref.info["program_value"], abs=1e-7)


# --- kinds and dtypes --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_in_torch_out(dtype):
    K, b, c = _ok()
    got = project(torch.tensor(K, dtype=dtype), torch.tensor(b, dtype=dtype), torch.tensor(c, dtype=dtype), "cone")
    assert isinstance(got.weights, torch.Tensor) and got.weights.dtype == dtype and got.weights.shape == (3,)
    assert isinstance(got.objective, torch.Tensor) and got.objective.dtype == dtype
    ref = project(K, b, c, "cone")
    assert float(got.objective) == pytest.approx(float(ref.objective), rel=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_in_numpy_out(dtype):
    K, b, c = _ok()
    got = project(K.astype(dtype), b.astype(dtype), dtype(c), "simplex")
    assert isinstance(got.weights, np.ndarray) and got.weights.dtype == dtype
    assert float(got.objective) == pytest.approx(float(project(K, b, c, "simplex").objective), rel=1e-5)


def test_float32_gram_is_accepted():
    """A Gram matrix computed in float32 has round-off asymmetry and tiny negative eigenvalues: accepted."""
    G = np.random.default_rng(1).standard_normal((50, 40)).astype(np.float32)
    G[:, 20:] = G[:, :20]  # duplicates: K singular, eigenvalues of order -eps * ||K||
    g = 0.5 * (G[:, 0] + G[:, 1])  # in the hull: the projection is g itself
    got = project(torch.from_numpy(G.T @ G), torch.from_numpy(G.T @ g), torch.tensor(float(g @ g)), "simplex")
    assert float(got.objective) == pytest.approx(0.0, abs=1e-3 * float(g @ g))
    assert obj_tol(0.0) > 0


@pytest.mark.parametrize(
    "K, b, c, match",
    [  # a very long or very short g_T must not hide a flaw of K or of b (the PSD tests are scale free)
        (np.diag([1.0, -1.0]).astype(np.float32), np.zeros(2, np.float32), np.float32(1000.0), "K is not PSD"),
        (np.array([[1e6]]), np.array([2.0]), 1e-6, "b and c do not match K"),  # cosine(g_T, g_1) = 2
        (np.array([[1e-6]]), np.array([2e-3]), 1.0, "b and c do not match K"),  # the same, scaled the other way
    ],
)
def test_psd_checks_do_not_depend_on_the_lengths_of_the_vectors(K, b, c, match):
    with pytest.raises(ValueError, match=match):
        project(K, b, c, "cone")
    with pytest.raises(ValueError, match=match):
        project(K, b, c, "cone", solver="cvxpy")
    Kt, bt, ct = torch.as_tensor(K)[None], torch.as_tensor(b)[None], torch.as_tensor(np.asarray(c))[None]
    with pytest.raises(ValueError, match=match):
        project_batched(Kt, bt, ct, "cone", validate="full")
    if match.startswith("b and c"):  # a 2 x 2 minor through g_T: the cheap batched check sees it too
        with pytest.raises(ValueError, match=match):
            project_batched(Kt, bt, ct, "cone")


def test_float32_gram_of_dependent_samples_is_accepted_by_both_solvers():
    """A float32 Gram with p < n is PSD only to float32 round-off: both solvers take it with the
    float32 tolerances (the cvxpy path used to re-check the float64 copy with float64 ones)."""
    gen = torch.Generator().manual_seed(0)
    G, g_T = torch.randn(5, 20, generator=gen), torch.randn(5, generator=gen)  # (p, n) float32, rank 5
    K, b, c = G.T @ G, G.T @ g_T, g_T @ g_T
    exact = project(K, b, c, "simplex")
    ref = project(K, b, c, "simplex", solver="cvxpy")
    assert exact.weights.dtype == ref.weights.dtype == torch.float32
    assert abs(exact.info["program_value"] - ref.info["program_value"]) <= 1e-5 * float(c)


def test_softmax_with_a_tiny_tau_is_top1_not_nan():
    K, b, c = np.eye(3), np.array([1.0, 0.5, -0.2]), 2.0
    d = project(K, b, c, "softmax", tau=1e-310)  # b / tau overflows; the shifted form does not
    assert np.array_equal(d.weights, [1.0, 0.0, 0.0]) and d.info["converged"]
    batched = project_batched(torch.tensor(K)[None], torch.tensor(b)[None], torch.tensor([c]), "softmax", tau=1e-310)
    assert torch.equal(batched.weights[0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.isfinite(batched.info["certificate"]).all()


@pytest.mark.parametrize("options, match", [
    (dict(max_iter=-5), "max_iter=-5 must be an integer >= 1"), (dict(max_iter=2.5), "max_iter=2.5"),
    (dict(max_iter=True), "max_iter=True"), (dict(tol=-1.0), "tol=-1.0 must be a finite real number >= 0"),
    (dict(tol=float("nan")), "tol=nan"), (dict(tol="a"), "tol='a'"),
])
def test_bad_solver_options_are_named(options, match):
    K, b, c = _ok()
    with pytest.raises(ValueError, match=match):
        project(K, b, c, "simplex", **options)
    with pytest.raises(ValueError, match=match):
        project_batched(torch.tensor(K)[None], torch.tensor(b)[None], torch.tensor([c]), "simplex", **options)


def test_cvxpy_reference_is_quiet_when_its_final_solve_is_optimal():
    """The tighter first attempts may stall ("may be inaccurate"); only the attempt that counts may warn."""
    import warnings

    from drpt_ref import solve_cvxpy

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, info = solve_cvxpy(np.ones((1, 1)), np.ones(1), 1.0, "softmax", tau=1.0)  # n = 1
    assert info["status"] == "optimal"
    assert not [w for w in caught if "inaccurate" in str(w.message)], [str(w.message) for w in caught]

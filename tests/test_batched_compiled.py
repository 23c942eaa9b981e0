"""project_batched(compiled=True) against the eager reference, and the compiled Dot2 against exact arithmetic.

Every test uses one shape, B = 6 problems of n = 8 (the compiled kernels are static-shape: each new shape
compiles again, seconds on a CPU core), so the whole file compiles about ten graphs: the Dot2 residual, the input
checks, the scout iteration of the simplex, the capped simplex and the cone, and the whole sync-free QP of the
simplex (float64) and of the capped simplex (float32, and the checks and residual again for float32), each whole QP
1-2 minutes on a 2-core CPU with an empty Inductor cache. The cone's whole QP is not compiled here (a one-off check
agreed with eager on both batches; its CI time would be another 1.5 minutes).

What is compared how (drpt_ref/batched/compiled.py):
* the Dot2 residual and the input checks are the eager functions compiled with IEEE semantics kept: bitwise;
* the certificate of given weights, computed with the compiled residual: bitwise;
* a whole solve: the scout iteration's reductions may be reordered by the compiler, so the path differs by
  round-off; both answers are certified, so they must agree to the solver's accuracy, AGREE below;
* the whole sync-free QP as one graph (sync_free=True): the eager solve_qp must not run, and the objectives agree
  where both certify (AGREE in float64, 1e-5 of the problem's size in float32).
"""

from __future__ import annotations

import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

from drpt_ref.batched.checks import cheap_flags
from drpt_ref.batched.compiled import compiled_kernels
from drpt_ref.batched.solve import project_batched
from drpt_ref.core.certificate import accurate_residual, certify
from drpt_ref.core.instances import random_problem

B, N = 6, 8
# Objectives of a compiled and an eager solve, relative to c + max_i K_ii (the size of the terms of eq. (2)): both
# are certified optima, and the batched solver agrees with cvxpy to 1e-7 relative (tests/test_batched_vs_cvxpy.py),
# so two certified answers of one problem agree at least that well; a different path may land on another optimum
# of a singular K (same objective, other weights), so weights are not compared.
AGREE = 1e-7
METHODS = ("simplex", "capped_simplex", "cone", "subspace")


def stack(problems):
    K = torch.tensor(np.stack([p.K for p in problems]))  # (B, n, n)
    b = torch.tensor(np.stack([p.b for p in problems]))  # (B, n)
    c = torch.tensor(np.array([p.c for p in problems]))  # (B,)
    return K, b, c


def random_batch(seed=0):
    rng = np.random.default_rng(seed)
    families = ("gaussian", "correlated", "in_span", "in_hull", "gaussian", "duplicates")
    return stack([random_problem(rng, f, n=N) for f in families])


def gram(G, g):
    return G.T @ G, G.T @ g, float(g @ g)


def degenerate_batch(seed=1):
    """Zero units, a rank-2 K, g_T = 0, columns over 12 decades, and two problems at extreme scales (1e-200, 1e200)."""
    rng = np.random.default_rng(seed)
    p = 30
    G, g = rng.standard_normal((p, N)), rng.standard_normal(p)
    zero_units = G.copy()
    zero_units[:, [1, 4, 5]] = 0.0  # K_ii = 0: zero-gradient units
    low = rng.standard_normal((p, 2)) @ rng.standard_normal((2, N))  # rank 2
    wide = G * np.logspace(-6, 6, N)  # diag K over 24 decades
    out = [gram(zero_units, g), gram(low, g), gram(G, np.zeros(p)), gram(wide, g),
           gram(G * 1e-100, g * 1e-100), gram(G * 1e100, g * 1e100)]
    return (torch.tensor(np.stack([o[0] for o in out])), torch.tensor(np.stack([o[1] for o in out])),
            torch.tensor([o[2] for o in out], dtype=torch.float64))


def params_for(method, K, b, c, seed=2):
    if method == "capped_simplex":
        return {"k": torch.tensor([1.0, 1.5, 2.5, 3.0, 4.25, 7.0], dtype=torch.float64)}
    if method == "subspace":
        return {"ridge": torch.tensor([0.0, 0.0, 1e-3, 0.0, 0.5, 0.0], dtype=torch.float64)}
    return {}


# A compiled kernel whose compile fails runs its eager function with a RuntimeWarning: a compiled-equals-eager test
# would then compare eager with eager and pass. So that warning fails every test here (the fallback test expects it
# with pytest.warns), and where torch.compile cannot work at all the tests skip, saying why.
pytestmark = pytest.mark.filterwarnings("error:project_batched\\(compiled=True\\):RuntimeWarning")


@pytest.fixture(scope="module")
def kernels():
    """The CPU kernels, after one compile that must succeed (else every compiled call here would be eager)."""
    kern = compiled_kernels("cpu")
    K, b, _ = random_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        try:
            with torch.inference_mode():
                kern.residual(K, b, torch.full_like(b, 1.0 / N))
        except RuntimeWarning as err:
            pytest.skip(f"torch.compile does not work on this machine: {err}")
    return kern


# ---- the compiled Dot2 ---------------------------------------------------------------------------------------

def adversarial(seed=3):
    """K, b, w whose products cancel: r_i = sum_j K_ij w_j - b_i is tiny next to its terms (up to 1e16 times),
    the case in which plain float64 loses every digit and Dot2 must not."""
    rng = np.random.default_rng(seed)
    K = rng.standard_normal((B, N, N)) * 10.0 ** rng.integers(-8, 9, (B, N, N))
    w = rng.standard_normal((B, N)) * 10.0 ** rng.integers(-4, 5, (B, N))
    K[..., -1] = -(K[..., :-1] * w[:, None, :-1]).sum(-1) / w[:, None, -1]  # the last term cancels the others
    b = 1e-3 * rng.standard_normal((B, N))  # tiny next to the terms
    b[0] = 0.0  # and an exact-zero right-hand side
    K[1, 2] = K[1, 3]  # a repeated row
    return torch.tensor(K), torch.tensor(b), torch.tensor(w)


def exact_residual(K, b, w):
    """K w - b in rational arithmetic (every float64 is a rational), rounded once to float64. -> (B, n)"""
    Kf, bf, wf = K.tolist(), b.tolist(), w.tolist()
    return torch.tensor([[float(sum((Fraction(k) * Fraction(x) for k, x in zip(row, wf[i])), Fraction(0))
                                - Fraction(bf[i][j]))
                          for j, row in enumerate(Kf[i])] for i in range(len(Kf))], dtype=torch.float64)


def test_compiled_dot2_is_bitwise_eager_and_near_exact(kernels):
    K, b, w = adversarial()
    r_eager = accurate_residual(K, b, w)
    with torch.inference_mode():  # as project_batched calls it
        r_comp = kernels.residual(K, b, w)
    assert torch.equal(r_comp, r_eager)  # bitwise, including signs of zero via equal values
    assert torch.equal(torch.signbit(r_comp), torch.signbit(r_eager))
    exact = exact_residual(K, b, w)
    plain = (K * w.unsqueeze(-2)).sum(-1) - b  # (B, n) float64 alone
    terms = (K.abs() * w.abs().unsqueeze(-2)).sum(-1) + b.abs()  # (B, n) sum of |terms|
    eps = torch.finfo(torch.float64).eps
    # the Dot2 bound (Ogita, Rump, Oishi 2005, Prop. 5.5): |res - exact| <= eps |exact| + gamma_n^2 sum |terms|
    gamma = (N + 1) * eps / (1 - (N + 1) * eps)
    assert ((r_comp - exact).abs() <= eps * exact.abs() + gamma**2 * terms).all()
    assert ((plain - exact).abs() > 1e6 * ((r_comp - exact).abs() + eps * exact.abs())).any()  # truly adversarial
    # well-conditioned entries come out as the correctly rounded exact value
    cond = terms / exact.abs().clamp_min(1e-300)
    assert torch.equal(r_comp[cond < 1e10], exact[cond < 1e10])


def test_compiled_dot2_exact_on_small_integers(kernels):
    """Products and sums of small integers are exact in Dot2 and in the rational reference: equal, every entry."""
    g = torch.Generator().manual_seed(4)
    K = torch.randint(-2**26, 2**26, (B, N, N), generator=g).double() * 2.0**20
    w = torch.randint(-2**26, 2**26, (B, N), generator=g).double() * 2.0**-30
    b = (K * w.unsqueeze(-2)).sum(-1) + torch.randint(-3, 4, (B, N), generator=g).double()
    with torch.inference_mode():
        assert torch.equal(kernels.residual(K, b, w), exact_residual(K, b, w))


# ---- the checks and the certificate --------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [random_batch, degenerate_batch])
def test_compiled_flags_are_eager(kernels, batch):
    K, b, c = batch()
    for Kx in (K, K + 1e-3 * torch.randn(K.shape, generator=torch.Generator().manual_seed(0), dtype=K.dtype)):
        flags_c, asym_c = kernels.flags(Kx, b, c)
        flags_e, asym_e = cheap_flags(Kx, b, c)
        assert torch.equal(flags_c, flags_e) and torch.equal(asym_c, asym_e)


def test_compiled_refuses_what_eager_refuses(kernels):
    K, b, c = random_batch()
    bad = K.clone()
    bad[2, 0, 1] += 1.0  # not symmetric
    for compiled in (False, True):
        with pytest.raises(ValueError, match="K is not symmetric"):
            project_batched(bad, b, c, "simplex", compiled=compiled)
    nan = K.clone()
    nan[0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="K contains NaN"):
        project_batched(nan, b, c, "simplex", compiled=True)
    for flag in ("False", None, 1):  # a truthy string would compile; anything but a bool is refused
        with pytest.raises(ValueError, match="compiled="):
            project_batched(K, b, c, "simplex", compiled=flag)


@pytest.mark.parametrize("batch", [random_batch, degenerate_batch])
@pytest.mark.parametrize("method", METHODS)
def test_certificate_with_compiled_residual_is_bitwise(kernels, batch, method):
    K, b, c = batch()
    p = params_for(method, K, b, c)
    w = project_batched(K, b, c, method, **p).weights  # (B, n) eager answers
    w = torch.where(torch.arange(N) % 3 == 0, w * (1 + 1e-6), w)  # and slightly off them (not optimal)
    cap = {"capped_simplex": 1.0 / p.get("k", 1.0), "simplex": torch.ones(B, dtype=K.dtype)}.get(method)
    kw = dict(cap=cap, ridge=p.get("ridge"), dtype=K.dtype)
    with torch.inference_mode():
        eager = certify(K, b, c, method, w, **kw)
        comp = certify(K, b, c, method, w, residual=kernels.residual, **kw)
    for key in ("objective", "feasibility", "certificate", "passed"):
        assert torch.equal(comp[key], eager[key]), key


# ---- whole solves --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [random_batch, degenerate_batch])
@pytest.mark.parametrize("method", METHODS)
def test_compiled_solve_agrees_with_eager(kernels, batch, method):
    K, b, c = batch()
    p = params_for(method, K, b, c)
    eager = project_batched(K, b, c, method, **p)
    comp = project_batched(K, b, c, method, compiled=True, **p)
    assert torch.equal(comp.info["converged"], eager.info["converged"])
    assert bool(comp.info["converged"].all())
    size = c + K.diagonal(dim1=-2, dim2=-1).amax(-1)  # (B,)
    assert ((comp.objective - eager.objective).abs() <= AGREE * size).all()
    assert comp.info["certificate"].max() <= 1e-9
    if method == "subspace":  # no scout: every kernel is bitwise, so is the answer
        assert torch.equal(comp.weights, eager.weights) and torch.equal(comp.objective, eager.objective)


@pytest.mark.parametrize("method", ["mean", "ball", "softmax"])
def test_compiled_closed_forms_are_bitwise(kernels, method):
    """The closed forms use only the compiled checks and the Dot2 objective: bitwise the eager answer."""
    K, b, c = degenerate_batch()
    p = {"radius": 0.5} if method == "ball" else ({"tau": 0.3} if method == "softmax" else {})
    eager, comp = (project_batched(K, b, c, method, compiled=flag, **p) for flag in (False, True))
    assert torch.equal(comp.weights, eager.weights) and torch.equal(comp.objective, eager.objective)


def test_compiled_float32_is_bitwise(kernels):
    """float32 runs no scout (eq. (10') is for float64): checks and certificate compiled, the answer bitwise eager."""
    K, b, c = (x.float() for x in random_batch())
    eager, comp = (project_batched(K, b, c, "simplex", compiled=flag) for flag in (False, True))
    assert torch.equal(comp.weights, eager.weights) and torch.equal(comp.info["certificate"], eager.info["certificate"])
    assert torch.equal(comp.info["converged"], eager.info["converged"])


def test_compiled_sync_free_agrees(kernels, monkeypatch):
    """sync_free=True, compiled=True: the QP's whole schedule is one compiled graph (the eager solve_qp never runs), its
    answer certified on (K, b, c) as given like the eager schedule's, and agreeing with it where both certify."""
    import drpt_ref.batched.solve as solve_module

    K, b, c = random_batch(5)
    eager = project_batched(K, b, c, "simplex", sync_free=True)

    def eager_schedule(*args, **kwargs):
        raise AssertionError("the eager solve_qp ran: the compiled whole QP was not used")

    monkeypatch.setattr(solve_module, "solve_qp", eager_schedule)
    comp = project_batched(K, b, c, "simplex", sync_free=True, compiled=True)
    size = c + K.diagonal(dim1=-2, dim2=-1).amax(-1)
    ok = eager.info["converged"] & comp.info["converged"]
    assert int(ok.sum()) >= B - 1  # the fixed schedule certifies (almost) every problem of the batch, both ways
    assert ((comp.objective - eager.objective).abs() <= AGREE * size)[ok].all()
    feasible = (comp.weights >= 0).all() and ((comp.weights.sum(-1) - 1).abs() <= 1e-12).all()
    assert feasible and (comp.info["certificate"][ok] <= 1e-9).all()


def test_compiled_sync_free_capped_float32_agrees(kernels, monkeypatch):
    """The Dr step's case: float32 (no scout), the capped simplex, one problem per layer or one global (here B = 6)."""
    import drpt_ref.batched.solve as solve_module

    K, b, c = (x.float() for x in random_batch(7))
    k = torch.tensor([1.5, 2.0, 2.5, 3.0, 4.0, 6.0])
    eager = project_batched(K, b, c, "capped_simplex", sync_free=True, k=k)
    monkeypatch.setattr(solve_module, "solve_qp", None)  # the whole QP is the compiled graph: solve_qp must not run
    comp = project_batched(K, b, c, "capped_simplex", sync_free=True, compiled=True, k=k)
    size = (c + K.diagonal(dim1=-2, dim2=-1).amax(-1)).double()
    ok = eager.info["converged"] & comp.info["converged"]
    assert int(ok.sum()) >= B - 1
    assert ((comp.objective.double() - eager.objective.double()).abs() <= 1e-5 * size)[ok].all()  # float32: 1e-5
    assert (comp.weights >= 0).all() and (comp.weights <= 1 / k.unsqueeze(-1) + 1e-6).all()


# ---- the fallback ----------------------------------------------------------------------------------------------

BACKEND_CALLS = []


def failing_backend(gm, example_inputs):
    BACKEND_CALLS.append(1)
    raise RuntimeError("no C++ compiler (test)")


def test_failed_compile_runs_eager_with_a_warning(monkeypatch):
    import drpt_ref.batched.compiled as compiled

    K, b, c = random_batch()
    kern = compiled_kernels("cpu", backend=failing_backend)
    w = torch.full((B, N), 1.0 / N, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="torch.compile of accurate_residual failed.*no C\\+\\+ compiler"):
        assert torch.equal(kern.residual(K, b, w), accurate_residual(K, b, w))
    calls = len(BACKEND_CALLS)
    assert torch.equal(kern.residual(K, b, w), accurate_residual(K, b, w))  # eager at once: not compiled again
    assert len(BACKEND_CALLS) == calls
    monkeypatch.setattr(compiled, "_CPU", kern)
    eager = project_batched(K, b, c, "cone")
    with pytest.warns(RuntimeWarning, match="running it eager"):
        comp = project_batched(K, b, c, "cone", compiled=True)
    size = c + K.diagonal(dim1=-2, dim2=-1).amax(-1)
    assert bool(comp.info["converged"].all()) and ((comp.objective - eager.objective).abs() <= AGREE * size).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs path: needs a GPU")
def test_compiled_cuda_agrees():
    K, b, c = (x.cuda() for x in random_batch())
    eager = project_batched(K, b, c, "simplex")
    comp = project_batched(K, b, c, "simplex", compiled=True)
    size = c + K.diagonal(dim1=-2, dim2=-1).amax(-1)
    assert ((comp.objective - eager.objective).abs() <= AGREE * size).all()

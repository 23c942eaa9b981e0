"""The compiled path of `project_batched(..., compiled=True)`: torch.compile where it pays, the eager code as reference.

Four kernels of the batched solver are compiled (theory/batched_solvers.md, section 6); each is the eager
function itself, handed to torch.compile, so the eager code stays the one definition:

    residual     core/certificate.accurate_residual: the Dot2 residual r = K w - b of the certificate, eq. (13)
                 (and of the closed forms' objective), about 20 elementwise operations over (B, n, n) that eager
                 torch runs as separate passes and Inductor fuses into a few loops. Inductor's C++ keeps IEEE
                 semantics (no fast-math, -ffp-contract=off in torch 2.13), and the Dot2 tree has no reduction
                 whose order a compiler may choose (core/certificate._sum2), so the result is bitwise the eager one
                 (tests/test_batched_compiled.py checks it, and checks it against exact rational arithmetic)
    flags        batched/checks.cheap_flags: the input checks of eq. (15), one fused pass over K
    scout_step   batched/qp.fista_step: one iteration of the float32 scout, eq. (10'), with `sort_last`,
                 a CPU sort through numpy (on one core, torch.sort of a (64, 128) tensor takes 0.27 ms, numpy's
                 argsort 0.08 ms alone, 0.2 ms as an op); the iteration's reductions may be reordered, so its
                 path differs from eager by
                 round-off (the scout only looks for the face: the polish and the certificate decide)

    sync_free_qp batched/qp.solve_qp(sync_free=True): the whole fixed schedule of a training step's QP (power
                 iteration, the FISTA iterations, the padded polish, the certificate of eq. (13)), one graph with no
                 host read: the eager schedule is some 8,000 operations of a few microseconds each (tiny GPT-2,
                 one 16 x 16 capped simplex problem: 15 ms eager, 2.4 ms compiled on one CPU core, a one-off
                 measurement), every one a kernel launch on a GPU. Its path differs from eager by round-off, like
                 the scout's; the caller certifies the answer on (K, b, c) as given (batched/solve.py), as for the
                 eager one. The graph is large: compiling it took 101-110 s per n on a 2-core CPU with an empty
                 Inductor cache (5 s in a later process, from its on-disk cache), so on a CPU it pays only on long runs;
                 it is meant for a GPU (untested: no GPU was lent).

On CUDA the kernels use CUDA graphs (the option mode="reduce-overhead" sets; their outputs are cloned, as a replay
overwrites them) and emulate_precision_casts: Inductor builds its Triton kernels with floating-point fusion on unless
that option is set (enable_fp_fusion = not emulate_precision_casts, torch 2.13), and a multiply and an add fused into
one FMA would break the error-free TwoSum / TwoProduct above. That path is written but untested (no GPU was lent),
and its bitwise equality with eager is not shown.
Shapes are static (dynamic=False): a new (B, n), dtype or tolerance compiles again, once per process (the whole QP
minutes on a CPU; after 8 versions of one kernel torch.compile stops, and that kernel runs eager from then on, with the
warning), and warm-up seconds are reported
by `drpt bench solvers`. If compiling fails (no C++ compiler, an unsupported op) the call runs the eager function,
with a RuntimeWarning naming the reason; the answer is then the eager one.

Shapes:
    residual: K (B, n, n), b (B, n), w (B, n) -> (B, n)
    flags: K (B, n, n), b (B, n), c (B,) -> flags (7,) bool, asym (B,)
    scout_step: Kx (a ScaledGram of K^ (B, n, n)), bx (B, n), fs (a JacobiSet), z, y (B, n), t (B,), exact -> z, y, t
    sync_free_qp: K (B, n, n), b (B, n), c (B,), cap (B,) or None (cone), uncapped, max_iter, tol -> QPResult
    sort_last: x (..., m) -> values (..., m), indices (..., m) int64
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from drpt_ref.batched.checks import cheap_flags
from drpt_ref.batched.qp import QPResult, certificate_kind, fista_step, solve_qp
from drpt_ref.core.certificate import accurate_residual


@torch.library.custom_op("drpt_ref::sort_last", mutates_args=())
def _sort_last(x: torch.Tensor, descending: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort along the last dim; on the CPU by numpy's introsort (ties in any order, as torch.sort's)."""
    if x.device.type != "cpu":
        values, indices = torch.sort(x, dim=-1, descending=descending)
        return values, indices
    xn = x.detach().contiguous().numpy()  # (..., m) a view, no copy
    order = np.argsort(-xn if descending else xn, axis=-1)  # (..., m) negation is exact: the same order reversed
    return torch.from_numpy(np.take_along_axis(xn, order, -1)), torch.from_numpy(order.astype(np.int64))


@_sort_last.register_fake
def _(x, descending):
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.long)


def sort_last(x: torch.Tensor, dim: int = -1, descending: bool = False):
    """torch.sort's signature for the projections of batched/projections.py (dim must be the last one)."""
    assert dim in (-1, x.ndim - 1), "sort_last sorts along the last dim only"
    return _sort_last(x, descending)


# Each compiled function has its own compile cache, and torch.compile keeps at most 8 versions per function (by
# shape, dtype, and whether its inputs are inference tensors) before it runs the function eager (the same answer,
# slower). So each use gets its own function: the certificate's residual (on K / scale, made in inference mode) and
# the closed forms' objective (on the caller's K) would otherwise fill one cache with two versions per shape; and
# the scout gets one function per set.
def _residual_certificate(K, b, w):
    return accurate_residual(K, b, w)


def _residual_objective(K, b, w):
    return accurate_residual(K, b, w)


def _scout_simplex(Kx, bx, fs, z, y, t, exact):
    return fista_step(Kx, bx, fs, z, y, t, exact, sort=sort_last)


def _scout_capped(Kx, bx, fs, z, y, t, exact):
    return fista_step(Kx, bx, fs, z, y, t, exact, sort=sort_last)


def _scout_cone(Kx, bx, fs, z, y, t, exact):
    return fista_step(Kx, bx, fs, z, y, t, exact, sort=sort_last)


def _qp_simplex(K, b, c, cap, max_iter, tol):
    r = solve_qp(K, b, cap, c=c, max_iter=max_iter, tol=tol, uncapped=True, sync_free=True)
    return r.w, r.certificate, r.converged, r.iterations


def _qp_capped(K, b, c, cap, max_iter, tol):
    r = solve_qp(K, b, cap, c=c, max_iter=max_iter, tol=tol, uncapped=False, sync_free=True)
    return r.w, r.certificate, r.converged, r.iterations


def _qp_cone(K, b, c, max_iter, tol):
    r = solve_qp(K, b, None, c=c, max_iter=max_iter, tol=tol, sync_free=True)
    return r.w, r.certificate, r.converged, r.iterations


class _SyncFreeQP:
    """solve_qp(..., sync_free=True) compiled whole, per set: cone (no cap), simplex (uncapped), capped simplex."""

    def __init__(self, simplex, capped, cone):
        self.simplex, self.capped, self.cone = simplex, capped, cone

    def __call__(self, K, b, c, cap, uncapped: bool, max_iter: int, tol: float) -> QPResult:
        if cap is None:
            out = self.cone(K, b, c, max_iter, tol)
        else:
            out = (self.simplex if uncapped else self.capped)(K, b, c, cap, max_iter, tol)
        return QPResult(*out, certificate_kind(cap))


class _ScoutStep:
    """The scout iteration of solve_qp, compiled per set: cone (no cap), simplex (uncapped), capped simplex."""

    def __init__(self, simplex, capped, cone):
        self.simplex, self.capped, self.cone = simplex, capped, cone

    def __call__(self, Kx, bx, fs, z, y, t, exact):
        step = self.cone if fs.cap is None else (self.simplex if fs.uncapped else self.capped)
        return step(Kx, bx, fs, z, y, t, exact)


class _Guarded:
    """A compiled function that runs its eager original, with a RuntimeWarning, if compiling or running it fails; after
    a failure it runs the eager original directly (torch.compile would try again, and fail again, on every call)."""

    def __init__(self, name: str, eager: Callable, compiled: Callable, clone: bool):
        self.name, self.eager, self.compiled, self.clone, self.failed = name, eager, compiled, clone, False

    def __call__(self, *args):
        if self.failed:
            return self.eager(*args)
        try:
            out = self.compiled(*args)
        except Exception as err:  # noqa: BLE001 - any failure of the compiler; the eager call re-raises real errors
            self.failed = True
            root = err
            while (getattr(root, "inner_exception", None) or root.__cause__) is not None:  # the compiler's own error
                root = getattr(root, "inner_exception", None) or root.__cause__
            reason = f"{type(root).__name__}: " + (str(root).strip().splitlines() or [""])[0][:300]
            warnings.warn(f"project_batched(compiled=True): torch.compile of {self.name} failed "
                          f"({reason}); running it eager (same answer, eager speed). "
                          "Install a C++ compiler (g++) for Inductor on a CPU, or pass compiled=False; after 8 "
                          "shapes (B, n, dtype) of one kernel in a process, torch.compile's recompile limit also "
                          "ends here.",
                          RuntimeWarning, stacklevel=2)
            return self.eager(*args)
        if self.clone:  # CUDA graphs: the next replay overwrites the outputs
            return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in out) if isinstance(out, tuple) \
                else out.clone()
        return out


@dataclass(frozen=True)
class Kernels:
    """The functions project_batched hands to certify (residual), accurate_objective (objective_residual),
    check_batch (flags) and solve_qp (scout_step), and the whole sync-free QP it calls instead of solve_qp."""

    residual: Callable
    objective_residual: Callable
    flags: Callable
    scout_step: Callable
    sync_free_qp: Callable  # a _SyncFreeQP
    guarded: tuple  # every _Guarded kernel above, for failed_kernels


def _build(device_type: str, backend="inductor") -> Kernels:
    cuda = device_type == "cuda"
    opts = dict(backend=backend, dynamic=False, fullgraph=True)
    if cuda and backend == "inductor":  # (untested here: no GPU was lent)
        # CUDA graphs (mode="reduce-overhead"'s one option: one launch per kernel call), and no fused multiply-add in
        # the Triton kernels, which would break the error-free TwoSum / TwoProduct of the Dot2 residual
        opts["options"] = {"triton.cudagraphs": True, "emulate_precision_casts": True}
    named = (("accurate_residual", _residual_certificate), ("accurate_residual (objective)", _residual_objective),
             ("cheap_flags", cheap_flags), ("fista_step (simplex)", _scout_simplex),
             ("fista_step (capped simplex)", _scout_capped), ("fista_step (cone)", _scout_cone),
             ("solve_qp sync-free (simplex)", _qp_simplex), ("solve_qp sync-free (capped simplex)", _qp_capped),
             ("solve_qp sync-free (cone)", _qp_cone))
    guarded = tuple(_Guarded(name, fn, torch.compile(fn, **opts), clone=cuda) for name, fn in named)
    residual, objective, flags, simplex, capped, cone, qp_simplex, qp_capped, qp_cone = guarded
    return Kernels(residual, objective, flags, _ScoutStep(simplex, capped, cone),
                   _SyncFreeQP(qp_simplex, qp_capped, qp_cone), guarded)


# torch.compile is lazy: these wrappers compile on their first call (per shape and dtype), and keep the result in
# torch.compile's own cache
_CPU = _build("cpu")
_CUDA = _build("cuda")


def failed_kernels(kernels: Kernels) -> list[str]:
    """The names of the kernels whose compilation failed (they run eager from then on, in this process)."""
    return [g.name for g in kernels.guarded if g.failed]


def compiled_kernels(device: torch.device | str, backend=None) -> Kernels:
    """The compiled kernels for a device type (CUDA: CUDA graphs; other devices: the CPU options). backend: a
    torch.compile backend instead of Inductor (tests pass a failing one to exercise the eager fallback)."""
    device_type = torch.device(device).type
    if backend is not None:
        return _build(device_type, backend)
    return _CUDA if device_type == "cuda" else _CPU

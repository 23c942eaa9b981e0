"""Input checks of `project_batched`, in torch with one host round-trip, and its warnings.

The rules and messages are those of `check_gram` and `check_params` (drpt_ref/core/direction.py,
drpt_ref/core/methods.py); only the cost differs. All tests are computed on the device and brought
to the host together, once. The PSD test of `check_gram` needs an eigenvalue per problem
(O(B n^3), seconds at B = n = 256), so by default we test the necessary conditions that cost
O(B n) after the O(B n^2) symmetry and finiteness passes (theory/batched_solvers.md, eq. (15)):

    K_ii >= -tol max K_jj,  c >= -tol max(K_jj, c),  b_i^2 <= c K_ii (1 + tol)

(entries of the joint Gram [[c, b^T], [b, K]] and its 2 x 2 minors through g_T);
`validate="full"` runs `check_gram`.

Shapes: K (B, n, n), b (B, n), c (B,); parameters Python scalars or (B,) tensors.
"""

from __future__ import annotations

import warnings

import torch

from drpt_ref.core.direction import PSD_RTOL, SYMMETRY_RTOL, check_gram
from drpt_ref.core.methods import check_scalar_param, fill_params
from drpt_ref.deferred import in_scope, require


def cheap_flags(K, b, c):
    """The cheap tests of eq. (15)-(15''), on the device, as one (7,) bool tensor (NaN/inf in K, b, c; asymmetry;
    not PSD; b, c not matching K; K not exactly symmetric) and the relative asymmetry (B,). Pure tensor code with
    no host read, so drpt_ref/batched/compiled.py can compile it (maxima are exact in any order; the two sums of
    minor_v are the only reductions whose order a compiler may change). K (B, n, n), b (B, n), c (B,)."""
    d = K.diagonal(dim1=-2, dim2=-1)  # (B, n)
    # one pass over K: K - K^T is antisymmetric, so its max is its max |.|; NaN or inf anywhere in K
    # makes it NaN or inf (the diagonal gives inf - inf). For a PSD K, max |K_ij| = max K_ii (eq. (15)).
    asym_K = (K - K.mT).amax((-2, -1))  # (B,) finite iff K is (the division below may overflow on garbage)
    scale = d.amax(-1).clamp_min(torch.finfo(K.dtype).tiny)  # (B,) the size of K alone, as in check_gram
    asym = asym_K / scale  # (B,)
    tol = PSD_RTOL[K.dtype] * (K.shape[-1] + 1)
    # the 2 x 2 minors through g_T in correlation form, b_i^2 <= c K_ii (1 + tol), in float64 (c K_ii may
    # over- or underflow in float32); O(B n)
    b64, c64, d64 = b.double(), c.double().unsqueeze(-1), d.double()  # (B, n), (B, 1), (B, n)
    cd = c64 * d64.clamp_min(0.0)  # (B, n)
    minor_b = (b64 * b64 - cd - tol * cd).amax(-1)  # (B,) > 0: a minor is negative
    # the 2 x 2 minors of K, K_ij^2 <= K_ii K_jj (1 + tol), as |correlation| <= 1 + tol; O(B n^2), eq. (15')
    inv = torch.where(d64 > 0, d64.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(d64))
    # max_j (|K_ij| inv_j) inv_i: multiplying by inv_i > 0 (and rounding) is monotone, so it can follow the max
    row = (K.double().abs() * inv.unsqueeze(-2)).amax(-1)  # (B, n) one pass over K fewer than the outer product
    minor_K = (row * inv).amax(-1) - 1.0 - tol  # (B,)
    # Cauchy-Schwarz through g_T at the diagonal Newton point v = b / diag(K): (b^T v)^2 <= c v^T K v, eq. (15'')
    v = b64 * inv * inv  # (B, n)
    bv, vKv = (b64 * v).sum(-1), (v * (K.double() @ v.unsqueeze(-1)).squeeze(-1)).sum(-1)  # (B,)
    minor_v = bv * bv - c64.squeeze(-1) * vKv * (1.0 + tol)  # (B,) > 0: [[c, b^T], [b, K]] is not PSD
    return torch.stack([
        ~torch.isfinite(asym_K).all(), ~torch.isfinite(b).all(), ~torch.isfinite(c).all(),
        (asym > SYMMETRY_RTOL[K.dtype]).any(),
        (d.amin(-1) / scale < -tol).any() | (minor_K > 0).any(),
        (c < -tol * torch.maximum(scale, c.abs())).any() | (minor_b > 0).any() | (minor_v > 0).any(),
        (asym > 0).any(),
    ]), asym


def check_batch(K, b, c, validate: str = "cheap", flags_fn=cheap_flags):
    """Refuse bad (K, b, c) with the messages of `check_gram`; return them as one dtype and device.

    flags_fn: the function computing `cheap_flags` (compiled.py passes its compiled copy)."""
    for name, x in (("K", K), ("b", b), ("c", c)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch tensor for project_batched (use drpt_ref.project for numpy).")
        if x.is_complex() or not x.is_floating_point():
            raise ValueError(f"{name} must be a real floating tensor (float32 or float64), got {x.dtype}.")
        if x.is_meta:
            raise ValueError(f"{name} is on the 'meta' device (shapes only, no values); pass tensors that hold "
                             "values, e.g. on 'cpu' or 'cuda'.")
    if K.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"K has dtype {K.dtype}; project_batched solves in float32 or float64, cast K first.")
    if K.ndim != 3 or K.shape[-1] != K.shape[-2]:
        raise ValueError(f"K must have shape (B, n, n) (a square Gram matrix G^T G), got {tuple(K.shape)}.")
    B, n = K.shape[0], K.shape[-1]
    if n == 0:
        raise ValueError("K is empty (n = 0 general samples): a projection needs at least one general gradient.")
    if B == 0:
        raise ValueError("K holds no problems (B = 0); pass at least one problem.")
    if tuple(b.shape) != (B, n):
        raise ValueError(f"b must have shape (B, n) = {(B, n)} to match K, got {tuple(b.shape)}.")
    if tuple(c.shape) != (B,):
        raise ValueError(f"c = ||g_T||^2 must be (B,) = ({B},), got shape {tuple(c.shape)}.")
    b, c = b.to(K.device, K.dtype), c.to(K.device, K.dtype)
    if validate == "full":
        check_gram(K, b, c, batched=True)
        return K, b, c
    if validate != "cheap":
        raise ValueError(f"validate={validate!r} must be 'cheap' (O(B n^2)) or 'full' (eigenvalues, O(B n^3)).")
    flags, asym = flags_fn(K, b, c)  # (7,) bool, (B,)
    messages = [f"{name} contains NaN or inf; check the gradients it was computed from (a diverged loss, or a token "
                "mask that divides by zero)." for name in "Kbc"] + [
        lambda: (f"K is not symmetric (max |K - K^T| / max K_ii = {asym.max().item():.2e} > "
                 f"{SYMMETRY_RTOL[K.dtype]:.0e}); pass K = G^T G, or symmetrize it with (K + K^T) / 2."),
        "K is not PSD (a negative diagonal entry, or K_ij^2 > K_ii K_jj); K must be a Gram matrix: compute K = G^T G "
        "from the per-sample gradients (validate='full' tests every eigenvalue).",
        "b and c do not match K: c < 0, b_i^2 > c K_ii or (b^T v)^2 > c v^T K v (the joint Gram [[c, b^T], [b, K]] of "
        "(g_T, G) is not PSD); compute b = G^T g_T and c = ||g_T||^2 from the same G and g_T."]
    if in_scope():  # registered, read once with the caller's record (drpt_ref/deferred.py)
        for bad, message in zip(flags[:6], messages):
            require(~bad, message)
        return 0.5 * (K + K.mT), b, c  # bitwise K where K is already symmetric
    flags = flags.tolist()  # the one host round-trip
    for bad, message in zip(flags[:6], messages):
        if bad:
            raise ValueError(message() if callable(message) else message)
    return (0.5 * (K + K.mT) if flags[6] else K), b, c  # symmetrize only where it changes K


def _in_range(method: str, name: str, value: float, dtype: torch.dtype) -> None:
    """A parameter the solver's dtype cannot hold is refused by name, never left to overflow inside."""
    top = torch.finfo(dtype).max
    if isinstance(value, float) and abs(value) > top / 16:  # with headroom for the solver's own products
        raise ValueError(f"{name}={value:g} for method {method!r} is outside the range of {dtype} "
                         f"(max {top:.1e}); pass float64 K, b, c, or a smaller {name}.")


def _scalar_checks(method: str, name: str, value: torch.Tensor, n: int, dtype) -> str | None:
    """The message of the first entry of a (B,) parameter that check_scalar_param or _in_range refuses, or None."""
    for i, v in enumerate(value.detach().cpu().tolist()):
        try:
            check_scalar_param(method, name, v, n)
            _in_range(method, name, v, dtype)
        except ValueError as err:
            return f"{name}[{i}]: {err}"
    return None


def _param_in_range(method: str, name: str, value: torch.Tensor, n: int, dtype) -> torch.Tensor:
    """check_scalar_param's and _in_range's rules as one bool tensor, computed on the device (no host read)."""
    v = value.detach().double()  # (B,)
    if (method, name) == ("topk", "k"):
        return (v >= 1) & (v <= n)
    ok = torch.isfinite(v) & (v.abs() <= torch.finfo(dtype).max / 16)
    if name == "k":
        ok &= (v >= 1) & (v <= n)
    elif name == "lam":
        ok &= (v >= 0) & (v <= 1)
    elif name == "tau":
        ok &= v > 0
    elif name in ("radius", "ridge"):
        ok &= v >= 0
    return ok


def check_batch_params(method: str, params: dict, B: int, n: int, like: torch.Tensor) -> dict:
    """Fill defaults and validate; each parameter comes back as a (B,) tensor (k of topk: int64).

    Raises ValueError naming the parameter: a bad value (check_scalar_param), a wrong shape, or a value
    outside the range of the data's dtype. A softmax tau below the dtype's smallest number is kept in
    float64 (`tau64`) so that a tiny tau is top-1, not 0 / 0.
    """
    out = {}
    for name, value in fill_params(method, params).items():
        if not isinstance(value, torch.Tensor):
            value = check_scalar_param(method, name, value, n)
            _in_range(method, name, value, like.dtype)
            if name == "tau":
                out["tau64"] = torch.full((B,), float(value), dtype=torch.float64, device=like.device)
            dtype = torch.long if (method, name) == ("topk", "k") else like.dtype
            out[name] = torch.full((B,), value, dtype=dtype, device=like.device)
            continue
        if tuple(value.shape) != (B,):
            raise ValueError(f"{name} must be a Python scalar or a (B,) = ({B},) tensor, "
                             f"got shape {tuple(value.shape)}.")
        if (method, name) == ("topk", "k") and value.is_floating_point():
            raise ValueError(f"k for method 'topk' must be an integer tensor (got {value.dtype}); use "
                             "method 'capped_simplex' for fractional k.")
        if in_scope():  # the same rules on the device, read once with the caller's record (drpt_ref/deferred.py)
            require(_param_in_range(method, name, value, n, like.dtype),
                    lambda name=name, value=value: _scalar_checks(method, name, value, n, like.dtype) or "")
        else:
            message = _scalar_checks(method, name, value, n, like.dtype)  # one host read per tensor parameter
            if message:
                raise ValueError(message)
        if name == "tau":
            out["tau64"] = value.to(device=like.device, dtype=torch.float64)
        dtype = torch.long if (method, name) == ("topk", "k") else like.dtype
        out[name] = value.to(device=like.device, dtype=dtype)
    return out


def warn_not_converged(method: str, converged: torch.Tensor, certificate: torch.Tensor, tol: float,
                       max_iter: int, kind: str, repaired: bool = False) -> None:
    """Never silent: name the problems that missed tol, their certificates, and what to change."""
    bad = (~converged).nonzero().flatten().tolist()
    if not bad:
        return
    shown = ", ".join(f"{i} ({certificate[i].item():.1e})" for i in bad[:10])
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    warnings.warn(
        f"project_batched(method={method!r}): {len(bad)} of {converged.numel()} problems did not reach "
        f"{kind} <= {tol:.1e} (max_iter={max_iter}{', after the exact re-solve' if repaired else ''}): problem "
        f"(certificate) {shown}{more}. {'' if repaired else 'Raise max_iter or keep repair=True, '}solve in "
        "float64 if this was float32, remove nearly duplicate units, or check these problems with "
        "drpt_ref.core.project(K[i], b[i], c[i], method, solver='cvxpy').",
        RuntimeWarning,
        stacklevel=3,
    )

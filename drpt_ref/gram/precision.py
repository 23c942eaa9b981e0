"""Mixed precision in the Gram engines: captures in the model's dtype, inner products accumulated in float32 or wider.

A bfloat16 or float16 model, or a float32 model run under torch.autocast, leaves its layer inputs a and output gradients
e (and, in the exact engine, its per-unit gradients) in half precision. The engines keep those captures as they are
(half the memory of float32) and widen one layer at a time, right before any inner product, to the accumulation dtype

    acc = the widest of (the tensors' dtypes, float32):  bf16, fp16 -> float32;  float32 -> float32;  float64 -> float64
                                                                                       eq. (1) in theory/precision.md

so K, b, c come out in float32 (float64 for a float64 model), the projection is solved in that dtype, and the update
G w, assembled in it, is cast back to each parameter's dtype only when it is applied (training/dr_step.py). Why float32
and not float64: the captures carry a relative error of order 2^-8 (bf16) already, float32 adds 2^-24 per operation,
and float64 is 2 to 64 times slower on GPUs (theory/precision.md, section 3).

Also here: the dtypes drpt trains in (`DTYPES`, `AUTOCAST`), the autocast context of a capture, and `no_autocast`,
which every inner product of the engines runs under (they may be called inside a caller's autocast, e.g. a trainer's).

Shapes: none change here; a capture (R, T, d) is widened elementwise.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from drpt_ref.deferred import require

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST = ("", "bfloat16", "float16")  # '' = no autocast
HALF = (torch.bfloat16, torch.float16)


def accumulation_dtype(*xs) -> torch.dtype:
    """The dtype inner products of xs (tensors or dtypes) are accumulated in, eq. (1) in theory/precision.md.

    -> float32 for half-precision inputs (or a mix of half and float32), float64 if any input is float64.
    """
    acc = torch.float32
    for x in xs:
        acc = torch.promote_types(acc, x.dtype if torch.is_tensor(x) else x)
    return acc


def widen(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """xs in their common accumulation dtype (a no-op for float32 and float64 captures). Shapes unchanged."""
    acc = accumulation_dtype(*xs)
    return tuple(x.to(acc) for x in xs)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts a linear layer's input x to, or None: outside autocast, and for an integer or a
    float64 x (autocast leaves float64 alone)."""
    kind = x.device.type
    if x.is_floating_point() and x.dtype != torch.float64 and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def no_autocast(x: torch.Tensor):
    """A context with autocast off on x's device: inner products run in the dtype eq. (1) chose, not autocast's
    (under autocast a float32 matmul would be run in bf16 again)."""
    return torch.autocast(x.device.type, enabled=False)


def autocast_context(autocast: str, device_type: str):
    """torch.autocast(device_type, dtype) for autocast in AUTOCAST ('' -> a no-op context).

    Raises ValueError for a name outside AUTOCAST.
    """
    if autocast not in AUTOCAST:
        raise ValueError(f"autocast={autocast!r} is unknown; use one of {AUTOCAST} ('' = none).")
    if not autocast:
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[autocast])


def check_finite_capture(name: str, x: torch.Tensor, what: str) -> None:
    """Refuse a non-finite half-precision capture with the reason (an overflow of the half format), never a NaN Gram."""
    if x.dtype in HALF:  # read now, or once with the Dr step's record (drpt_ref/deferred.py)
        top = torch.finfo(x.dtype).max
        require(torch.isfinite(x), f"the {what} of layer {name} overflowed {x.dtype} (|x| > {top:g}) in the "
                "capture; use bfloat16 (float32's range) instead of float16, or a lower learning rate if the run "
                "diverged")

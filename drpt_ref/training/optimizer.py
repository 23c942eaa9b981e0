"""The optimizer every drpt run steps with: AdamW (fused where torch has the kernel) or SGD; and `as_grad`.

The optimizer runs after the update is written to .grad (step 5 of training/dr_step.py) and costs the same in the
standard step and in the Dr step: about 28 bytes of memory traffic per parameter for AdamW (theory/step_cost.md,
section 2). torch's default multi-tensor ("foreach") AdamW makes several passes over every parameter, each with its
own temporaries; the fused kernel makes one (on the 2-core CPU, a one-off measurement: 46 M float32 parameters,
250 ms foreach against 50 ms fused; theory/step_cost.md, section 3). It is torch's own implementation of the same
update, equal to the foreach one up to round-off (over 50 float32 steps about 1 element-step in 700 differs by one
ulp), so the fused optimizer is used wherever torch supports it for every parameter (CPU and CUDA, every floating
dtype, contiguous: `fused_supported`), the foreach one elsewhere; tests/test_optimizer.py checks the two agree.

The fused kernel needs a gradient laid out as its parameter (the same strides): given a transposed gradient it steps
silently wrong (foreach copes). `as_grad` makes every gradient the Dr step writes so (dr_step, step 5).

Shapes: none (parameters of any shape).
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("adamw", "sgd")


def fused_supported(params: list[torch.Tensor]) -> bool:
    """True when torch's fused AdamW kernel takes every parameter correctly: floating dtype, on a CPU or CUDA device,
    contiguous (on a strided parameter, e.g. a slice x[:, ::2], the fused step is wrong whatever the gradient, and a
    resumed optimizer state is stored contiguous: foreach is exact on both)."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") and p.is_contiguous()
                                for p in params)


def make_optimizer(kind: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW (fused where `fused_supported`) or SGD over `params` at learning rate `lr`.

    kind: 'adamw' or 'sgd'; weight_decay: AdamW's decoupled weight decay (SGD takes none here).
    ValueError for an unknown kind or no parameters (drpt train checks lr and weight_decay before)."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer {kind!r} is unknown; use one of {OPTIMIZERS}.")
    params = list(params)
    if not params:
        raise ValueError("the optimizer got no parameters: nothing requires a gradient (check the frozen layers).")
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused_supported(params) or None)


def as_grad(param: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """d in param's dtype with param's strides, as .grad must be for the fused AdamW kernel (see above); no copy when
    it already is. d: a tensor of param's shape (any dtype, any layout). ValueError for another shape."""
    if d.shape != param.shape:
        raise ValueError(f"the update has shape {tuple(d.shape)}, its parameter {tuple(param.shape)}.")
    if d.stride() == param.stride():
        return d.to(param.dtype)  # d itself when it is already param's dtype
    return torch.empty_like(param).copy_(d)  # param's dtype; empty_like keeps a dense parameter's strides

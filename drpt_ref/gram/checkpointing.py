"""Gradient (activation) checkpointing under the ghost capture: each layer is recorded once per backward.

With transformers' checkpointing each decoder block keeps only its input in the forward and runs its forward a second
time inside the backward, to rebuild what the backward needs. The capture's forward hooks would see every covered
layer of a checkpointed block twice. The capture (gram/ghost.py) therefore records a layer only in the forward it runs
itself: a forward hook that fires after the capture has started its backward is a recomputation and is skipped
(counted in `Capture.recomputed`). That is exact: with non-reentrant checkpointing (use_reentrant=False) the backward
runs through the graph of the first forward, so the gradients of the outputs recorded there are the true e, and the
recomputed forward is the same function of the same inputs (dropout off). Reentrant checkpointing (use_reentrant=True)
runs the first forward without a graph: the capture refuses it, naming that reason (theory/precision.md, section 5).

transformers checkpoints a block only while `block.training` is True (and its base model drops the KV cache only then,
which the recomputation would otherwise fill twice); the Dr step keeps the model in eval mode (no dropout).
`checkpointing_active(model)` sets the `training` flag of the modules transformers flagged for checkpointing (the
blocks and the base model) alone, not of their submodules, so dropout stays off, for the duration of a capture.

Shapes: none (modules and flags only).
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


def enable_checkpointing(model: nn.Module) -> None:
    """Turn on transformers' non-reentrant gradient checkpointing of every decoder block.

    Raises ValueError (naming --gradient-checkpointing) for a model transformers cannot checkpoint.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"--gradient-checkpointing: {type(model).__name__} does not support gradient checkpointing "
                         "(transformers' supports_gradient_checkpointing is False); leave the flag off.")
    kwargs = {"use_reentrant": False}  # reentrant checkpointing runs the first forward without a graph: refused
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5: gradient_checkpointing_enable is an alias
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not checkpointed_blocks(model):
        raise ValueError(f"--gradient-checkpointing: {type(model).__name__} has no block that transformers "
                         "checkpoints; leave the flag off.")


def checkpointed_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks whose forward transformers checkpoints (GradientCheckpointingLayer with the flag set)."""
    return [mod for mod in model.modules()
            if isinstance(mod, GradientCheckpointingLayer) and mod.gradient_checkpointing]


def checkpointing_modules(model: nn.Module) -> list[nn.Module]:
    """Every module transformers flagged for checkpointing: the blocks, and the base model, which drops its KV cache
    while checkpointing and training (a cache filled in the forward would be filled again by the recomputation)."""
    return [mod for mod in model.modules() if getattr(mod, "gradient_checkpointing", False) is True]


@contextmanager
def checkpointing_active(model: nn.Module):
    """In the block, every checkpointing module has `training = True` (submodules keep theirs); restored on exit."""
    blocks = [mod for mod in checkpointing_modules(model) if not mod.training] if checkpointed_blocks(model) else []
    for mod in blocks:
        mod.training = True  # this module's flag only: nn.Module.train() would also switch its dropout on
    try:
        yield
    finally:
        for mod in blocks:
            mod.training = False

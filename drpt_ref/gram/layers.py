"""The layers a Gram covers: every untied trainable linear layer (nn.Linear, GPT-2's Conv1D), in module order.

One block of K, b, c per covered layer (theory/gram.md, section 1); a layer whose weight is tied to
another parameter slot (GPT-2's lm_head = wte), embeddings and layer norms are left out (section 5).
`covered_parameters(model)` names what is covered. Every engine (exact.py, ghost.py, sketch.py) and
the update assembly (update.py) read the layers from here.

Shapes: a layer's weight W is (d_out, d_in) for nn.Linear and (d_in, d_out) for Conv1D; bias (d_out,).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class CoveredLayer:
    """One linear layer of the Gram.

    y = x W^T + b (nn.Linear, W (d_out, d_in)) or y = x W + b (Conv1D, W (d_in, d_out)).
    """

    name: str  # module name, e.g. "transformer.h.0.attn.c_attn"
    module: nn.Module
    d_in: int
    d_out: int
    conv1d: bool  # weight stored (d_in, d_out)

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def param_names(self) -> list[str]:
        return [f"{self.name}.weight"] + ([f"{self.name}.bias"] if self.has_bias else [])

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])

    @property
    def num_params(self) -> int:
        return self.d_in * self.d_out + (self.d_out if self.has_bias else 0)


def covered_layers(model: nn.Module) -> list[CoveredLayer]:
    """The linear layers whose weights and biases enter the Gram, in module order.

    Left out: any layer whose weight or bias is shared with another parameter slot (tied weights, e.g.
    GPT-2's lm_head = wte, or one bias in two layers: the parameter gets gradient from two places, which
    the per-layer engines would count twice, theory/gram.md section 5), frozen layers.
    """
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    layers = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, Conv1D)) or not mod.weight.requires_grad:
            continue
        if any(uses[id(p)] > 1 for p in (mod.weight, mod.bias) if p is not None):
            continue
        conv1d = isinstance(mod, Conv1D)
        d_in, d_out = mod.weight.shape if conv1d else mod.weight.shape[::-1]
        layers.append(CoveredLayer(name, mod, int(d_in), int(d_out), conv1d))
    if not layers:
        raise ValueError("model has no untied trainable nn.Linear / Conv1D layer to build a Gram over")
    return layers


def covered_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters the Gram covers (each covered layer's weight and bias)."""
    return [p for layer in covered_layers(model) for p in layer.param_names]

"""Realistic model shapes for `drpt bench step`, built from their configs with random weights (nothing downloaded).

The published configs of three small open models, as config dicts (the fields that set the FLOPs and the memory):
SmolLM2-360M and TinyLlama-1.1B (Llama architecture), Qwen3-1.7B (Qwen3: q/k norms, head_dim 128). `build_shape`
cuts a shape to `layers` decoder blocks (the CPU cannot hold a step of the full models in seconds; the per-layer
costs, the head and the attention are the full models'), sets the context to at least the longest T, and freezes
what the Gram does not cover, as in every Dr method.

Shapes: none (models).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from drpt_ref.training.dr_step import freeze_uncovered

# name -> (config class, the published config's sizes)
SHAPES = {
    "smollm2-360m": (LlamaConfig, dict(hidden_size=960, intermediate_size=2560, num_attention_heads=15,
                                       num_key_value_heads=5, num_hidden_layers=32, vocab_size=49152,
                                       tie_word_embeddings=True, rope_theta=100000.0)),
    "tinyllama-1.1b": (LlamaConfig, dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                                         num_key_value_heads=4, num_hidden_layers=22, vocab_size=32000,
                                         tie_word_embeddings=False)),
    "qwen3-1.7b": (Qwen3Config, dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=16,
                                     num_key_value_heads=8, head_dim=128, num_hidden_layers=28, vocab_size=151936,
                                     tie_word_embeddings=True)),
}


def build_shape(name: str, layers: int, max_T: int, device, seed: int):
    """A random model of the named shape with `layers` blocks (0: all), eval mode, uncovered parameters frozen.

    ValueError for an unknown name or a bad layer count."""
    if name not in SHAPES:
        raise ValueError(f"shape {name!r} is unknown; use one of {sorted(SHAPES)} or a model folder")
    cls, sizes = SHAPES[name]
    if not isinstance(layers, int) or layers < 0:
        raise ValueError(f"--layers={layers!r} must be an integer >= 0 (0 = the full depth)")
    sizes = dict(sizes, max_position_embeddings=max(4096, max_T))
    if layers:
        sizes["num_hidden_layers"] = min(layers, sizes["num_hidden_layers"])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cls(**sizes)).to(device).eval()  # timing does not depend on weights
    freeze_uncovered(model)
    return model

"""LoRA on the command line: `drpt train --lora-r R [--lora-alpha A] [--lora-targets q_proj,v_proj | all-linear]`.

LoRA (through peft, the optional extra `pip install drpt_ref[lora]`) replaces a target linear layer's update by a
low-rank one: y = W0 x + b0 + s B A x, s = alpha / r (eq. (1) in theory/lora.md). The factors A (r, d_in) and
B (d_out, r) are peft's `lora_A` / `lora_B` nn.Linear modules; the base model is frozen. The Gram then covers
exactly the adapters: every trainable untied linear layer of the wrapped model is an adapter factor (gram/layers.py
needs no change), and the ghost Gram is exact on them, eq. (2) in theory/lora.md. What `drpt train` does with
this module:

    check_lora_settings(cfg)    the flags, before anything is loaded or written (ValueError naming the flag)
    add_lora(model, cfg)        --lora-r > 0: the peft model with new adapters on --lora-targets
    lora_summary(model)         one line for the start print: rank, scale, the adapted modules

A `--model` folder that holds a LoRA adapter (a LoRA run's final/) loads with trainable adapters through
training/model_folder.py and trains on; its base model must be a local folder.

Shapes: lora_A.weight (r, d_in), lora_B.weight (d_out, r); no other tensors here.
"""

from __future__ import annotations

import os
import re

import torch

from drpt_ref.training.model_folder import is_adapter_folder, is_peft_model, require_peft

ALL_LINEAR = "all-linear"  # peft's choice of every linear layer but the output head
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")  # a module name or dotted suffix, as peft matches target_modules


def parse_targets(text: str):
    """--lora-targets -> peft's target_modules: None ('' = peft's default for the architecture), 'all-linear',
    or a list of module names. ValueError naming the flag on anything else."""
    text = text.strip()
    if not text:
        return None
    if text == ALL_LINEAR:
        return ALL_LINEAR
    names = [t.strip() for t in text.split(",")]
    bad = [t for t in names if not _NAME.fullmatch(t)]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"--lora-targets {text!r}: give distinct module names separated by commas (e.g. "
                         f"q_proj,v_proj), or {ALL_LINEAR!r}, or '' for peft's default; bad: {bad or 'a repeat'}.")
    return names


def check_lora_settings(cfg) -> None:
    """Refuse LoRA and coverage flags that cannot train, naming the flag; peft is required only when used."""
    r = cfg.lora_r
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"--lora-r must be a whole number >= 0 (0 = no LoRA), got {r!r}.")
    if cfg.lora_alpha < 0:
        raise ValueError(f"--lora-alpha must be >= 0 (0 = the rank, scale 1), got {cfg.lora_alpha}.")
    if r == 0 and (cfg.lora_alpha or cfg.lora_targets):
        raise ValueError("--lora-alpha and --lora-targets apply to new LoRA adapters: pass --lora-r > 0 with them "
                         "(or leave them at their defaults).")
    parse_targets(cfg.lora_targets)
    adapter = os.path.isdir(cfg.model) and is_adapter_folder(cfg.model)
    if r and adapter:
        raise ValueError(f"--model {cfg.model!r} holds a LoRA adapter already; leave --lora-r at 0 to train that "
                         "adapter on, or pass its base model as --model for new adapters.")
    if r:
        require_peft("--lora-r")
    if cfg.train_uncovered and cfg.per_layer:
        raise ValueError("--train-uncovered trains the parameters outside the Gram with one (alpha, w) for the whole "
                         "model; --per-layer gives each layer its own: drop one of the two flags.")


def add_lora(model, cfg):
    """The model with new LoRA adapters (--lora-r > 0) on --lora-targets, the base frozen; else the model itself.

    Adapters: rank r, lora_alpha = --lora-alpha or r (scale alpha / r, eq. (1) in theory/lora.md), no dropout (the
    model runs in eval mode anyway), bias 'none'; lora_A random (torch's generator, seeded by the run), lora_B zero,
    so the wrapped model computes what the base does. GPT-2's Conv1D layers are adapted with fan_in_fan_out."""
    if not cfg.lora_r:
        return model
    require_peft("--lora-r")
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = parse_targets(cfg.lora_targets)
    conv1d = any(isinstance(mod, Conv1D) for mod in model.modules())
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or cfg.lora_r, target_modules=targets,
                        lora_dropout=0.0, bias="none", fan_in_fan_out=conv1d, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, config)
    except ValueError as err:  # peft: no default for this architecture, or names that match no module
        kind = getattr(getattr(model, "config", None), "model_type", "?")
        raise ValueError(f"--lora-targets {cfg.lora_targets!r} on a {kind!r} model: {err} Name the model's linear "
                         f"modules (e.g. q_proj,v_proj) or use {ALL_LINEAR!r}.") from None
    other = sorted(name for name, mod in model.named_modules()
                   if hasattr(mod, "base_layer") and not isinstance(mod.base_layer, (torch.nn.Linear, Conv1D)))
    if other:  # an embedding or convolution adapter: the Gram covers linear layers only (theory/gram.md)
        raise ValueError(f"--lora-targets {cfg.lora_targets!r} adapts modules that are not linear layers "
                         f"({', '.join(other[:3])}): the Gram covers linear (and GPT-2 Conv1D) layers only; name "
                         "linear modules (e.g. q_proj,v_proj) or use all-linear.")
    model.peft_config["default"].base_model_name_or_path = os.path.abspath(cfg.model)  # saved in final/
    return model


def lora_summary(model) -> str:
    """'LoRA: r=.., alpha=.. (scale ..), bias ..., on N modules: names' of a peft model; '' for any other model."""
    if not is_peft_model(model):
        return ""
    config = model.peft_config["default"]
    names = [name for name, mod in model.named_modules() if "default" in getattr(mod, "lora_A", {})]
    adapted = sorted({name.rsplit(".", 1)[-1] for name in names})
    return (f"LoRA (peft): r={config.r}, alpha={config.lora_alpha:g} (scale {config.lora_alpha / config.r:g}), "
            f"bias={config.bias!r}, base {config.base_model_name_or_path}; adapters on {len(names)} modules: "
            f"{', '.join(adapted)}")

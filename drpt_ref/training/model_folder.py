"""Model folders, loaded from safetensors only: `--model`, a run's final/, the model of an experiment.

`check_model_folder` refuses, with the flag and the reason, a folder that is missing, is a file, has no
config.json (or one that is not a JSON object), or has no safetensors weights: a pickle checkpoint
(pytorch_model.bin, *.pt) is never loaded, since unpickling can run code. `load_model_folder` then loads with
transformers from the local disk only (`use_safetensors=True`, `local_files_only=True`, `trust_remote_code=False`).

Shapes: no tensors here.
"""

from __future__ import annotations

import json
import os

WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # what a model folder must hold


def check_model_folder(path: str, flag: str = "--model") -> None:
    """Refuse a model folder that drpt would not load: missing, not a folder, no config.json, or no
    safetensors weights (a pickle checkpoint such as pytorch_model.bin is never loaded: it can run code)."""
    if not os.path.exists(path):
        raise ValueError(f"{flag} {path!r}: no such folder; build one with `drpt build-model` or pass a path.")
    if not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a file; pass the model's folder (config.json + model.safetensors).")
    names = set(os.listdir(path))
    if "config.json" not in names:
        raise ValueError(f"{flag} {path!r} has no config.json: not a saved model folder.")
    try:
        with open(os.path.join(path, "config.json"), "rb") as f:
            config = json.loads(f.read())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{flag} {path!r}: config.json cannot be read as JSON ({err}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{flag} {path!r}: config.json holds a JSON {type(config).__name__}, not a model config "
                         "object; restore it from the model's source.")
    if not names & set(WEIGHTS):
        pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
        why = (f"it holds {', '.join(pickles)}, a pickle, which drpt never loads (unpickling can run code); "
               "convert it to safetensors (model.save_pretrained(folder, safe_serialization=True))") if pickles \
            else "it holds no model.safetensors"
        raise ValueError(f"{flag} {path!r}: no safetensors weights: {why}.")


def load_model_folder(path: str, flag: str = "--model"):
    """(model, tokenizer) of a local model folder: safetensors weights only, no download, no remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_folder(path, flag)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                     trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:  # a damaged config or tokenizer file
        raise ValueError(f"{flag} {path!r} could not be loaded ({type(err).__name__}: {err}); check its config.json "
                         "and tokenizer files.") from None
    return model, tok

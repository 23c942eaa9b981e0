"""Model folders, loaded from safetensors only: `--model`, a run's final/, the model of an experiment; and peft LoRA
adapter folders on a local base model.

`check_model_folder` refuses, with the flag and the reason, a folder that is missing, is a file, has no
config.json (or one that is not a JSON object), or has no safetensors weights: a pickle checkpoint
(pytorch_model.bin, *.pt) is never loaded, since unpickling can run code. `load_model_folder` then loads with
transformers from the local disk only (`use_safetensors=True`, `local_files_only=True`, `trust_remote_code=False`).

A folder with an adapter_config.json is a peft adapter (a LoRA run's final/, theory/lora.md): it must hold
adapter_model.safetensors, be a LoRA adapter, and name in `base_model_name_or_path` a local model folder (checked
as above; a relative path is read from the current folder, as peft does; nothing is downloaded). The base is
loaded as above and the adapter put on it by peft (`PeftModel.from_pretrained`, the adapter's weights from
safetensors), trainable or frozen. The tokenizer comes from the adapter folder when it holds one, else from the
base. peft is an optional extra (`pip install drpt_ref[lora]`), imported only here, inside the functions.

Shapes: no tensors here.
"""

from __future__ import annotations

import json
import os

WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # what a model folder must hold
ADAPTER_CONFIG = "adapter_config.json"  # what makes a folder a peft adapter folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # the adapter's weights (adapter_model.bin, a pickle, is refused)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # a folder holding either has its own tokenizer
LORA_EXTRA = "pip install drpt_ref[lora]"  # the optional extra that brings peft


def require_peft(what: str):
    """The peft module, or a ValueError naming `what` needs it and how to install it."""
    try:
        import peft
    except ImportError:
        raise ValueError(f"{what} needs peft, an optional extra of drpt_ref: `{LORA_EXTRA}`.") from None
    return peft


def is_peft_model(model) -> bool:
    """A model wrapped by peft (a PeftModel), told without importing peft."""
    return type(model).__module__.split(".")[0] == "peft"


def is_adapter_folder(path: str) -> bool:
    """A folder holding a peft adapter (adapter_config.json)."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def _json_object(path: str, flag: str, folder: str, what: str) -> dict:
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{flag} {folder!r}: {name} cannot be read as JSON ({err}).") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{flag} {folder!r}: {name} holds a JSON {type(obj).__name__}, not {what} object; restore "
                         "it from the model's source.")
    return obj


def check_model_folder(path: str, flag: str = "--model") -> None:
    """Refuse a model folder that drpt would not load: missing, not a folder, no config.json, or no
    safetensors weights (a pickle checkpoint such as pytorch_model.bin is never loaded: it can run code); or an
    adapter folder that `adapter_base` refuses."""
    if not os.path.exists(path):
        raise ValueError(f"{flag} {path!r}: no such folder; build one with `drpt build-model` or pass a path.")
    if not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a file; pass the model's folder (config.json + model.safetensors).")
    if is_adapter_folder(path):
        adapter_base(path, flag)
        return
    names = set(os.listdir(path))
    if "config.json" not in names:
        raise ValueError(f"{flag} {path!r} has no config.json: not a saved model folder.")
    _json_object(os.path.join(path, "config.json"), flag, path, "a model config")
    if not names & set(WEIGHTS):
        pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")))
        why = (f"it holds {', '.join(pickles)}, a pickle, which drpt never loads (unpickling can run code); "
               "convert it to safetensors (model.save_pretrained(folder, safe_serialization=True))") if pickles \
            else "it holds no model.safetensors"
        raise ValueError(f"{flag} {path!r}: no safetensors weights: {why}.")


def adapter_base(path: str, flag: str = "--model") -> str:
    """The base model folder of the LoRA adapter folder `path`, after checking the adapter: its config is a JSON
    object of a LoRA adapter, its weights are adapter_model.safetensors, peft is installed, and the base it names
    is a local model folder that is not itself an adapter. ValueError naming `flag` and the fix otherwise."""
    config = _json_object(os.path.join(path, ADAPTER_CONFIG), flag, path, "a peft adapter config")
    names = set(os.listdir(path))
    if ADAPTER_WEIGHTS not in names:
        why = ("it holds adapter_model.bin, a pickle, which drpt never loads; save the adapter with "
               "safe_serialization=True") if "adapter_model.bin" in names else "it holds no adapter weights"
        raise ValueError(f"{flag} {path!r} is a peft adapter folder without {ADAPTER_WEIGHTS}: {why}.")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{flag} {path!r}: a {config.get('peft_type')!r} adapter; drpt trains and loads LoRA adapters "
                         "only (the Gram covers their linear factors, theory/lora.md).")
    require_peft(f"{flag} {path!r} (a LoRA adapter)")
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ValueError(f"{flag} {path!r}: {ADAPTER_CONFIG} names no base model (base_model_name_or_path); set it "
                         "to the local folder of the model the adapter was trained on.")
    if not os.path.isdir(base):
        raise ValueError(f"{flag} {path!r}: {ADAPTER_CONFIG} names the base model {base!r}, which is not a local "
                         "folder (nothing is downloaded; a relative path is read from the current folder): set "
                         "base_model_name_or_path to the base model's folder.")
    if is_adapter_folder(base):
        raise ValueError(f"{flag} {path!r}: its base {base!r} is itself an adapter folder; set "
                         f"base_model_name_or_path in {ADAPTER_CONFIG} to a full model folder.")
    check_model_folder(base, f"{flag} {path!r}: the base model")
    return base


def load_model_folder(path: str, flag: str = "--model", trainable: bool = False):
    """(model, tokenizer) of a local model folder: safetensors weights only, no download, no remote code.

    An adapter folder gives a peft model on its base (theory/lora.md); `trainable`: its adapter parameters
    require gradients (peft's is_trainable; `drpt train` trains them), else they are frozen (evaluation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_folder(path, flag)
    adapter = is_adapter_folder(path)
    base = adapter_base(path, flag) if adapter else path
    tok_path = path if any(os.path.isfile(os.path.join(path, n)) for n in TOKENIZER_FILES) else base
    try:
        tok = AutoTokenizer.from_pretrained(tok_path, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, use_safetensors=True,
                                                     trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:  # a damaged config or tokenizer file
        raise ValueError(f"{flag} {path!r} could not be loaded ({type(err).__name__}: {err}); check its config.json "
                         "and tokenizer files.") from None
    if adapter:
        model = _put_adapter(model, path, base, flag, trainable)
    return model, tok


def _put_adapter(model, path: str, base: str, flag: str, trainable: bool):
    """The LoRA adapter of folder `path` on `model` (loaded from `base`); every tensor of the adapter must be stored."""
    from peft import LoraConfig, PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    try:
        config = LoraConfig.from_pretrained(path)  # the local adapter_config.json (checked by adapter_base)
        config.base_model_name_or_path = os.path.abspath(base)  # what a save of this model will name
        model = PeftModel.from_pretrained(model, path, is_trainable=trainable, config=config)
        with safe_open(os.path.join(path, ADAPTER_WEIGHTS), "pt") as f:
            stored = set(f.keys())
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as err:  # shapes of another model, bad file
        raise ValueError(f"{flag} {path!r}: the LoRA adapter does not fit its base model {base!r} "
                         f"({type(err).__name__}: {err}).") from None
    missing = sorted(set(get_peft_model_state_dict(model, save_embedding_layers=False)) - stored)
    if missing:
        raise ValueError(f"{flag} {path!r}: {ADAPTER_WEIGHTS} lacks {len(missing)} tensors of the adapter its config "
                         f"describes ({missing[:3]}); save the adapter again.")
    return model

"""A tiny random GPT-2 with the project's tokenizer, written to a folder, for fast training tests; the settings
of a small run on it; and what 'unchanged' and 'the same weights' mean for a run folder."""

import os

import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from drpt_ref.data.tokenizer import save_tokenizer


def write_tiny_model(path, seed: int = 0, n_layer: int = 2, n_embd: int = 32) -> str:
    tok = save_tokenizer(str(path))
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=48, n_embd=n_embd, n_layer=n_layer, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(str(path), safe_serialization=True)
    return str(path)


def small_run(model: str, out, **changes):
    """The TrainConfig of a small, fast run of `drpt train` on a tiny model (SFT, simplex, 20 steps)."""
    from drpt_ref.training.train import TrainConfig

    base = dict(model=model, out=str(out), steps=20, n_general=8, m_target=3, target_size=16, pool_size=200,
                eval_every=10, eval_n=16, checkpoint_every=10, dtype="float64", progress=False, group_size=3,
                reward="partial", lr=3e-3)
    base.update(changes)
    return TrainConfig(**base)


def final_params(run_dir) -> dict:
    """The final weights of a run, as written."""
    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    """Bitwise equality of two state dicts."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tree(folder) -> dict:
    """relative path -> bytes of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return out


def train_argv(model, out, **changes) -> list[str]:
    """`drpt train` argv of a small float64 SGD run on the task suite (3 steps, simplex); `changes` override."""
    flags = dict(model=str(model), out=str(out), steps=3, n_general=6, m_target=2, target_size=12, pool_size=100,
                 eval_every=100, eval_n=8, checkpoint_every=100, dtype="float64", progress=False, optimizer="sgd",
                 lr=0.5, method="simplex")
    flags.update(changes)
    argv = ["train"]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def write_tiny_llama(path, seed: int = 0, tied: bool = False) -> str:
    """A 2-layer Llama (hidden 32, grouped-query attention) with random weights and the suite's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = save_tokenizer(str(path))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(path), safe_serialization=True)
    return str(path)

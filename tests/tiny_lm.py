"""A tiny random GPT-2 with the project's tokenizer, written to a folder, for fast training tests."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from drpt_ref.data.tokenizer import save_tokenizer


def write_tiny_model(path, seed: int = 0, n_layer: int = 2, n_embd: int = 32) -> str:
    tok = save_tokenizer(str(path))
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=48, n_embd=n_embd, n_layer=n_layer, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(str(path), safe_serialization=True)
    return str(path)

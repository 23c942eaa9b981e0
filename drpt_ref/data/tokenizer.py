"""A character-level tokenizer saved in Hugging Face format, and the batch encoders built on it (any tokenizer).

One token per character of a fixed alphabet (digits, lower-case letters, a little punctuation)
plus three special tokens. The `tokenizers` pipeline is: split every character (pre-tokenizer
regex "."), look each one up in a WordLevel vocabulary, and join the pieces back with no spaces
(Fuse decoder). Nothing is added automatically: encode("12+3=") is exactly 5 ids, so a prompt
and its completion can be encoded separately and concatenated. Sequences are written
`prompt + answer + <eos>`; `<pad>` fills batches and is never attended to nor trained on.

    build_tokenizer()            -> transformers.PreTrainedTokenizerFast
    save_tokenizer(path)         writes tokenizer.json, tokenizer_config.json, special_tokens_map.json
    encode_sft(tok, prompts, answers)      right-padded training batch, loss on answer + eos only
    encode_prompts(tok, prompts)           left-padded generation batch (prompts as text or as token ids)
    prepare_tokenizer(tok)                 any HF tokenizer made fit for the encoders: pad defaults to eos

The encoders serve any Hugging Face tokenizer: only the character tokenizer itself (recognised by its
vocabulary) refuses a character outside its alphabet; any other tokenizer encodes whatever text it gets.

Shapes:
    input_ids, attention_mask, labels   (B, T)   T = longest sequence in the batch
    position_ids                        (B, T)   0 at the first real token of each row
"""

from __future__ import annotations

import json
import os
import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIALS = (PAD, EOS, BOS, UNK)  # ids 0..3
ALPHABET = string.digits + string.ascii_lowercase + "+-*=:,.?! "  # one token each, after the specials
IGNORE = -100  # label of positions that carry no loss (prompt, padding)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer, built in memory (the same vocabulary every time)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(ALPHABET))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, bos_token=BOS,
                                   unk_token=UNK, padding_side="left", model_max_length=64)


def save_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Write the tokenizer files to `path`, loadable offline by AutoTokenizer (transformers 4 and 5)."""
    tok = build_tokenizer()
    tok.save_pretrained(path)
    config_file = os.path.join(path, "tokenizer_config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the name both major versions resolve
    with open(config_file, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    specials = {"pad_token": PAD, "eos_token": EOS, "bos_token": BOS, "unk_token": UNK}
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2, sort_keys=True)
    return tok


def is_char_tokenizer(tok) -> bool:
    """Whether `tok` is this module's character tokenizer (its exact vocabulary), the one with an alphabet."""
    if len(tok) != len(SPECIALS) + len(ALPHABET):  # cheap first: a BPE vocabulary is never read whole here
        return False
    return tok.get_vocab() == {t: i for i, t in enumerate(SPECIALS + tuple(ALPHABET))}


def encode_text(tok, text: str) -> list[int]:
    """Ids of `text`, nothing added. The character tokenizer maps one id per character and refuses (ValueError)
    a character outside its alphabet, which it could only write as <unk>; any other tokenizer encodes any text."""
    if is_char_tokenizer(tok):
        bad = sorted(set(text) - set(ALPHABET))
        if bad:
            raise ValueError(f"text={text!r} has characters {bad} outside the tokenizer's alphabet {ALPHABET!r}")
    return tok.encode(text, add_special_tokens=False)


def prepare_tokenizer(tok, say=print):
    """Make any HF tokenizer fit for the encoders, in place: a missing pad token defaults to eos (`say` prints
    that it did: padding is masked, so its id never reaches a loss). ValueError when there is no eos token
    (every row ends with <eos>, every completion stops at it). Returns `tok`."""
    if tok.eos_token_id is None:
        raise ValueError("the --model folder's tokenizer has no eos token (every row ends with it and sampling "
                         "stops at it); set \"eos_token\" in its tokenizer_config.json.")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
        say(f"the tokenizer has no pad token: padding with its eos token {tok.eos_token!r} (id {tok.eos_token_id}); "
            "padded positions are masked out of attention and loss.")
    return tok


def pad_id(tok) -> int:
    """The id that fills padded positions; ValueError naming the fix when the tokenizer has none."""
    if tok.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; call data.tokenizer.prepare_tokenizer(tok) first "
                         "(it pads with eos), or set \"pad_token\" in its tokenizer_config.json.")
    return tok.pad_token_id


def encode_sft(tok, prompts: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded batch of prompt + answer + eos; labels are -100 except on answer and eos."""
    if len(prompts) != len(answers):
        raise ValueError(f"prompts ({len(prompts)}) and answers ({len(answers)}) must have equal length")
    return encode_sft_ids(tok, [encode_text(tok, p) for p in prompts], [encode_text(tok, a) for a in answers])


def encode_sft_ids(tok, prompt_ids: list[list[int]], answer_ids: list[list[int]]) -> dict[str, torch.Tensor]:
    """`encode_sft` from token ids: each answer's ids are kept exactly (sampled completions), then <eos>."""
    if len(prompt_ids) != len(answer_ids):
        raise ValueError(f"prompts ({len(prompt_ids)}) and answers ({len(answer_ids)}) must have equal length")
    rows, labels = [], []
    for p_ids, a in zip(prompt_ids, answer_ids):
        a_ids = list(a) + [tok.eos_token_id]
        rows.append(list(p_ids) + a_ids)
        labels.append([IGNORE] * len(p_ids) + a_ids)
    T = max(len(r) for r in rows)
    pad = pad_id(tok)
    input_ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])  # (B, T)
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])  # (B, T)
    labels_t = torch.tensor([lab + [IGNORE] * (T - len(lab)) for lab in labels])  # (B, T)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels_t}


def encode_prompts(tok, prompts: list) -> dict[str, torch.Tensor]:
    """Left-padded batch of prompts, with position ids that start at 0 on each row's first token. A prompt is
    a string (encoded with encode_text) or a sequence of token ids (kept exactly: a file's encoded prompt)."""
    rows = [encode_text(tok, p) if isinstance(p, str) else list(p) for p in prompts]
    T = max(len(r) for r in rows)
    pad = pad_id(tok)
    input_ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])  # (B, T)
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])  # (B, T)
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}

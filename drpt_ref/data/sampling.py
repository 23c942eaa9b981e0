"""Sampling groups of completions for GRPO, batched, from the current model, reproducibly.

Each prompt is repeated G times and all B * G rows are decoded together with a KV cache, drawing every token from
softmax(logits / temperature) with a generator seeded per step (training/run_state.py), so a resumed run samples
exactly what an uninterrupted one did. The draw runs on the model's device with a generator there (a generator on
another device type is refused). On a GPU the host reads whether every row has ended once per STOP_CHECK_EVERY
tokens, not per token (each read waits for the device): no completion changes (an ended row only emits <eos>), and
the generator is rewound to its state after the draw that ended the last row, so later draws from it (the next call
on the same generator) are unchanged too. On a CPU, where a read costs nothing, the check runs after every token,
as it always did, so CPU runs draw what earlier versions drew (`stop_check_every` overrides either). A completion
ends at the first <eos> (or after max_new_tokens). `sample_completions` returns each completion twice: its text (for
the reward, special tokens skipped) and the ids exactly as sampled (for the loss: the training batch is built from
them with `tokenizer.encode_sft_ids`, each scored as its ids followed by <eos>, so a sampled <unk>, <pad> or <bos>
is scored as what it was; a completion that hit max_new_tokens is scored as if it had stopped). `sample_groups`
returns the texts only.

Shapes:
    prompts: B strings  ->  completions: B lists of G strings
    ids, mask, position ids   (B*G, T) left-padded prompts, then (B*G, 1) per decoding step
"""

from __future__ import annotations

import inspect

import torch

from drpt_ref.data.tokenizer import encode_prompts

STOP_CHECK_EVERY = 8  # GPU: decoding steps between host reads of "every row ended" (each read waits for the device)


def cache_keyword(model) -> str:
    """The forward keyword, and output field, of the KV cache: 'cache' where transformers names it so (5.x renamed
    `past_key_values`, which now warns), else 'past_key_values'. Read from the first module whose forward names
    either (a peft or other wrapper passing keywords through is looked into)."""
    for module in model.modules():
        params = inspect.signature(module.forward).parameters
        if "cache" in params or "past_key_values" in params:
            return "cache" if "cache" in params else "past_key_values"
    return "past_key_values"


def sample_groups(model, tok, prompts: list[str], group_size: int, max_new_tokens: int,
                  temperature: float, generator: torch.Generator) -> list[list[str]]:
    """G sampled completions per prompt (text before the first <eos>)."""
    return sample_completions(model, tok, prompts, group_size, max_new_tokens, temperature, generator)[0]


@torch.no_grad()
def sample_completions(model, tok, prompts: list[str], group_size: int, max_new_tokens: int,
                       temperature: float, generator: torch.Generator, stop_check_every: int | None = None
                       ) -> tuple[list[list[str]], list[list[list[int]]]]:
    """G sampled completions per prompt: (texts, ids), each B lists of G; ids are those sampled, before <eos>.

    generator: on the model's device type. stop_check_every: decoding steps between host reads of "every row ended"
    (None: 1 on a CPU, STOP_CHECK_EVERY elsewhere); it changes no completion, nor the generator's state after the call.
    """
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1 (completions sampled per prompt).")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use evaluate.greedy_generate for greedy).")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1 (tokens sampled per completion).")
    if stop_check_every is not None and (isinstance(stop_check_every, bool) or not isinstance(stop_check_every, int)
                                         or stop_check_every < 1):
        raise ValueError(f"stop_check_every={stop_check_every!r} must be an int >= 1 (decoding steps between host "
                         "reads of 'every row ended'), or None for the device's default.")
    device = next(model.parameters()).device
    gen_device = getattr(generator, "device", None)
    if gen_device is None or gen_device.type != device.type or \
            (device.index is not None and gen_device.index is not None and gen_device.index != device.index):
        raise ValueError(f"generator is on {gen_device} but the model on {device}: sampling draws on the model's "
                         f"device; pass torch.Generator(device='{device}') (run_state.step_generator(..., "
                         "device=...))")
    rows = [p for p in prompts for _ in range(group_size)]  # B*G prompts, each repeated G times
    batch = {k: v.to(device) for k, v in encode_prompts(tok, rows).items()}
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]  # (B*G, T)
    eos = tok.eos_token_id
    past, steps, states, cache = None, [], [], cache_keyword(model)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)  # (B*G,)
    every = stop_check_every or (1 if device.type == "cpu" else STOP_CHECK_EVERY)  # steps between host reads
    for s in range(max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache: past})
        probs = torch.softmax(out.logits[:, -1].double() / temperature, dim=-1)  # (B*G, V) float64: reproducible
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B*G,) drawn on the device
        if every > 1:  # the generator's state after this draw (host-side, no device read)
            states.append(generator.get_state())
        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)  # finished rows keep emitting <eos>
        steps.append(nxt)
        done |= nxt == eos
        if (s + 1) % every == 0 and bool(done.all()):  # one host read per `every` tokens
            break
        past = getattr(out, cache)
        ids = nxt[:, None]  # (B*G, 1)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)  # (B*G, T + s)
        pos = pos[:, -1:] + 1  # (B*G, 1)
    generated = torch.stack(steps, dim=1).tolist()  # (B*G, S)
    if every > 1:  # rewind the generator to where the per-token check leaves it: after the draw that ended the last
        # row (or the last draw), so that a later draw from it (make_batches samples the target batch next) is the same
        generator.set_state(states[max(row.index(eos) if eos in row else len(row) - 1 for row in generated)])
    texts, ids_out = [], []
    for row in generated:
        row = row[: row.index(eos)] if eos in row else row
        texts.append(tok.decode(row, skip_special_tokens=True))
        ids_out.append(row)
    group = lambda xs: [xs[i * group_size:(i + 1) * group_size] for i in range(len(prompts))]  # noqa: E731
    return group(texts), group(ids_out)

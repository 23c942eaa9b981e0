"""GRPO sampling: reproducible from the per-step generator, and greedy in the low-temperature limit."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from drpt_ref.data.sampling import sample_completions, sample_groups
from drpt_ref.data.tokenizer import build_tokenizer
from drpt_ref.training.evaluate import greedy_generate
from drpt_ref.training.run_state import step_generator


def _model(tok):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=48, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(cfg).eval()


def test_sampling_is_reproducible_and_greedy_at_low_temperature():
    tok = build_tokenizer()
    model = _model(tok)
    prompts = ["12+34=", "5+6=", "987+12="]
    a = sample_groups(model, tok, prompts, 4, 6, 1.0, step_generator(3, 7))
    b = sample_groups(model, tok, prompts, 4, 6, 1.0, step_generator(3, 7))
    c = sample_groups(model, tok, prompts, 4, 6, 1.0, step_generator(3, 8))
    assert a == b and a != c
    assert [len(g) for g in a] == [4, 4, 4]
    cold = sample_groups(model, tok, prompts, 2, 6, 1e-4, step_generator(0, 0))
    greedy = greedy_generate(model, tok, prompts, max_new_tokens=6)
    assert [g[0] for g in cold] == greedy and [g[1] for g in cold] == greedy


class _EosLeaning(torch.nn.Module):
    """A model whose <eos> logit is raised, so that rows end at different, early steps."""

    def __init__(self, model, eos: int, lift: float):
        super().__init__()
        self.model, self.eos, self.lift, self.calls = model, eos, lift, 0

    def forward(self, **kw):
        self.calls += 1  # decoding steps run
        out = self.model(**kw)
        out.logits[..., self.eos] += self.lift
        return out


def test_reading_the_stop_less_often_changes_no_completion():
    """The GPU cadence (one host read per STOP_CHECK_EVERY tokens) samples what the per-token check samples: an ended
    row only emits <eos>, so the extra steps after every row ended add nothing before the cut at <eos>; and the
    generator is rewound past their draws."""
    tok = build_tokenizer()
    model = _EosLeaning(_model(tok), tok.eos_token_id, 2.5)
    prompts = ["12+34=", "5+6=", "987+12=", "1+1="]
    runs, calls = [], []
    for k in (None, 1, 3, 8):  # None: the device's default, per token on a CPU
        model.calls = 0
        runs.append(sample_completions(model, tok, prompts, 4, 30, 1.0, step_generator(2, 5), stop_check_every=k))
        calls.append(model.calls)
    lengths = {len(ids) for group in runs[0][1] for ids in group}
    assert len(lengths) >= 3 and max(lengths) < 30  # rows end at different steps, all before the limit
    assert runs[0] == runs[1] == runs[2] == runs[3]
    # the cadence is really used (else the equality above would hold trivially): the stop is seen at the first
    # multiple of k at or after the step that drew the last row's <eos>, so the later cadences decode extra steps
    last = max(lengths) + 1
    assert calls[:2] == [last, last] and calls[2:] == [min(30, -(-last // k) * k) for k in (3, 8)]
    assert calls[2] > last or calls[3] > last
    # and the generator is left where the per-token check leaves it: a second call on it (make_batches samples the
    # target batch after the general one with one generator) samples the same completions
    seconds = []
    for k in (1, 3, 8):
        gen = step_generator(2, 5)
        sample_completions(model, tok, prompts, 4, 30, 1.0, gen, stop_check_every=k)
        seconds.append(sample_completions(model, tok, ["3+4=", "55+66="], 4, 30, 1.0, gen, stop_check_every=k))
    assert seconds[0] == seconds[1] == seconds[2]


def _uncached(model, tok, prompts, group_size, max_new_tokens, temperature, generator):
    """The reference decode: no KV cache, each step the whole left-padded sequence; a draw from softmax(logits / T)
    (temperature None: argmax); ended rows emit <eos>; each row cut at its first <eos>."""
    from drpt_ref.data.tokenizer import encode_prompts

    batch = encode_prompts(tok, [p for p in prompts for _ in range(group_size)])
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]  # (R, T)
    eos, done = tok.eos_token_id, torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]  # (R, V)
            if temperature is None:
                nxt = logits.argmax(dim=-1)  # (R,)
            else:
                nxt = torch.multinomial(torch.softmax(logits.double() / temperature, -1), 1, generator=generator)[:, 0]
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            done |= nxt == eos
            ids = torch.cat([ids, nxt[:, None]], dim=1)  # (R, T + s + 1)
            mask, pos = torch.cat([mask, torch.ones_like(nxt[:, None])], 1), torch.cat([pos, pos[:, -1:] + 1], 1)
    rows = ids[:, batch["input_ids"].shape[1]:].tolist()  # (R, max_new_tokens)
    rows = [r[:r.index(eos)] if eos in r else r for r in rows]
    return [rows[i * group_size:(i + 1) * group_size] for i in range(len(prompts))]


def test_decoding_uses_the_kv_cache_under_its_current_name_without_a_deprecation_warning():
    """transformers 5 renamed the forward's `past_key_values` to `cache` (the old name warns, FutureWarning and its
    logger): one sampling call and one greedy decoding raise no warning about the cache, and the cache is really
    used (a keyword the model ignored would drop the context): the tokens equal those of decoding without a cache,
    the whole sequence every step (float64)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    from drpt_ref.training.evaluate import greedy_ids

    tok = build_tokenizer()
    torch.manual_seed(0)  # weights large enough that the context decides the tokens; <eos> raised: rows end apart
    cfg = GPT2Config(vocab_size=len(tok), n_positions=48, n_embd=32, n_layer=2, n_head=2, initializer_range=0.2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = _EosLeaning(GPT2LMHeadModel(cfg).eval().double(), tok.eos_token_id, 1.0)
    prompts = ["12+34=", "5+6=", "987+12="]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logging.warning_once.cache_clear()  # a once-only warning already given elsewhere would hide here
    hf_logging.get_logger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sampled = sample_completions(model, tok, prompts, 3, 10, 1.0, step_generator(5, 1))[1]
            greedy = greedy_ids(model, tok, prompts, 10, batch_size=2)
    finally:
        hf_logging.get_logger().removeHandler(handler)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    assert not [m for m in said if "past_key_values" in m or "cache" in m.lower()], said
    reference = _uncached(model, tok, prompts, 3, 10, 1.0, step_generator(5, 1))
    greedy_reference = [g[0] for g in _uncached(model, tok, prompts, 1, 10, None, None)]
    assert sampled == reference and greedy == greedy_reference
    assert len({len(ids) for group in sampled for ids in group}) > 2 and len(set(map(len, greedy))) > 1  # end apart

    class Forget(torch.nn.Module):  # a model that takes the cache and drops it: the comparison must see that
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, cache=None, past_key_values=None, **kw):
            return self.inner(**kw)

    forget = Forget(model)
    assert sample_completions(forget, tok, prompts, 3, 10, 1.0, step_generator(5, 1))[1] != reference
    assert greedy_ids(forget, tok, prompts, 10, batch_size=2) != greedy_reference


def test_bad_sampling_arguments_are_refused():
    """stop_check_every: 0 used to mean the default, a negative number or a float a cadence of its own, a string a
    TypeError; max_new_tokens = 0 failed in torch.stack; a missing generator raised an AttributeError."""
    import pytest

    tok = build_tokenizer()
    model = _model(tok)
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="stop_check_every"):
            sample_completions(model, tok, ["1+1="], 2, 4, 1.0, step_generator(0, 0), stop_check_every=bad)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        sample_completions(model, tok, ["1+1="], 2, 0, 1.0, step_generator(0, 0))
    with pytest.raises(ValueError, match="generator is on None"):  # not a generator (the global stream is not used)
        sample_completions(model, tok, ["1+1="], 2, 4, 1.0, None)

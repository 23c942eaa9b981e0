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
        self.model, self.eos, self.lift = model, eos, lift

    def forward(self, **kw):
        out = self.model(**kw)
        out.logits[..., self.eos] += self.lift
        return out


def test_reading_the_stop_less_often_changes_no_completion():
    """The GPU cadence (one host read per STOP_CHECK_EVERY tokens) samples what the per-token check samples: an ended
    row only emits <eos>, so the extra steps after every row ended add nothing before the cut at <eos>."""
    tok = build_tokenizer()
    model = _EosLeaning(_model(tok), tok.eos_token_id, 2.5)
    prompts = ["12+34=", "5+6=", "987+12=", "1+1="]
    runs = [sample_completions(model, tok, prompts, 4, 30, 1.0, step_generator(2, 5), stop_check_every=k)
            for k in (1, 3, 8)]
    lengths = {len(ids) for group in runs[0][1] for ids in group}
    assert len(lengths) >= 3 and max(lengths) < 30  # rows end at different steps, all before the limit
    assert runs[0] == runs[1] == runs[2]

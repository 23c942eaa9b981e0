"""Issue 13 outside the solvers: the Gram leaves shared parameters out, and GRPO / HPT score exactly the sampled ids.

- A bias shared by two linear layers gets gradient from both: the per-layer engines would count it twice. It
  is left out (with its layers), and the Gram of what is covered equals the one from materialized per-unit
  gradients of exactly those parameters.
- On a freshly initialised model of the suite's shape, samples contain <unk>, <pad> and <bos>; the loss rows
  of grpo_batch and hpt_batch hold the sampled ids (then <eos>), never a decode/re-encode of them.
"""

import torch
from gram_cases import make_batch, tiny_gpt2, unit_loss
from transformers import GPT2Config, GPT2LMHeadModel

from drpt_ref.data.sampling import sample_completions
from drpt_ref.data.tasks import get_task
from drpt_ref.data.tokenizer import build_tokenizer
from drpt_ref.gram.compute import compute_gram
from drpt_ref.gram.exact import per_unit_gradients
from drpt_ref.gram.layers import covered_parameters
from drpt_ref.training.hpt import hpt_batch
from drpt_ref.training.run_state import step_generator
from drpt_ref.training.train_data import grpo_batch

torch.set_num_threads(2)


def test_a_shared_bias_is_left_out_and_the_gram_is_exact():
    model = tiny_gpt2(0)
    blocks = model.transformer.h
    blocks[1].mlp.c_fc.bias = blocks[0].mlp.c_fc.bias  # one bias, two layers
    shared = {"transformer.h.0.mlp.c_fc.bias", "transformer.h.1.mlp.c_fc.bias"}
    covered = covered_parameters(model)
    assert not shared & set(covered) and "transformer.h.0.attn.c_attn.weight" in covered
    loss = unit_loss("sft")
    general, target = make_batch("sft", 4, 10, 1), make_batch("sft", 2, 8, 2)
    gram = compute_gram(model, loss, general, target, "ghost")
    K, b, c = gram.total()
    def flat(batch):  # (U, P) per-unit gradients of exactly the covered parameters, materialized
        grads = per_unit_gradients(model, loss, batch, covered)
        return torch.cat([grads[name].reshape(batch.num_units, -1) for name in covered], dim=1)

    Gm, gT = flat(general), flat(target).mean(0)  # (n, P), (P,)
    assert torch.allclose(K, Gm @ Gm.T, rtol=1e-10, atol=1e-14)
    assert torch.allclose(b, Gm @ gT, rtol=1e-10, atol=1e-14) and torch.allclose(c, gT @ gT, rtol=1e-10)


def _fresh_suite_model(tok):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=48, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(cfg).eval()


def _answer_ids(batch, row):
    ids = batch.input_ids[row][batch.loss_mask[row].bool()]
    return ids.tolist()


def test_grpo_and_hpt_score_the_sampled_ids():
    tok = build_tokenizer()
    model = _fresh_suite_model(tok)
    prompts = get_task("add3").grpo(16, seed=0, split="train")
    G, new = 4, 6
    texts, ids = sample_completions(model, tok, [p.prompt for p in prompts], G, new, 1.0, step_generator(5, 1))
    special = {tok.unk_token_id, tok.pad_token_id, tok.bos_token_id} - {None}
    flat = [row for group in ids for row in group]
    assert sum(any(t in special for t in row) for row in flat) > 0  # the case that used to lose tokens
    batch, _ = grpo_batch(tok, model, prompts, G, step_generator(5, 1), max_new_tokens=new)
    for r, row in enumerate(flat):
        assert _answer_ids(batch, r) == row + [tok.eos_token_id]
    batch, info = hpt_batch(tok, model, prompts, G, step_generator(5, 1), gamma=0, max_new_tokens=new)
    for u, is_sft in enumerate(info["is_sft"].tolist()):
        for g in range(G):
            want = tok.encode(prompts[u].reference, add_special_tokens=False) if is_sft else ids[u][g]
            assert _answer_ids(batch, u * G + g) == want + [tok.eos_token_id]

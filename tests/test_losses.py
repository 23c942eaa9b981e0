"""The per-unit losses against hand computations: SFT token-mean NLL, sigmoid DPO, GRPO advantages, clip, KL."""

import math
import statistics

import pytest
import torch
from gram_cases import make_batch, random_rows, tiny_gpt2

from drpt_ref.losses.dpo import DPOLoss, dpo_unit_loss, sequence_logprob
from drpt_ref.losses.grpo import GRPOLoss, group_advantages, grpo_unit_loss, k3_kl
from drpt_ref.losses.sft import SFTLoss, sft_unit_loss
from drpt_ref.losses.unit_batch import RowBatch, concat_batches, token_logprobs

torch.set_num_threads(2)
D = torch.float64


def test_sft_hand_computation():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.25, -8.0, -9.0]], dtype=D)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    expected = torch.tensor([(2.0 + 3.0) / 2, (0.5 + 0.25) / 2], dtype=D)
    assert torch.allclose(sft_unit_loss(logprobs, mask), expected, rtol=0, atol=1e-15)


@torch.no_grad()
def test_sft_on_model_matches_a_loop_over_answer_tokens():
    model = tiny_gpt2()
    batch = random_rows(4, 10, torch.Generator().manual_seed(3))
    loss = SFTLoss()(token_logprobs(model, batch.input_ids, batch.attention_mask), batch)
    for r in range(batch.num_rows):
        length = int(batch.attention_mask[r].sum())
        logits = model(input_ids=batch.input_ids[r:r + 1, :length]).logits[0]  # unpadded row alone
        answer = [t for t in range(length) if batch.loss_mask[r, t]]
        nll = [-torch.log_softmax(logits[t - 1], -1)[batch.input_ids[r, t]] for t in answer]
        assert abs(float(loss[r]) - float(sum(nll)) / len(answer)) < 1e-12


@torch.no_grad()
def test_padding_content_does_not_change_losses():
    model = tiny_gpt2()
    batch = random_rows(4, 10, torch.Generator().manual_seed(5))
    ids = batch.input_ids.clone()
    ids[batch.attention_mask == 0] = 7
    other = RowBatch(ids, batch.attention_mask, batch.loss_mask)
    lp1 = token_logprobs(model, batch.input_ids, batch.attention_mask)
    lp2 = token_logprobs(model, other.input_ids, other.attention_mask)
    assert torch.equal(SFTLoss()(lp1, batch), SFTLoss()(lp2, other))


def test_dpo_formula_with_hand_built_logprobs():
    pc, pr, rc, rr = (torch.tensor(v, dtype=D) for v in ([-3.0, -1.0], [-4.0, -0.5], [-3.5, -1.2], [-3.0, -0.7]))
    beta = 0.5
    loss = dpo_unit_loss(pc, pr, rc, rr, beta)
    for u in range(2):
        margin = (pc[u] - rc[u]) - (pr[u] - rr[u])
        assert abs(float(loss[u]) - math.log1p(math.exp(-beta * float(margin)))) < 1e-15
    # equal policy and reference: log 2 whatever beta
    assert torch.allclose(dpo_unit_loss(pc, pr, pc, pr, 3.0), torch.full((2,), math.log(2.0), dtype=D))


@torch.no_grad()
def test_dpo_batch_pairs_rows_and_sums_answer_tokens():
    model, ref = tiny_gpt2(0), tiny_gpt2(1)
    batch = make_batch("dpo", 3, 10, seed=4, ref_model=ref)
    lp = token_logprobs(model, batch.input_ids, batch.attention_mask)
    mask = batch.loss_mask[:, 1:]
    seq = [float((lp[r] * mask[r]).sum()) for r in range(6)]
    ref_seq = batch.extras["ref_logprob"]
    loss = DPOLoss(0.5)(lp, batch)
    for u in range(3):
        margin = (seq[2 * u] - ref_seq[2 * u]) - (seq[2 * u + 1] - ref_seq[2 * u + 1])
        assert abs(float(loss[u]) + math.log(1 / (1 + math.exp(-0.5 * float(margin))))) < 1e-12
    assert torch.allclose(sequence_logprob(lp, mask), torch.tensor(seq, dtype=D))


def test_group_advantages_by_hand():
    rewards = [[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 6.0]]
    r = torch.tensor(rewards, dtype=D)
    plain = group_advantages(r, std_normalize=False)
    normed = group_advantages(r, std_normalize=True, eps=1e-4)
    for u, row in enumerate(rewards):
        mu, sd = statistics.mean(row), statistics.stdev(row)  # stdev: the unbiased (n - 1) std
        for g, x in enumerate(row):
            assert abs(float(plain[u, g]) - (x - mu)) < 1e-15
            assert abs(float(normed[u, g]) - (x - mu) / (sd + 1e-4)) < 1e-14
    assert torch.equal(group_advantages(torch.ones(2, 3, dtype=D), True), torch.zeros(2, 3, dtype=D))


def test_grpo_clip_follows_the_ppo_formula():
    eps, A = 0.2, torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=D)  # one group of 4 one-token completions
    old = torch.zeros(1, 4, 1, dtype=D)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.9], dtype=D)).reshape(1, 4, 1).requires_grad_()
    mask = torch.ones(1, 4, 1)
    loss = grpo_unit_loss(logp, mask, A, old, clip_eps=eps)
    # ratios 1.5 (A>0: clipped to 1.2), 0.5 (A<0: clipped to 0.8), 1.1 and 0.9 (inside the band)
    expected = -(1.2 * 1 + 0.8 * -1 + 1.1 * 1 + 0.9 * -1) / 4
    assert abs(float(loss.detach()) - expected) < 1e-15
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    # clipped tokens get no gradient; inside the band d(-rho A)/d logp = -rho A / count
    assert torch.allclose(grad.flatten(), torch.tensor([0.0, 0.0, -1.1 / 4, 0.9 / 4], dtype=D))
    unclipped = grpo_unit_loss(logp, mask, A, old)
    assert abs(float(unclipped.detach()) + (1.5 - 0.5 + 1.1 - 0.9) / 4) < 1e-15
    # the pessimistic side is never clipped: A>0 with rho<1-eps keeps rho A
    low = torch.log(torch.tensor([0.5], dtype=D)).reshape(1, 1, 1)
    kept = grpo_unit_loss(low, torch.ones(1, 1, 1), A[:, :1], old[:, :1], clip_eps=eps)
    assert abs(float(kept.detach()) + 0.5) < 1e-15


def test_grpo_kl_is_the_k3_estimator_and_token_mean_over_the_group():
    logp = torch.tensor([[[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]]], dtype=D)  # (U=1, G=2, T-1=3)
    ref = torch.tensor([[[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]]], dtype=D)
    mask = torch.tensor([[[1, 1, 0], [1, 0, 0]]])  # 3 completion tokens in the group: the normaliser
    A = torch.tensor([[0.7, -0.7]], dtype=D)
    loss = grpo_unit_loss(logp, mask, A, None, kl_coef=0.3, ref_logprobs=ref)
    k3 = [math.exp(q) - q - 1 for q in (-0.5, 1.0, 0.0)]
    expected = (-0.7 - 0.7 + 0.7 + 0.3 * sum(k3)) / 3  # on-policy: rho = 1
    assert abs(float(loss) - expected) < 1e-15
    assert float(k3_kl(logp, ref).min()) >= 0.0 and float(k3_kl(ref, ref).abs().max()) == 0.0


@torch.no_grad()
def test_grpo_batch_loss_groups_rows():
    model, ref = tiny_gpt2(0), tiny_gpt2(1)
    batch = make_batch("grpo", 2, 10, seed=6, ref_model=ref)
    lp = token_logprobs(model, batch.input_ids, batch.attention_mask)
    loss = GRPOLoss(3, clip_eps=0.2, kl_coef=0.1)(lp, batch)
    for u in range(2):
        sub = batch.select_units([u])
        direct = grpo_unit_loss(lp[3 * u:3 * u + 3][None], sub.loss_mask[None, :, 1:], sub.extras["advantages"][None],
                                sub.extras["old_logprobs"][None], clip_eps=0.2, kl_coef=0.1,
                                ref_logprobs=sub.extras["ref_logprobs"][None])
        assert torch.allclose(loss[u], direct[0], rtol=0, atol=1e-15)


def test_bad_inputs_name_the_argument():
    x = torch.zeros(2, 3, dtype=D)
    with pytest.raises(ValueError, match="answer tokens"):
        sft_unit_loss(x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="beta"):
        DPOLoss(0.0)
    with pytest.raises(ValueError, match="std_normalize"):
        group_advantages(torch.zeros(2, 1), True)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_unit_loss(x[None], torch.ones(1, 2, 3), torch.zeros(1, 2), kl_coef=0.1)
    with pytest.raises(ValueError, match="clip_eps"):
        grpo_unit_loss(x[None], torch.ones(1, 2, 3), torch.zeros(1, 2), clip_eps=1.5)
    ids = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="rows_per_unit"):
        RowBatch(ids, torch.ones(3, 4), torch.zeros(3, 4), rows_per_unit=2)
    with pytest.raises(ValueError, match="loss_mask"):
        RowBatch(ids, torch.tensor([[1, 1, 0, 0]] * 3), torch.tensor([[0, 1, 1, 0]] * 3))
    with pytest.raises(ValueError, match="rows_per_unit differs"):
        concat_batches(RowBatch(ids[:2], torch.ones(2, 4), torch.zeros(2, 4), 2), RowBatch(ids, torch.ones(3, 4),
                                                                                         torch.zeros(3, 4)))


def test_values_outside_the_mask_never_reach_loss_or_gradient():
    logp = torch.tensor([[-1.0, -1e4, -float("inf")]], dtype=D, requires_grad=True)
    mask = torch.tensor([[1, 0, 0]])
    big = torch.tensor([[0.0, 1e4, 0.0]], dtype=D)  # old / ref log-probs that would overflow exp outside the mask
    losses = [sft_unit_loss(logp, mask), sequence_logprob(logp, mask),
              grpo_unit_loss(logp[None], mask[None], torch.ones(1, 1, dtype=D), big[None], clip_eps=0.2,
                             kl_coef=0.1, ref_logprobs=big[None])]
    for loss in losses:
        (grad,) = torch.autograd.grad(loss.sum(), logp)
        assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all())
        assert float(grad[0, 1:].abs().max()) == 0.0

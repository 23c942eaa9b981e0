"""The unified policy-gradient estimator and HPT (issue 6).

- pi_ref = pi_theta, A = 1: exactly the gradient of the token-mean NLL (autograd);
- clip mask + pi_old: exactly the gradient of PPO's clipped surrogate (autograd);
- REINFORCE and the off-policy term against autograd of their textbook losses;
- GRPO advantages against a hand computation;
- the HPT gate switches exactly at gamma, and the hybrid loss is SFT or Dr.GRPO per unit;
- the reported value: sft the token-mean NLL (not its surrogate's constant -1), reinforce -r log pi, and the
  loss_target / loss_general a Dr step logs for HPT units the demonstration NLL and the GRPO surrogate.
"""

import pytest
import torch
import torch.nn.functional as F
from tiny_lm import write_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from drpt_ref.data.tasks import TARGET, get_task
from drpt_ref.losses import unified_pg as pg
from drpt_ref.losses.grpo import grpo_unit_loss
from drpt_ref.losses.sft import sft_unit_loss
from drpt_ref.losses.unit_batch import RowBatch
from drpt_ref.training.dr_step import Knobs, dr_step, freeze_uncovered
from drpt_ref.training.hpt import HPTLoss, hpt_batch, hpt_gate

U, G, T, V, D = 3, 4, 7, 11, 5


def _policy(seed=0):
    """A tiny softmax policy: W (V, D) is the parameter; token log-probs (U, G, T) of fixed tokens."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(V, D, generator=gen, dtype=torch.float64, requires_grad=True)
    X = torch.randn(U, G, T, D, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, V, (U, G, T), generator=gen)
    mask = (torch.rand(U, G, T, generator=gen) < 0.7).double()
    mask[:, 0, 0] = 1.0  # every unit has a token
    logp = torch.log_softmax(X @ W.T, -1).gather(-1, tokens[..., None]).squeeze(-1)  # (U, G, T)
    return W, logp, mask, gen


def _grad(loss, W):
    return torch.autograd.grad(loss, W, retain_graph=True)[0]


def _token_mean(per_token, mask):
    return (per_token * mask).sum((1, 2)) / mask.sum((1, 2))


def test_sft_instance_is_the_token_mean_nll_gradient():
    W, logp, mask, _ = _policy()
    ours = pg.sft().unit_loss(logp, mask, torch.zeros(U, G, dtype=torch.float64))
    ref = _token_mean(-logp, mask)  # the token-mean NLL of each unit's rows
    assert torch.allclose(_grad(ours.sum(), W), _grad(ref.sum(), W), rtol=1e-12, atol=1e-14)
    # G = 1: the engine's SFT loss itself
    ours1 = pg.sft().unit_loss(logp[:, :1], mask[:, :1], torch.zeros(U, 1, dtype=torch.float64))
    ref1 = sft_unit_loss(logp[:, 0], mask[:, 0])
    assert torch.allclose(_grad(ours1.sum(), W), _grad(ref1.sum(), W), rtol=1e-12, atol=1e-14)


def test_sft_and_reinforce_report_their_likelihood_loss_not_the_surrogate():
    """Value: sft the token-mean NLL, reinforce the token mean of -r log pi (their surrogates read -1, -r)."""
    W, logp, mask, gen = _policy(4)
    nll = pg.sft().unit_loss(logp, mask, torch.zeros(U, G, dtype=torch.float64))
    assert torch.allclose(nll, _token_mean(-logp, mask), rtol=1e-12, atol=0)
    assert bool((nll > 0).all())  # an NLL, not the surrogate's -1
    r = torch.rand(U, G, generator=gen, dtype=torch.float64)
    ours = pg.reinforce().unit_loss(logp, mask, r)
    assert torch.allclose(ours, _token_mean(-r[..., None] * logp, mask), rtol=1e-12, atol=0)
    # grpo keeps its surrogate's value (on-policy: minus the token mean of the advantages), as the grpo paradigm
    a = r - r.mean(-1, keepdim=True)
    grpo = pg.grpo(eps=None, std_normalize=False).unit_loss(logp, mask, r)
    assert torch.allclose(grpo, _token_mean(-a[..., None].expand_as(mask), mask), rtol=1e-12, atol=1e-15)


def test_ppo_clip_instance_is_the_clipped_surrogate_gradient():
    W, logp, mask, gen = _policy(1)
    old = logp.detach() + 0.4 * torch.randn(U, G, T, generator=gen, dtype=torch.float64)  # ratios ~ e^{+-0.4}
    adv = torch.randn(U, G, generator=gen, dtype=torch.float64)
    eps = 0.2
    ours = pg.ppo_clip(eps).unit_loss(logp, mask, adv, old)
    rho = torch.exp(logp - old)
    a = adv[..., None]
    ref = _token_mean(-torch.minimum(rho * a, rho.clamp(1 - eps, 1 + eps) * a), mask)  # the standard PPO loss
    assert torch.allclose(_grad(ours.sum(), W), _grad(ref.sum(), W), rtol=1e-12, atol=1e-14)
    stable = pg.stable_ppo_clip(eps)(rho, a)
    on = mask.bool()
    assert bool((stable[on] == 0).any()) and bool((stable[on] == 1).any())  # both cases were exercised
    # without the mask the gradient differs: the test can tell the mask apart
    plain = pg.Estimator("no_clip", pg.stable_none, pg.ref_pi_old, pg.adv_reward).unit_loss(logp, mask, adv, old)
    assert not torch.allclose(_grad(plain.sum(), W), _grad(ref.sum(), W))


def test_reinforce_and_off_policy_against_their_textbook_losses():
    W, logp, mask, gen = _policy(2)
    r = torch.randint(0, 2, (U, G), generator=gen).double()
    ours = pg.reinforce().unit_loss(logp, mask, r)
    ref = _token_mean(-r[..., None] * logp, mask)  # r grad log pi
    assert torch.allclose(_grad(ours.sum(), W), _grad(ref.sum(), W), rtol=1e-12, atol=1e-14)
    ours_off = pg.off_policy(std_normalize=False).unit_loss(logp, mask, r)
    a = (r - r.mean(-1, keepdim=True))[..., None]
    ref_off = _token_mean(-a * torch.exp(logp), mask)  # A grad pi_theta: no 1 / pi
    assert torch.allclose(_grad(ours_off.sum(), W), _grad(ref_off.sum(), W), rtol=1e-12, atol=1e-14)


def test_grpo_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 1.0]], dtype=torch.float64)
    s1 = (4 * 0.25 / 3) ** 0.5  # unbiased std of group 1: centred +-0.5
    s2 = ((3 * 0.125**2 + 0.375**2) / 3) ** 0.5  # group 2: mean 0.625, centred -0.125 x 3, +0.375
    want = torch.tensor([[0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), -0.5 / (s1 + 1e-4), 0.5 / (s1 + 1e-4)],
                         [-0.125 / (s2 + 1e-4)] * 3 + [0.375 / (s2 + 1e-4)]], dtype=torch.float64)
    assert torch.allclose(pg.grpo().advantage(r), want, rtol=1e-12)
    assert torch.allclose(pg.grpo(std_normalize=False).advantage(r),
                          torch.tensor([[0.5, -0.5, -0.5, 0.5], [-0.125, -0.125, -0.125, 0.375]], dtype=torch.float64))


def test_hpt_gate_switches_exactly_at_gamma():
    counts = torch.arange(0, 9)  # 0..8 correct of 8
    for gamma in (0, 2, 5):
        is_sft = hpt_gate(counts, gamma)
        assert is_sft.tolist() == [c <= gamma for c in range(9)]
        assert bool(is_sft[gamma]) and not bool(is_sft[gamma + 1])  # <= gamma: SFT; gamma + 1: RL
    with pytest.raises(ValueError, match="gamma"):
        hpt_gate(counts, 1.5)


def _rows(lp, mask2d, rewards, sft_flags):
    R = lp.shape[0]
    lm = torch.cat([torch.zeros(R, 1), mask2d], 1).long()
    batch = RowBatch(torch.zeros(R, lp.shape[1] + 1, dtype=torch.long), torch.ones(R, lp.shape[1] + 1).long(), lm,
                     G, {"rewards": rewards.reshape(-1), "sft": sft_flags.repeat_interleave(G).double()})
    return batch


def test_hybrid_loss_is_sft_or_dr_grpo_per_unit():
    W, logp, mask, gen = _policy(3)
    r = torch.rand(U, G, generator=gen, dtype=torch.float64)
    is_sft = torch.tensor([True, False, True])
    batch = _rows(logp.reshape(U * G, T), mask.reshape(U * G, T), r, is_sft)
    coef = 0.3
    ours = HPTLoss(G, sft_coef=coef)(logp.reshape(U * G, T), batch)
    for u in range(U):
        if is_sft[u]:
            ref = coef * _token_mean(-logp[u:u + 1], mask[u:u + 1])
        else:  # Dr.GRPO: r - mean, no std, no clip (loss_grpo, an independent implementation)
            adv = r[u:u + 1] - r[u:u + 1].mean()
            ref = grpo_unit_loss(logp[u:u + 1], mask[u:u + 1], adv)
        assert torch.allclose(_grad(ours[u], W), _grad(ref.sum(), W), rtol=1e-12, atol=1e-14), u


def test_hpt_batch_rows_follow_the_gate(tmp_path):
    path = write_tiny_model(tmp_path)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = get_task(TARGET).grpo(3, 0, "train")
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    all_sft, info = hpt_batch(tok, model, prompts, 3, gen(), gamma=3)
    assert info["is_sft"].all() and all_sft.extras["sft"].eq(1).all()
    demo = [tok.decode(all_sft.input_ids[i][all_sft.loss_mask[i].bool()], skip_special_tokens=True)
            for i in range(9)]
    assert demo == [p.reference for p in prompts for _ in range(3)]
    all_rl, info = hpt_batch(tok, model, prompts, 3, gen(), gamma=-1)
    assert not info["is_sft"].any() and all_rl.extras["sft"].eq(0).all()


def _row_nll(model, batch):
    """Token-mean NLL of each row's answer tokens, from the logits by cross-entropy (independent of the package's
    log-prob and loss code). -> (R,)"""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]  # (R, T-1, V)
    nll = F.cross_entropy(logits.transpose(1, 2), batch.input_ids[:, 1:], reduction="none")  # (R, T-1)
    mask = batch.loss_mask[:, 1:].to(nll.dtype)  # position t scores token t + 1
    return (nll * mask).sum(-1) / mask.sum(-1)


def test_logged_hpt_loss_is_the_demonstration_nll(tmp_path):
    """The loss_target a Dr step logs on SFT units is sft_coef x the demonstration's token-mean NLL (it was -sft_coef
    whatever the model); on RL units (loss_general) it stays the Dr.GRPO surrogate, -(token mean of A)."""
    path = write_tiny_model(tmp_path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).double().eval()
    g, coef = 3, 0.5
    gen = torch.Generator().manual_seed(0)
    target, info_t = hpt_batch(tok, model, get_task(TARGET).grpo(2, 0, "train"), g, gen, gamma=g)  # all SFT
    general, info_g = hpt_batch(tok, model, get_task(TARGET).grpo(3, 1, "train"), g, gen, gamma=-1)  # all RL
    assert info_t["is_sft"].all() and not info_g["is_sft"].any()
    general.extras["rewards"] = torch.rand(3 * g, generator=gen, dtype=torch.float64)  # a random model earns 0
    # the sampled ids are scored as sampled, so a random model's completions in a group often have one length,
    # and then the token mean of A is exactly 0: drop the last answer token of one row so the lengths differ
    last = int(general.loss_mask[0].nonzero().max())
    general.loss_mask[0, last] = 0
    want_target = coef * _row_nll(model, target).reshape(-1, g).mean(-1).mean()  # rows of a unit are identical
    adv = general.extras["rewards"].reshape(-1, g) - general.extras["rewards"].reshape(-1, g).mean(-1, keepdim=True)
    mask = general.loss_mask[:, 1:].double().reshape(-1, g, general.input_ids.shape[1] - 1)  # (U, G, T-1)
    want_general = (-(adv[..., None] * mask).sum((1, 2)) / mask.sum((1, 2))).mean()
    assert float(want_target) > 0 and abs(float(want_general)) > 1e-3  # neither the old -coef nor a trivial 0
    params = freeze_uncovered(model)
    rec = dr_step(model, torch.optim.SGD(params, lr=0.1), HPTLoss(g, sft_coef=coef), general, target, "mean",
                  Knobs(), solver="exact")
    assert rec["loss_target"] == pytest.approx(float(want_target), rel=1e-12)
    assert rec["loss_general"] == pytest.approx(float(want_general), rel=1e-12, abs=1e-15)

"""ADAPT (issue 6): the pooling ramp, the score and the gate on hand-built cases; no gradient through the weights.

Every expected number here is written out by hand from the formulas of theory/unified_view.md,
eqs. (9)-(11), not by calling the code under test.
"""

import math

import pytest
import torch
from tiny_lm import write_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from drpt_ref.data.tasks import TARGET, general_pool, get_task
from drpt_ref.gram.compute import gram_from_capture
from drpt_ref.gram.ghost import capture
from drpt_ref.losses.sft import SFTLoss
from drpt_ref.losses.unit_batch import RowBatch
from drpt_ref.training.adapt import AdaptConfig, AdaptRule, adapt_features, adapt_weights, anchor_centroid
from drpt_ref.training.dr_step import Knobs, StepContext
from drpt_ref.training.rep_features import last_hidden_states, ramp_weights
from drpt_ref.training.train_data import sft_batch


def test_ramp_weights_by_hand():
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    assert torch.allclose(ramp_weights(mask, 1.0), torch.tensor([[0, 1 / 6, 2 / 6, 3 / 6, 0]], dtype=torch.float64))
    assert torch.allclose(ramp_weights(mask, 0.0), torch.tensor([[0, 1 / 3, 1 / 3, 1 / 3, 0]], dtype=torch.float64))
    half = torch.tensor([0, 0.5 + 0.5 / 3, 0.5 + 1 / 3, 1.0, 0], dtype=torch.float64)  # (1 - r) + r t / N
    assert torch.allclose(ramp_weights(mask, 0.5), (half / half.sum())[None])
    with pytest.raises(ValueError, match="ramp"):
        ramp_weights(mask, 1.5)


def _batch(answer_masks):
    R, T = len(answer_masks), len(answer_masks[0])
    lm = torch.tensor(answer_masks)
    return RowBatch(torch.zeros(R, T, dtype=torch.long), torch.ones(R, T, dtype=torch.long), lm, 1)


def test_weights_match_the_formula_on_a_hand_built_case():
    # two general rows, T = 3, d = 2; the answer is tokens 1 and 2 (ramp 1: omega = 1/3, 2/3)
    hidden = torch.tensor([[[9.0, 9.0], [3.0, 0.0], [0.0, 3.0]],     # pool: (1, 2) -> unit (1, 2)/sqrt 5
                           [[9.0, 9.0], [0.0, -6.0], [3.0, 0.0]]],   # pool: (2, -2) -> (1, -1)/sqrt 2
                          dtype=torch.float64)
    general = _batch([[0, 1, 1], [0, 1, 1]])
    # two anchors, already unit vectors after pooling: (1, 0) and (0, 1) -> mean (1/2, 1/2)
    anchor_hidden = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 5.0], [0.0, 5.0]]],
                                 dtype=torch.float64)
    anchors = _batch([[0, 1, 1], [0, 1, 1]])
    tau = 0.5
    for score, c in (("mean_cosine", (0.5, 0.5)), ("centroid_cosine", (1 / math.sqrt(2), 1 / math.sqrt(2)))):
        cfg = AdaptConfig(tau=tau, score=score, reduction="none")
        phi = adapt_features(hidden, general, cfg)
        cent = anchor_centroid(adapt_features(anchor_hidden, anchors, cfg), score)
        s = phi @ cent
        s_hand = torch.tensor([(c[0] * 1 + c[1] * 2) / math.sqrt(5), (c[0] - c[1]) / math.sqrt(2)],
                              dtype=torch.float64)
        assert torch.allclose(s, s_hand, rtol=1e-12)
        sig = torch.tensor([1 / (1 + math.exp(-x / tau)) for x in s_hand.tolist()], dtype=torch.float64)
        assert torch.allclose(adapt_weights(s, cfg), sig, rtol=1e-12)
        assert torch.allclose(adapt_weights(s, AdaptConfig(tau=tau, reduction="sum")), sig / sig.sum(), rtol=1e-12)
        assert torch.allclose(adapt_weights(s, AdaptConfig(tau=tau, reduction="mean")), sig / 2, rtol=1e-12)
        soft = torch.tensor([math.exp(x / tau) for x in s_hand.tolist()], dtype=torch.float64)
        assert torch.allclose(adapt_weights(s, AdaptConfig(tau=tau, softmax=True)), soft / soft.sum(), rtol=1e-12)
    clipped = adapt_weights(torch.tensor([5.0, -5.0]), AdaptConfig(tau=1.0, w_max=0.6, reduction="none"))
    assert torch.allclose(clipped, torch.tensor([0.6, 1 / (1 + math.exp(5.0))]))


def test_bad_config_names_the_argument():
    for kw, name in (({"tau": 0.0}, "tau"), ({"refresh": 0}, "refresh"), ({"score": "dot"}, "score"),
                     ({"reduction": "max"}, "reduction"), ({"tokens": "prompt"}, "tokens")):
        with pytest.raises(ValueError, match=name):
            AdaptConfig(**kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("tiny_adapt"))
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).double().eval()


def test_weights_receive_no_gradient_and_anchors_refresh_every_R(tiny):
    tok, model = tiny
    general = sft_batch(tok, general_pool(6, 0, "train", "sft"))
    target = sft_batch(tok, get_task(TARGET).sft(2, 0, "train"))
    anchors = sft_batch(tok, get_task(TARGET).sft(5, 1, "train"))
    with last_hidden_states(model) as h:
        cap = capture(model, SFTLoss(), general, target)
    assert any(p.requires_grad for p in model.parameters())
    assert not h["hidden"].requires_grad and h["hidden"].grad_fn is None  # features are constants
    K, b, c = gram_from_capture(cap, "ghost").total()
    rule = AdaptRule(AdaptConfig(refresh=2), anchors)
    encoded = []
    for step in range(1, 6):
        ctx = StepContext(model, cap, K[None], b[None], c[None], Knobs(), step=step, seed=0, hidden=h["hidden"])
        _, w, info = rule(ctx)
        assert not w.requires_grad and w.grad_fn is None
        encoded.append(info["anchors_encoded_at"])
    assert encoded == [1, 1, 3, 3, 5]
    # the score is the mean cosine to the anchors, the centroid computed here from transformers' hidden states
    with torch.no_grad():
        hs = model(input_ids=anchors.input_ids, attention_mask=anchors.attention_mask,
                   output_hidden_states=True).hidden_states[-1]
    om = ramp_weights(anchors.loss_mask, 1.0)
    phi_a = torch.einsum("rt,rtd->rd", om, hs)
    phi_a = phi_a / phi_a.norm(dim=-1, keepdim=True)
    assert torch.allclose(rule.centroid, phi_a.mean(0), rtol=1e-10)
    # a weight built from features that do carry a graph is still detached
    s = torch.randn(4, requires_grad=True)
    assert not adapt_weights(s, AdaptConfig()).requires_grad

"""Selection baselines as weight rules, and every method through `drpt train` (issue 6).

- `less` online selects exactly topk (closed_forms.solve_topk) of the cosine scores b_i / sqrt(K_ii c) of
  the sketched Gram (gram/sketch.py, an independent path) on the same batch;
- `rds` scores with the hidden states transformers itself returns; `random` is seeded per step;
- every method runs for SFT, DPO and GRPO (hpt for its paradigm) and logs the same metric keys, with
  the logged objective equal to eq. (2) of its logged (alpha, w) and Gram;
- a rule's state (LESS offline subset, ADAPT centroid) survives --resume bitwise.
"""

import dataclasses
import os

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import write_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from drpt_ref.core.closed_forms import solve_topk
from drpt_ref.data.tasks import TARGET, general_pool, get_task
from drpt_ref.gram.compute import gram_from_capture
from drpt_ref.gram.ghost import capture
from drpt_ref.losses.sft import SFTLoss
from drpt_ref.training.baselines import LessRule, RandomRule, RdsRule, cosine_scores, sketch_features
from drpt_ref.training.dr_step import Knobs, StepContext
from drpt_ref.training.rep_features import last_hidden_states
from drpt_ref.training.run_state import read_metrics
from drpt_ref.training.train import TrainConfig, train
from drpt_ref.training.train_data import sft_batch


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_baselines"))


@pytest.fixture(scope="module")
def sft_step(tiny_path):
    """A capture of 10 general and 3 target SFT units on the tiny model (float64), its ghost Gram, hidden states."""
    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path).double().eval()
    general = sft_batch(tok, general_pool(10, 0, "train", "sft"))
    target = sft_batch(tok, get_task(TARGET).sft(3, 0, "train"))
    with last_hidden_states(model) as h:
        cap = capture(model, SFTLoss(), general, target)
    K, b, c = gram_from_capture(cap, "ghost").total()
    return model, cap, K, b, c, h["hidden"]


def _ctx(sft_step, k=3, seed=0):
    model, cap, K, b, c, hidden = sft_step
    return StepContext(model, cap, K[None], b[None], c[None], Knobs(k=k), step=1, seed=seed, hidden=hidden)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_less_online_is_topk_of_the_sketched_cosines(sft_step, k):
    _, cap, *_ = sft_step
    rule = LessRule("online", dim=8, seed=5)
    _, w, info = rule(_ctx(sft_step, k=k))
    Ks, bs, cs = (x.double() for x in gram_from_capture(cap, "sketch", sketch_dim=8, seed=5).total())
    cos = bs / (Ks.diagonal() * cs).sqrt()  # cos(P g_i, P g_T) from the sketched Gram
    _, w_ref, _ = solve_topk(Ks.numpy(), cos.numpy(), float(cs), k)
    assert torch.equal(w[0], torch.as_tensor(w_ref, dtype=w.dtype))
    assert torch.allclose(torch.tensor(info["scores"], dtype=torch.float64), cos, rtol=1e-9)
    F = sketch_features(cap, 8, 5)  # its inner products are the sketched joint Gram's entries
    assert torch.allclose(F[:10] @ F[:10].T, Ks, rtol=1e-9, atol=1e-12)


def test_rds_scores_use_transformers_last_hidden_states(sft_step):
    model, cap, *_ = sft_step
    batch = cap.batch
    with torch.no_grad():
        hs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   output_hidden_states=True).hidden_states[-1]  # (R, T, d), transformers' own
    last = batch.attention_mask.sum(1) - 1  # the <eos> of each row
    h = hs[torch.arange(hs.shape[0]), last]
    f = h / h.norm(dim=-1, keepdim=True)
    want = (f[:10] @ (f[10:].mean(0) / f[10:].mean(0).norm()))
    _, w, info = RdsRule("last")(_ctx(sft_step, k=4))
    assert torch.allclose(torch.tensor(info["scores"], dtype=torch.float64), want, rtol=1e-9)
    assert set(info["selected"]) == set(torch.topk(want, 4).indices.tolist())
    assert torch.allclose(w.sum(), torch.tensor(1.0, dtype=w.dtype)) and int((w > 0).sum()) == 4


def test_random_is_seeded_per_step(sft_step):
    picks = [RandomRule()(_ctx(sft_step, k=3, seed=s))[2]["selected"] for s in range(6)]
    assert picks[0] == RandomRule()(_ctx(sft_step, k=3, seed=0))[2]["selected"]
    assert len({tuple(p) for p in picks}) > 1 and all(len(set(p)) == 3 for p in picks)


def test_cosine_scores_by_hand():
    f = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    assert torch.allclose(cosine_scores(f, torch.tensor([1.0, 0.0])), torch.tensor([0.6, 0.0, -1.0]))


# ---- every method through drpt train ---------------------------------------------------------------------------

METHODS = ["target", "mean", "mix", "capped_simplex", "random", "less", "less_offline", "rds", "adapt",
           "adapt_softmax"]


def _cfg(tiny_path, out, paradigm, method, **kw):
    mode = "offline" if method == "less_offline" else "online"
    base = dict(model=tiny_path, out=str(out), paradigm=paradigm, method=method.replace("_offline", ""),
                less_mode=mode, steps=2, n_general=5, m_target=2, target_size=6, pool_size=24, eval_every=2,
                eval_n=4, checkpoint_every=2, progress=False, group_size=2, max_new_tokens=4, reward="partial",
                k=2, less_fraction=0.25, less_dim=4, adapt_refresh=1, lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


def _objective(K, b, c, alpha, w):  # eq. (2) in theory/notation.md, in float64 from the logged numbers
    beta = 1.0 - alpha
    return 0.5 * w @ K @ w - beta * b @ w + 0.5 * beta**2 * c


@pytest.mark.parametrize("paradigm", ["sft", "dpo", "grpo", "hpt"])
def test_every_method_runs_and_logs_the_same_metrics(tiny_path, tmp_path, paradigm):
    methods = ["hpt", "capped_simplex"] if paradigm == "hpt" else METHODS
    keys = {}
    for method in methods:
        cfg = _cfg(tiny_path, tmp_path / method, paradigm, method)
        train(cfg)
        recs = read_metrics(cfg.out)
        assert [r["step"] for r in recs] == [1, 2], method
        keys[method] = [sorted(r) for r in recs]
        for r in recs:
            w = torch.tensor(r["weights"][0], dtype=torch.float64)
            assert len(w) == cfg.n_general and r["converged"], method
            if method in ("random", "less", "rds"):
                assert sorted(set(w.tolist())) == [0.0, 0.5], method  # 1/k on k = 2 units
            if method.startswith("adapt") or method in ("less_offline", "mean"):
                assert torch.all(w > 0) and abs(float(w.sum()) - 1) < 1e-6, method
    first = next(iter(keys.values()))
    assert all(k == first for k in keys.values()), keys
    if paradigm == "hpt":  # the tiny random model solves nothing: every unit is an SFT unit at gamma = 0
        assert read_metrics(str(tmp_path / "hpt"))[0]["batch_info"] == {"sft_units_general": 5,
                                                                        "sft_units_target": 2}


def test_logged_objective_is_eq2_of_the_logged_choice(tiny_path, tmp_path):
    """For a rule, the logged objective is 1/2 ||d - g_T||^2 of its (alpha, w) on the ghost Gram (same on a rerun)."""
    from drpt_ref.training.dr_step import dr_step, freeze_uncovered
    from drpt_ref.training.rules import TargetRule

    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path).double().eval()
    params = freeze_uncovered(model)
    general = sft_batch(tok, general_pool(6, 0, "train", "sft"))
    target = sft_batch(tok, get_task(TARGET).sft(2, 0, "train"))
    K, b, c = gram_from_capture(capture(model, SFTLoss(), general, target), "ghost").total()
    opt = torch.optim.SGD(params, lr=0.0)
    for rule, want in ((RdsRule(), None), (TargetRule(), 0.0)):
        rec = dr_step(model, opt, SFTLoss(), general, target, "x", Knobs(k=2), rule=rule)
        w = torch.tensor(rec["weights"][0], dtype=torch.float64)
        f = float(_objective(K, b, c, rec["alpha"][0], w))
        assert abs(rec["objective"][0] - f) <= 1e-10 * max(1.0, abs(f))
        if want is not None:
            assert abs(rec["objective"][0] - want) < 1e-12


@pytest.mark.parametrize("method", ["less_offline", "adapt"])
def test_rule_state_resumes_bitwise(tiny_path, tmp_path, method):
    kw = dict(steps=4, checkpoint_every=2, eval_every=2, adapt_refresh=3, dtype="float32")
    straight = _cfg(tiny_path, tmp_path / "straight", "sft", method, **kw)
    train(straight)
    part = _cfg(tiny_path, tmp_path / "resumed", "sft", method, **{**kw, "steps": 2})
    train(part)
    train(dataclasses.replace(part, steps=4, resume=True))
    a = load_file(os.path.join(straight.out, "final", "model.safetensors"))
    b = load_file(os.path.join(part.out, "final", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(read_metrics(straight.out)) == strip(read_metrics(part.out))
    if method == "adapt":  # anchors encoded at step 1 and re-encoded R = 3 steps later
        assert [r["method_info"]["anchors_encoded_at"] for r in read_metrics(part.out)] == [1, 1, 1, 4]


@pytest.mark.parametrize("kw,name", [({"method": "nope"}, "method"), ({"method": "hpt"}, "paradigm"),
                                     ({"method": "less", "less_mode": "batch"}, "less mode"),
                                     ({"method": "rds", "rds_pool": "max"}, "rds pool"),
                                     ({"method": "adapt", "adapt_tau": 0.0}, "tau"),
                                     ({"paradigm": "hpt", "method": "hpt", "kl_coef": 0.1}, "kl-coef")])
def test_bad_method_config_is_refused_before_the_run(tiny_path, tmp_path, kw, name):
    cfg = _cfg(tiny_path, tmp_path / "bad", kw.pop("paradigm", "sft"), kw.pop("method"), **kw)
    with pytest.raises(ValueError, match=name):
        train(cfg)
    assert not os.path.exists(cfg.out)

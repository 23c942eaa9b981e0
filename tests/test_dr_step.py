"""The Dr step on a real transformer (issue 5).

- the applied update is alpha g_T + G w with G and g_T from materialized per-unit gradients;
- method `target` is exactly a target-only step, `mean` exactly a standard step on the general batch;
- at the first step the objectives follow the nesting, for SFT, DPO and GRPO.
"""

import copy

import pytest
import torch
from tiny_lm import write_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from drpt_ref import project
from drpt_ref.data.tasks import TARGET, general_pool, get_task
from drpt_ref.gram.compute import compute_gram
from drpt_ref.gram.exact import per_unit_gradients
from drpt_ref.gram.layers import covered_parameters
from drpt_ref.losses.unit_batch import token_logprobs
from drpt_ref.training.dr_step import Knobs, dr_step, freeze_uncovered, method_params
from drpt_ref.training.train import TrainConfig, make_batches, unit_loss_of


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).double().eval()
    return path, tok, model


def _batches(paradigm, tok, model, n=6, m=3, step=1):
    cfg = TrainConfig(paradigm=paradigm, n_general=n, m_target=m, group_size=3, reward="partial")
    kind = paradigm
    target_set = getattr(get_task(TARGET), kind)(16, 0, "train")
    pool = general_pool(200, 0, "train", kind)
    ref = copy.deepcopy(model).requires_grad_(False)
    general, target, _ = make_batches(cfg, step, tok, model, ref, target_set, pool)
    return unit_loss_of(cfg), general, target


def _sgd_step(model, loss_fn, general, target, method, per_layer=False, **knobs):
    model = copy.deepcopy(model)
    params = freeze_uncovered(model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(params, lr=1.0)
    rec = dr_step(model, opt, loss_fn, general, target, method, Knobs(**knobs), per_layer=per_layer, solver="exact")
    delta = {k: before[k] - v.detach() for k, v in model.named_parameters()}  # = lr * d = d
    return rec, delta


@pytest.mark.parametrize("paradigm", ["sft", "dpo", "grpo"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_applied_update_is_alpha_gT_plus_Gw(tiny, paradigm, per_layer):
    """The parameter change of an SGD(lr=1) Dr step equals alpha g_T + G w from materialized per-unit gradients."""
    _, tok, model = tiny
    loss_fn, general, target = _batches(paradigm, tok, model)
    rec, delta = _sgd_step(model, loss_fn, general, target, "capped_simplex", per_layer=per_layer, k=2.0)
    g_gen = per_unit_gradients(model, loss_fn, general)  # name -> (n, *shape)
    g_tgt = per_unit_gradients(model, loss_fn, target)  # name -> (m, *shape)
    names = covered_parameters(model)
    layer_of = {name: name.rsplit(".", 1)[0] for name in names}
    layers = list(dict.fromkeys(layer_of.values()))
    for name in names:
        l = layers.index(layer_of[name]) if per_layer else 0
        alpha, w = rec["alpha"][l], torch.tensor(rec["weights"][l], dtype=torch.float64)
        d = alpha * g_tgt[name].mean(0) + torch.einsum("n,n...->...", w, g_gen[name])
        assert torch.allclose(delta[name], d, rtol=1e-9, atol=1e-12), name
    frozen = [k for k in delta if k not in names]
    assert frozen and all(torch.equal(delta[k], torch.zeros_like(delta[k])) for k in frozen)


@pytest.mark.parametrize("paradigm", ["sft", "dpo", "grpo"])
def test_target_and_mean_are_the_plain_steps(tiny, paradigm):
    """target: d = grad of the mean target loss; mean: d = grad of the mean general loss (covered params)."""
    _, tok, model = tiny
    loss_fn, general, target = _batches(paradigm, tok, model)
    names = covered_parameters(model)
    named = dict(model.named_parameters())
    for method, batch in (("target", target), ("mean", general)):
        _, delta = _sgd_step(model, loss_fn, general, target, method)
        loss = loss_fn(token_logprobs(model, batch.input_ids, batch.attention_mask), batch).mean()
        grads = torch.autograd.grad(loss, [named[k] for k in names])
        for k, g in zip(names, grads):
            assert torch.allclose(delta[k], g, rtol=1e-9, atol=1e-12), (method, k)


@pytest.mark.parametrize("paradigm", ["sft", "dpo", "grpo"])
def test_first_step_objectives_follow_the_nesting(tiny, paradigm):
    """subspace <= cone <= simplex <= capped_simplex <= mean on the Gram of the first step."""
    _, tok, model = tiny
    loss_fn, general, target = _batches(paradigm, tok, model, n=8, m=4)
    K, b, c = compute_gram(model, loss_fn, general, target, "ghost").total()
    f = {}
    for method in ("subspace", "cone", "simplex", "capped_simplex", "mean"):
        params = {k: v[0].item() for k, v in method_params(method, Knobs(k=3.0), K[None], b[None], c[None]).items()}
        f[method] = float(project(K, b, c, method, **params).objective)
    chain = [f[m] for m in ("subspace", "cone", "simplex", "capped_simplex", "mean")]
    assert all(x <= y * (1 + 1e-9) + 1e-12 for x, y in zip(chain, chain[1:])), chain
    assert chain[0] < chain[-1]  # the general batch does not already contain g_T


def test_compiled_solver_is_the_batched_solver_compiled(tiny, monkeypatch):
    """solver="compiled" calls project_batched(compiled=True) in the sync-free schedule (what batched/compiled.py
    compiles is tested against eager in tests/test_batched_compiled.py); with the compiled kernels swapped for the eager
    ones here (no compile in this test) the step is bitwise solver="batched"'s."""
    import drpt_ref.training.dr_step as dr_module

    real, calls = dr_module.project_batched, []

    def eager_instead(*args, compiled=False, **kwargs):
        calls.append((compiled, kwargs.get("sync_free")))
        return real(*args, **kwargs)

    monkeypatch.setattr(dr_module, "project_batched", eager_instead)
    _, tok, model = tiny
    loss_fn, general, target = _batches("sft", tok, model)
    out = {}
    for solver in ("batched", "compiled"):
        calls.clear()
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(freeze_uncovered(m), lr=1.0)
        rec = dr_step(m, opt, loss_fn, general, target, "capped_simplex", Knobs(), solver=solver)
        out[solver] = (rec, dict(m.named_parameters()))
        assert calls[0] == (solver == "compiled", True)  # the first solve is the sync-free one
    (rec_b, p_b), (rec_c, p_c) = out["batched"], out["compiled"]
    assert rec_b["converged"] and rec_c["converged"] and rec_b["weights"] == rec_c["weights"]
    assert all(torch.equal(p_b[k], p_c[k]) for k in p_b)


@pytest.mark.parametrize("solver", ["batched", "compiled"])
def test_a_sync_free_miss_is_re_solved_by_the_same_solver(tiny, monkeypatch, solver):
    """Where the sync-free answer does not certify, dr_step re-solves with the synchronising schedule of the same
    solver (compiled stays compiled), and the record is that solve's (no compile here: the compiled flag is recorded,
    the eager kernels answer)."""
    import drpt_ref.training.dr_step as dr_module

    real, calls = dr_module.project_batched, []

    def missed_once(*args, compiled=False, **kwargs):
        calls.append((compiled, kwargs.get("sync_free")))
        d = real(*args, **kwargs)
        if kwargs.get("sync_free"):
            d.info["converged"] = torch.zeros_like(d.info["converged"])  # the sync-free answer "did not certify"
        return d

    monkeypatch.setattr(dr_module, "project_batched", missed_once)
    _, tok, model = tiny
    loss_fn, general, target = _batches("sft", tok, model)
    m = copy.deepcopy(model)
    rec = dr_step(m, torch.optim.SGD(freeze_uncovered(m), lr=1.0), loss_fn, general, target, "capped_simplex", Knobs(),
                  solver=solver)
    assert calls == [(solver == "compiled", True), (solver == "compiled", False)] and rec["converged"]

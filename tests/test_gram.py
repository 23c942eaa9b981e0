"""Gram engines and the update assembly on a tiny random GPT-2 (float64).

ghost == exact (both forms, per layer), zero output gradients on padding, coverage, the sketch's
1/sqrt(dim) error, and the assembled update == alpha g_T + G w from materialized per-unit gradients.
"""

import math

import pytest
import torch
from gram_cases import make_batch, problem, tiny_gpt2, unit_loss

from drpt_ref.batched.solve import project_batched
from drpt_ref.gram.compute import compute_gram, gram_from_capture, kbc_from_joint
from drpt_ref.gram.exact import per_unit_gradients
from drpt_ref.gram.ghost import capture, collapsed_gram, use_pair_form
from drpt_ref.gram.layers import covered_layers, covered_parameters
from drpt_ref.gram.sketch import sketch_joint_gram
from drpt_ref.gram.update import assemble_update, weighted_backward_update
from drpt_ref.losses.unit_batch import concat_batches

torch.set_num_threads(2)
PARADIGMS = ("sft", "dpo", "grpo")
# The bar: ghost and exact are the same sums in a different order, so in float64 they agree
# to ~1e-15 (measured <= 1e-15); 1e-6 relative is the acceptance threshold.
GHOST_RTOL = 1e-6
# Assembled update vs materialized per-unit gradients: the same sums reordered, ~1e-15 in float64.
UPDATE_RTOL = 1e-10
SKETCH_DIMS = (16, 64, 256)
SKETCH_SEEDS = 32  # the error is heavy-tailed (products of Gaussians): average enough seeds

_CACHE = {}


def setup(paradigm):
    """(model, loss, general, target, exact Gram), computed once per paradigm."""
    if paradigm not in _CACHE:
        model, loss, general, target = problem(paradigm)
        _CACHE[paradigm] = (model, loss, general, target, compute_gram(model, loss, general, target, "exact"))
    return _CACHE[paradigm]


def rel(x, ref):
    return float((x - ref).norm() / ref.norm())


@pytest.mark.parametrize("mode", ["auto", "pair", "materialize"])
@pytest.mark.parametrize("paradigm", PARADIGMS)
def test_ghost_equals_exact(paradigm, mode):
    model, loss, general, target, exact = setup(paradigm)
    ghost = compute_gram(model, loss, general, target, "ghost", ghost_mode=mode)
    assert ghost.layer_names == exact.layer_names and ghost.K.shape == (8, 5, 5)
    if mode != "auto":
        assert set(ghost.info["modes"]) == {mode}
    for l in range(ghost.num_layers):  # every per-layer block
        assert rel(ghost.K[l], exact.K[l]) <= GHOST_RTOL
        assert rel(ghost.b[l], exact.b[l]) <= GHOST_RTOL
        assert rel(ghost.c[l], exact.c[l]) <= GHOST_RTOL
    for x, ref in zip(ghost.total(), exact.total()):
        assert rel(x, ref) <= GHOST_RTOL


def test_pair_form_in_chunks_is_the_same(monkeypatch):
    model, loss, general, target, exact = setup("dpo")
    whole = compute_gram(model, loss, general, target, "ghost", ghost_mode="pair")
    monkeypatch.setattr("drpt_ref.gram.ghost.PAIR_CHUNK_ELEMENTS", 3 * 8 * 24 * 24)  # 3 units per chunk
    chunked = compute_gram(model, loss, general, target, "ghost", ghost_mode="pair")
    assert rel(chunked.K, whole.K) <= 1e-14 and rel(chunked.K, exact.K) <= GHOST_RTOL


def test_cost_rule_compares_flops():
    """eq. (5): pairs iff U^2 T^2 (d_in + d_out) <= U T d_in d_out + U^2 d_in d_out (the table of theory/gram.md)."""
    for T, d_in, d_out, U in [(4, 128, 512, 2), (32, 128, 512, 20), (16, 32, 32, 3), (64, 512, 2048, 8), (2, 8, 8, 50)]:
        pair_flops = U**2 * T**2 * (d_in + d_out)
        mat_flops = U * T * d_in * d_out + U**2 * d_in * d_out
        assert use_pair_form(T, d_in, d_out, U) == (pair_flops <= mat_flops)
    assert use_pair_form(4, 128, 512, 2) and not use_pair_form(32, 128, 512, 20)  # both answers occur
    model, loss, general, target, exact = setup("dpo")  # T_u = 2 * 12 = 24 tokens per pair
    ghost = compute_gram(model, loss, general, target, "ghost")
    U = general.num_units + target.num_units
    T_u = general.rows_per_unit * max(general.input_ids.shape[1], target.input_ids.shape[1])
    for layer, mode in zip(covered_layers(model), ghost.info["modes"]):
        assert mode == ("pair" if use_pair_form(T_u, layer.d_in, layer.d_out, U) else "materialize")
    assert rel(ghost.K, exact.K) <= GHOST_RTOL


@pytest.mark.parametrize("paradigm", PARADIGMS)
def test_padding_gets_zero_output_gradient(paradigm):
    model, loss, general, target, _ = setup(paradigm)
    cap = capture(model, loss, general, target)
    pad = cap.batch.attention_mask == 0  # (R, T)
    assert bool(pad.any())
    for a, e in zip(cap.a, cap.e):
        assert float(e[pad].abs().max()) == 0.0  # exactly zero: padding never reaches a loss
        assert float(a[pad].abs().max()) > 0.0  # while the inputs there are not zero


def test_coverage_excludes_tied_embeddings_and_norms():
    model = tiny_gpt2()
    names = covered_parameters(model)
    assert len(names) == 16 and all(".attn.c_" in p or ".mlp.c_" in p for p in names)
    assert not any(k in p for p in names for k in ("wte", "wpe", "ln_", "lm_head"))


def test_untied_lm_head_is_covered_as_nn_linear():
    torch.manual_seed(0)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=40, n_positions=32, tie_word_embeddings=False,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).double().eval()
    assert "lm_head.weight" in covered_parameters(model)
    general, target = make_batch("sft", 4, 10, 1), make_batch("sft", 2, 8, 2)
    exact = compute_gram(model, unit_loss("sft"), general, target, "exact")
    for mode in ("pair", "materialize"):
        ghost = compute_gram(model, unit_loss("sft"), general, target, "ghost", ghost_mode=mode)
        assert rel(ghost.K[-1], exact.K[-1]) <= GHOST_RTOL and rel(ghost.b[-1], exact.b[-1]) <= GHOST_RTOL
    w = torch.linspace(-1, 1, 4, dtype=torch.float64)
    back = weighted_backward_update(model, unit_loss("sft"), general, target, 0.5, w)
    named = dict(model.named_parameters())
    for keep_flat in (False, True):  # from a and e, then from the per-unit gradients F the ghost Gram kept
        # (test_update_from_kept_and_captured_layers_mixed: both kinds of layer in one update)
        cap = capture(model, unit_loss("sft"), general, target)
        if keep_flat:
            gram_from_capture(cap, "ghost", ghost_mode="materialize")
        assert ("lm_head" in cap.flat) == keep_flat
        up = assemble_update(cap, 0.5, w)
        assert up["lm_head.weight"].shape == (40, 32)
        assert rel(up["lm_head.weight"], back["lm_head.weight"]) <= UPDATE_RTOL
        # in each parameter's own layout and contiguous: the optimizer's kernels are several times slower on a
        # transposed gradient (theory/step_cost.md, section 3)
        assert all(d.shape == named[p].shape and d.is_contiguous() for p, d in up.items())


def test_engines_leave_grad_untouched_and_total_sums_blocks():
    model, loss, general, target, exact = setup("sft")
    ghost = compute_gram(model, loss, general, target, "ghost")
    assert all(p.grad is None for p in model.parameters())
    K, b, c = ghost.total()
    assert torch.allclose(K, ghost.K.sum(0)) and K.shape == (5, 5) and b.shape == (5,) and c.dim() == 0
    blocks = ghost.regroup(lambda name: name.split(".")[2])  # "transformer.h.0..." -> "0"
    assert blocks.layer_names == ["0", "1"] and torch.allclose(blocks.K.sum(0), K)


def test_one_capture_serves_gram_and_update():
    model, loss, general, target, exact = setup("grpo")
    cap = capture(model, loss, general, target)
    gram = gram_from_capture(cap)
    assert rel(gram.K, exact.K) <= GHOST_RTOL and rel(gram.b, exact.b) <= GHOST_RTOL
    direction = project_batched(*(x[None] for x in gram.total()), "cone")
    up = assemble_update(cap, direction.alpha[0], direction.weights[0])
    back = weighted_backward_update(model, loss, general, target, direction.alpha[0], direction.weights[0])
    assert all(rel(up[p], back[p]) <= UPDATE_RTOL for p in up)
    with pytest.raises(ValueError, match="method"):
        gram_from_capture(cap, "exact")


def _reference_update(grads, n, alpha, w, layer_of):
    """alpha_l g_T + G_l w_l from materialized per-unit gradients (U, *shape)."""
    return {name: alpha[layer_of(name)] * G[n:].mean(0) + torch.einsum("u,u...->...", w[layer_of(name)], G[:n])
            for name, G in grads.items()}


@pytest.mark.parametrize("paradigm", PARADIGMS)
def test_assembled_update_equals_materialized(paradigm):
    model, loss, general, target, exact = setup(paradigm)
    n, L = general.num_units, exact.num_layers
    grads = per_unit_gradients(model, loss, concat_batches(general, target))
    cap = capture(model, loss, general, target)
    layer_index = {p: l for l, layer in enumerate(cap.layers) for p in layer.param_names}
    gen = torch.Generator().manual_seed(7)
    # global coefficients
    alpha, w = 0.3, torch.randn(n, generator=gen, dtype=torch.float64)
    ref = _reference_update(grads, n, [alpha] * L, [w] * L, layer_index.get)
    up = assemble_update(cap, alpha, w)
    back = weighted_backward_update(model, loss, general, target, alpha, w)
    assert set(up) == set(ref) == set(back)
    for name in ref:
        assert rel(up[name], ref[name]) <= UPDATE_RTOL and rel(back[name], ref[name]) <= UPDATE_RTOL
    # per-layer coefficients from one batched solve of the per-layer projections
    direction = project_batched(exact.K, exact.b, exact.c, "simplex")
    alpha_l, w_l = direction.alpha, direction.weights  # (L,), (L, n)
    ref = _reference_update(grads, n, alpha_l, w_l, layer_index.get)
    up = assemble_update(cap, alpha_l, w_l)
    for name in ref:
        assert rel(up[name], ref[name]) <= UPDATE_RTOL
    # the objective the solver reports is 1/2 ||d_l - g_T,l||^2 of the assembled direction, eq. (2)
    gT = {name: G[n:].mean(0) for name, G in grads.items()}
    for l, layer in enumerate(cap.layers):
        resid = sum(float(((up[p] - gT[p]) ** 2).sum()) for p in layer.param_names)
        assert abs(0.5 * resid - float(direction.objective[l])) <= 1e-8 * float(exact.c[l])


def test_sketch_error_falls_like_one_over_sqrt_dim():
    for paradigm in ("sft", "grpo"):  # one row per unit, a group per unit (DPO behaves like SFT)
        model, loss, general, target, exact = setup(paradigm)
        cap = capture(model, loss, general, target)
        K_exact = exact.K.sum(0)
        errors = []
        for dim in SKETCH_DIMS:
            errs = []
            for seed in range(SKETCH_SEEDS):
                K, _, _ = kbc_from_joint(sketch_joint_gram(cap, dim, seed)[0], cap.n, cap.m)
                errs.append(rel(K.sum(0), K_exact))
            errors.append(sum(errs) / len(errs))
        # eq. (9) in theory/gram.md: error ~ C / sqrt(dim); each 4x in dim halves it. Margins: ratio in
        # [1.4, 2.8] (theory 2) and err * sqrt(dim) constant within a factor 1.5 (measured
        # 0.83-0.87 SFT, 0.70-0.77 GRPO; DPO 0.79-0.86).
        for coarse, fine in zip(errors, errors[1:]):
            assert 1.4 <= coarse / fine <= 2.8, (paradigm, errors)
        scaled = [e * math.sqrt(d) for e, d in zip(errors, SKETCH_DIMS)]
        assert max(scaled) / min(scaled) <= 1.5, (paradigm, errors)


def test_sketch_is_seeded_and_unbiased_on_average():
    model, loss, general, target, exact = setup("dpo")
    one = compute_gram(model, loss, general, target, "sketch", sketch_dim=32, seed=3)
    again = compute_gram(model, loss, general, target, "sketch", sketch_dim=32, seed=3)
    other = compute_gram(model, loss, general, target, "sketch", sketch_dim=32, seed=4)
    assert torch.equal(one.K, again.K) and not torch.equal(one.K, other.K)
    cap = capture(model, loss, general, target)
    Js = [sketch_joint_gram(cap, 32, s)[0] for s in range(SKETCH_SEEDS)]
    K_mean = torch.stack([kbc_from_joint(J, 5, 3)[0].sum(0) for J in Js]).mean(0)
    K_one = kbc_from_joint(Js[0], 5, 3)[0].sum(0)
    # averaging 32 independent unbiased sketches cuts the error ~5.7x; ask for 2x
    assert rel(K_mean, exact.K.sum(0)) <= 0.5 * rel(K_one, exact.K.sum(0))


def test_bad_inputs_name_the_argument():
    model, loss, general, target, _ = setup("sft")
    with pytest.raises(ValueError, match="method"):
        compute_gram(model, loss, general, target, "fisher")
    with pytest.raises(ValueError, match="ghost_mode"):
        compute_gram(model, loss, general, target, "ghost", ghost_mode="both")
    with pytest.raises(ValueError, match="sketch_dim"):
        compute_gram(model, loss, general, target, "sketch", sketch_dim=0)
    with pytest.raises(ValueError, match="rows_per_unit"):
        compute_gram(model, unit_loss("dpo"), general, target)
    cap = capture(model, loss, general, target)
    with pytest.raises(ValueError, match="per layer"):
        assemble_update(cap, torch.zeros(3), torch.zeros(3, 5))
    model.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            compute_gram(model, loss, general, target, "ghost")
    finally:
        model.eval()


@pytest.mark.parametrize("n", [1, 4, 16])
def test_collapsed_gram_is_the_product_of_its_rows(n):
    """The three-block J of a collapsed F equals F F^T (float64, closed form) and is exactly symmetric."""
    F = torch.randn(n + 1, 300, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    F[0] = 0.0  # a unit whose gradient vanishes in this layer
    J = collapsed_gram(F, n)
    assert J.shape == (n + 1, n + 1) and torch.equal(J, J.T)
    assert torch.allclose(J, F @ F.T, rtol=1e-13, atol=1e-12) and torch.all(J[0] == 0)


@pytest.mark.parametrize("per_layer", [False, True])
def test_update_from_kept_and_captured_layers_mixed(per_layer):
    """Layers whose F was kept and layers assembled from a and e, alternating in one update (large models keep F only
    for their narrow layers, KEEP_FLAT_RATIO): every parameter equals the reference from materialized gradients."""
    model, loss, general, target, exact = setup("sft")
    n, L = general.num_units, exact.num_layers
    grads = per_unit_gradients(model, loss, concat_batches(general, target))
    cap = capture(model, loss, general, target)
    gram_from_capture(cap, "ghost", ghost_mode="materialize")
    for layer in cap.layers[1::2]:  # every other layer forgets its F: assembled from a and e
        cap.flat.pop(layer.name)
    assert 0 < len(cap.flat) < len(cap.layers)
    layer_index = {p: l for l, layer in enumerate(cap.layers) for p in layer.param_names}
    gen = torch.Generator().manual_seed(3)
    if per_layer:
        alpha = torch.rand(L, generator=gen, dtype=torch.float64)
        w = torch.randn(L, n, generator=gen, dtype=torch.float64)
    else:
        alpha, w = torch.tensor(0.4, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    a_l, w_l = (alpha, w) if per_layer else ([alpha] * L, [w] * L)
    ref = _reference_update(grads, n, a_l, w_l, layer_index.get)
    up = assemble_update(cap, alpha, w)
    assert set(up) == set(ref) and all(rel(up[p], ref[p]) <= UPDATE_RTOL for p in ref)

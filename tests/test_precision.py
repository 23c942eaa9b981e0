"""Mixed precision and gradient checkpointing under the Gram engines and the Dr step (theory/precision.md).

bf16: a bf16 model's K, b, c agree with the float32 computation on the same weights and batch within the bound of
eq. (5) of theory/precision.md, computed from the measured error of the per-unit gradients, and within the a priori
tolerance BF16_TOL; the Gram of the captured bf16 tensors is accumulated in float32 (its error against float64 is at
float32's level, where a bf16 accumulation would be at bf16's); under autocast, ghost equals the exact engine within
eq. (6); `drpt train --dtype bfloat16` trains. Checkpointing: the Gram and the update with non-reentrant checkpointing
equal those without (float64), on GPT-2 and Llama; reentrant checkpointing and shared layers are refused with their
true reasons; bad precision flags are refused with the flag named.
"""

import copy
import os

import pytest
import torch
from gram_cases import problem
from safetensors.torch import load_file
from tiny_lm import final_params, small_run, write_tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from drpt_ref.cli import main
from drpt_ref.gram.checkpointing import enable_checkpointing
from drpt_ref.gram.compute import compute_gram, gram_from_capture
from drpt_ref.gram.ghost import capture, materialized_flat
from drpt_ref.gram.update import assemble_update
from drpt_ref.losses.sft import SFTLoss
from drpt_ref.training.run_state import read_metrics
from drpt_ref.training.train import train

torch.set_num_threads(2)
PARADIGMS = ("sft", "dpo", "grpo")
U_BF16 = 2.0**-8  # bfloat16's unit round-off (8 significant bits)
UNIT_ROUNDOFF = {torch.bfloat16: U_BF16, torch.float16: 2.0**-11}  # float16: 11 significant bits
# Float32 accumulation of a Gram of N-term inner products of bf16 inputs (products exact in float32): error ~sqrt(N) u32
# relative to the terms (theory/precision.md, eq. (3)), <= 1e-5 for N <= 2e4; measured <= 1.1e-7 (blocked sums grow
# slower). 1e-5 is 400x below the 2^-8 a bf16 accumulation gives (asserted below).
ACC_TOL = 1e-5
# The a priori bf16 tolerance of K, b, c, normwise (eq. (4)), from eqs. (5)-(7) of theory/precision.md: on a model with
# logits of order 1 every captured tensor carries a few roundings (eta ~ 2-3 u) and their random signs average out in
# the token sums, so the per-unit gradients' error is eps ~ eta (measured 1.2-2.3 u, 10 seeds x 3 paradigms); EPS_MAX
# = 6 u allows 2.7x that, and eq. (5) turns it into 2 eps + eps^2 = 4.8 % for K, b, c. float16 (measured 1.6-1.8 u,
# u = 2^-11): the same 6 u.
EPS_REL = 6  # EPS_MAX in units of the format's u
EPS_MAX = EPS_REL * U_BF16
BF16_TOL = 2 * EPS_MAX + EPS_MAX**2
# Checkpointing recomputes the same forward from the same inputs: the same arithmetic, so equal to float64 round-off.
CKPT_RTOL = 1e-12


def normwise(K2, b2, c2, K, b, c):
    """Normwise errors of (K2, b2, c2) against (K, b, c), eq. (4) of theory/precision.md:
    max |dK_ij| / sqrt(K_ii K_jj), max |db_i| / sqrt(K_ii c), |dc| / c, per block. -> three floats"""
    K2, b2, c2, K, b, c = (x.double() for x in (K2, b2, c2, K, b, c))
    d = K.diagonal(dim1=-2, dim2=-1)  # (L, n)
    eK = ((K2 - K).abs() / (d[..., :, None] * d[..., None, :]).sqrt()).amax()
    eb = ((b2 - b).abs() / (d * c[..., None]).sqrt()).amax()
    ec = ((c2 - c).abs() / c).amax()
    return float(eK), float(eb), float(ec)


def unit_gradients(cap) -> torch.Tensor:
    """Every unit's gradient over all covered layers, materialized in float64 from a capture's a and e. -> (U, p)"""
    return torch.cat([materialized_flat(cap.per_unit(a).double(), cap.per_unit(e).double(), layer.has_bias)
                      for layer, a, e in zip(cap.layers, cap.a, cap.e)], dim=1)


def rel_errors(F2, F, n):
    """eps_u = ||g2_u - g_u|| / ||g_u|| of the n general units and of the target mean g_T. -> (n,), ()"""
    eps = (F2[:n] - F[:n]).norm(dim=1) / F[:n].norm(dim=1)
    gT2, gT = F2[n:].mean(0), F[n:].mean(0)
    return eps, (gT2 - gT).norm() / gT.norm()


def capture_bound(cap, cap_ref) -> torch.Tensor:
    """The right side of eq. (7) of theory/precision.md per unit: (eta_a + eta_e + eta_a eta_e) kappa_u, with eta the
    largest per-token relative error of the captured a (with the bias's constant 1 appended) and e against the
    reference capture, kappa_u = sum_t ||a_t|| ||e_t|| / ||g_u|| over all layers. -> (U,)"""
    def eta(x, x0):  # the largest relative error of one token's vector
        size = x0.norm(dim=-1)
        return float(((x - x0).norm(dim=-1)[size > 0] / size[size > 0]).max())

    eta_a = eta_e = 0.0
    num = 0.0
    for layer, a, e, a0, e0 in zip(cap.layers, cap.a, cap.e, cap_ref.a, cap_ref.e):
        a, e, a0, e0 = (x.double() for x in (a, e, a0, e0))
        if layer.has_bias:  # the bias is a weight on a constant input 1, exact in every format
            a, a0 = (torch.cat([x, torch.ones_like(x[..., :1])], -1) for x in (a, a0))
        eta_a, eta_e = max(eta_a, eta(a, a0)), max(eta_e, eta(e, e0))
        num = num + (cap_ref.per_unit(a0).norm(dim=-1) * cap_ref.per_unit(e0).norm(dim=-1)).sum(-1)  # (U,)
    kappa = num / unit_gradients(cap_ref).norm(dim=1)
    return (eta_a + eta_e + eta_a * eta_e) * kappa


def bf16_pair(paradigm, dtype=torch.bfloat16):
    """(half model, float32 model with the same weights (the half values), loss, general, target)."""
    model, loss, general, target = problem(paradigm)
    model16 = model.to(dtype)
    return model16, copy.deepcopy(model16).float(), loss, general, target


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("paradigm", PARADIGMS)
def test_half_gram_agrees_with_float32_within_the_derived_bound(paradigm, dtype):
    """bf16 (the acceptance) and fp16 (through the API: the engines run wherever torch has the kernels; the CLI
    keeps fp16 to GPUs)."""
    eps_max = EPS_REL * UNIT_ROUNDOFF[dtype]
    tol = BF16_TOL if dtype == torch.bfloat16 else 2 * eps_max + eps_max**2
    model16, model32, loss, general, target = bf16_pair(paradigm, dtype)
    cap16, cap32 = capture(model16, loss, general, target), capture(model32, loss, general, target)
    assert cap16.a[0].dtype == dtype and cap16.e[0].dtype == dtype  # captured in the model's dtype
    G16, G32 = gram_from_capture(cap16), gram_from_capture(cap32)
    assert G16.K.dtype == G16.b.dtype == G16.c.dtype == torch.float32  # accumulated in float32, eq. (1)
    n = general.num_units
    eps_u, eps_T = rel_errors(unit_gradients(cap16), unit_gradients(cap32), n)
    eps = max(float(eps_u.max()), float(eps_T))
    assert 0 < eps <= eps_max, eps  # the half-precision forward/backward's own error, measured
    assert (eps_u <= capture_bound(cap16, cap32)[:n]).all()  # eq. (7): bounded by the captures' error
    for total in (False, True):  # per layer, and the global sums the projection sees by default
        got = [x.unsqueeze(0) for x in G16.total()] if total else [G16.K, G16.b, G16.c]
        ref = [x.unsqueeze(0) for x in G32.total()] if total else [G32.K, G32.b, G32.c]
        eK, eb, ec = normwise(*got, *ref)
        # eq. (5) with the measured eps (global: eps bounds every layer's error too, the layers' norms add)
        if total:
            assert eK <= 2 * eps + eps**2 + ACC_TOL, (eK, eps)
            assert eb <= float(eps_u.max() + eps_T + eps_u.max() * eps_T) + ACC_TOL, (eb, eps)
            assert ec <= 2 * float(eps_T) + float(eps_T) ** 2 + ACC_TOL, (ec, float(eps_T))
        assert max(eK, eb, ec) <= tol, (total, eK, eb, ec)  # the stated a priori tolerance


@pytest.mark.parametrize("mode", ["pair", "materialize"])
def test_bf16_captures_are_accumulated_in_float32_not_bf16(mode):
    model16, _, loss, general, target = bf16_pair("sft")
    cap = capture(model16, loss, general, target)
    G = gram_from_capture(cap, ghost_mode=mode)
    F = unit_gradients(cap)  # float64 Gram of the same bf16 captures: the reference of eq. (3)
    n, m = cap.n, cap.m
    J = F @ F.T
    K, b, c = J[:n, :n], J[:n, n:].sum(-1) / m, J[n:, n:].sum() / m**2
    got = normwise(*(x.unsqueeze(0) for x in G.total()), K[None], b[None], c[None])
    assert max(got) <= ACC_TOL, got
    Fh = F.to(torch.bfloat16)  # the same Gram accumulated in bf16 (what the engines avoid): 2^-8-sized errors
    Jh = (Fh @ Fh.T).double()
    bad = normwise(Jh[None, :n, :n], (Jh[:n, n:].sum(-1) / m)[None], (Jh[n:, n:].sum() / m**2)[None],
                   K[None], b[None], c[None])
    assert max(bad) > 10 * ACC_TOL, bad  # so ACC_TOL tells float32 accumulation from bf16 accumulation


def test_an_overflowed_float16_capture_is_refused_with_the_layer_named():
    model, loss, general, target = problem("sft")
    model = model.to(torch.float16)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(3000)  # activations beyond float16's 65504
    with pytest.raises(ValueError, match=r"layer transformer\.h\.0\..* overflowed torch.float16"):
        capture(model, loss, general, target)


def test_autocast_ghost_equals_exact_engine_under_autocast():
    """Under autocast (float32 weights) both engines see the same bf16 products; the exact engine's per-unit
    gradients are rounded to bf16 once more, so they agree within eq. (6): 2u + u^2, normwise."""
    model, loss, general, target = problem("sft")
    model = model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cap = capture(model, loss, general, target)
        exact = compute_gram(model, loss, general, target, "exact")
    assert all(a.dtype == torch.bfloat16 for a in cap.a)  # the inputs as the layers multiplied them (not the float32
    # output of a layer norm, which autocast keeps in float32)
    ghost = gram_from_capture(cap)
    assert ghost.K.dtype == exact.K.dtype == torch.float32
    got = normwise(ghost.K, ghost.b, ghost.c, exact.K, exact.b, exact.c)
    assert max(got) <= 2 * U_BF16 + U_BF16**2 + ACC_TOL, got
    update = assemble_update(cap, 0.5, torch.full((general.num_units,), 0.1))
    assert all(d.dtype == torch.float32 and torch.isfinite(d).all() for d in update.values())


@pytest.mark.parametrize("flags, weights", [(["--dtype", "bfloat16"], torch.bfloat16),
                                            (["--autocast", "bfloat16"], torch.float32)])
def test_drpt_train_in_bfloat16_trains(flags, weights, tmp_path, monkeypatch):
    import drpt_ref.training.dr_step as dr

    seen = []  # the dtypes of the Gram the solver got
    solve = dr.solve
    monkeypatch.setattr(dr, "solve", lambda K, *rest: seen.append(K.dtype) or solve(K, *rest))
    model_dir = write_tiny_model(tmp_path / "tiny")
    out = tmp_path / "run"
    assert main(["train", "--model", model_dir, "--out", str(out), *flags, "--steps", "3",
                 "--n-general", "6", "--m-target", "3", "--target-size", "12", "--pool-size", "60",
                 "--eval-every", "3", "--eval-n", "8", "--checkpoint-every", "3", "--progress", "false",
                 "--lr", "1e-2"]) == 0
    assert seen == [torch.float32] * 3  # the QP is solved in float32
    records = read_metrics(str(out))
    assert len(records) == 3 and all(r["converged"] for r in records)
    assert all(torch.isfinite(torch.tensor([r["loss_target"], *r["objective"], *r["gram_c"]])).all() for r in records)
    final, init = final_params(str(out)), load_file(os.path.join(model_dir, "model.safetensors"))
    assert final["transformer.h.0.attn.c_attn.weight"].dtype == weights
    moved = (final["transformer.h.0.mlp.c_fc.weight"].float() - init["transformer.h.0.mlp.c_fc.weight"]).norm()
    assert moved > 1e-3 * init["transformer.h.0.mlp.c_fc.weight"].norm()


# ---- gradient checkpointing ------------------------------------------------------------------------------------

def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_checkpointing_gives_the_same_gram_and_update(arch):
    plain, loss, general, target = problem("sft")
    if arch == "llama":
        plain = tiny_llama()
    ckpt = copy.deepcopy(plain)
    enable_checkpointing(ckpt)
    caps = {name: capture(model, loss, general, target) for name, model in (("plain", plain), ("ckpt", ckpt))}
    assert caps["plain"].recomputed == 0 and caps["ckpt"].recomputed > 0  # the blocks really were recomputed
    assert not any(mod.training for mod in ckpt.modules())  # the capture restores eval mode
    n = general.num_units
    w = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    grams = {k: gram_from_capture(cap) for k, cap in caps.items()}
    updates = {k: assemble_update(cap, 0.7, w) for k, cap in caps.items()}
    for x, y in zip(grams["ckpt"].total(), grams["plain"].total()):
        assert torch.allclose(x, y, rtol=CKPT_RTOL, atol=0), float((x - y).abs().max())
    for name, d in updates["plain"].items():
        assert torch.allclose(updates["ckpt"][name], d, rtol=CKPT_RTOL, atol=CKPT_RTOL * float(d.abs().max()))
    exact = compute_gram(plain, loss, general, target, "exact")  # and both equal the per-unit autograd reference
    assert torch.allclose(grams["ckpt"].K, exact.K, rtol=1e-9, atol=1e-12 * float(exact.K.abs().max()))


def test_reentrant_checkpointing_is_refused_with_its_reason():
    model, loss, general, target = problem("sft")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant=True.*no graph"):
        capture(model, loss, general, target)


class TwiceLinear(torch.nn.Module):
    """A toy LM whose one hidden layer runs twice in the forward (shared weights)."""

    def __init__(self, vocab=40, d=8):
        super().__init__()
        self.emb, self.mid, self.head = torch.nn.Embedding(vocab, d), torch.nn.Linear(d, d), torch.nn.Linear(d, vocab)
        self.training = False

    def forward(self, input_ids, attention_mask):
        logits = self.head(self.mid(torch.tanh(self.mid(self.emb(input_ids)))))
        return type("Out", (), {"logits": logits})


def test_a_layer_used_twice_is_refused_as_shared_weights():
    _, _, general, target = problem("sft")
    with pytest.raises(ValueError, match="mid ran twice in one forward: its weight is used twice"):
        capture(TwiceLinear().double(), SFTLoss(), general, target)


def test_drpt_train_with_gradient_checkpointing_ends_with_the_same_weights(tmp_path, monkeypatch):
    import drpt_ref.training.dr_step as dr

    recomputed = []  # per step: the layer calls the capture skipped as recomputations
    capture_ = dr.capture
    monkeypatch.setattr(dr, "capture", lambda *args: (lambda cap: recomputed.append(cap.recomputed) or cap)(
        capture_(*args)))
    model_dir = write_tiny_model(tmp_path / "tiny")
    outs = {}
    for flag in (False, True):
        cfg = small_run(model_dir, tmp_path / f"run{flag}", steps=3, n_general=4, m_target=2, eval_every=3,
                        checkpoint_every=3, gradient_checkpointing=flag)
        outs[flag] = final_params(train(cfg))
    assert recomputed[:3] == [0, 0, 0] and min(recomputed[3:]) > 0  # the flag really checkpointed
    for k, v in outs[False].items():
        assert torch.allclose(outs[True][k], v, rtol=CKPT_RTOL, atol=CKPT_RTOL), k


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "float16"], "--dtype float16 on --device cpu"),
    (["--autocast", "float16"], "--autocast float16 on --device cpu"),
    (["--autocast", "bfloat16", "--dtype", "float64"], "use it with --dtype float32"),
    (["--dtype", "bfloat32"], "invalid choice"),
])
def test_cli_refuses_unsupported_precision_with_the_flag_named(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path / "never"), "--progress", "false", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "never")

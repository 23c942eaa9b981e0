"""What `drpt train` trains (issue 16, item 6; theory/lora.md sections 2-3).

- The table printed at the start lists the covered linear layers and every frozen group (tied embedding / head,
  embeddings, norms, MoE experts with fused 3-D weights, routers, ...), each with counts equal to a count done here
  from parameter names, and shares that sum to 1.
- --train-uncovered with SGD: the uncovered parameters move by exactly -lr times the gradient of
  alpha L_T + sum_i w_i l_i, computed here by autograd with the step's logged (alpha, w); without the flag they stay.
"""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from drpt_ref import cli
from drpt_ref.training import dr_step as dr
from drpt_ref.training.coverage import (
    COVERED,
    DR,
    EMBEDDINGS,
    EXPERTS,
    FROZEN,
    NORMS,
    REWEIGHTED,
    ROUTERS,
    TIED,
    coverage,
)
from tests.tiny_lm import train_argv, write_tiny_llama, write_tiny_model

UPDATE_RTOL = 1e-10  # float64: two computations of the same gradient, summed in different orders
ROW = re.compile(r"^  (.+?)\s{2,}(Dr projection|reweighted loss|frozen)\s+(\d+) tensors\s+([\d,]+) params\s+"
                 r"([\d.]+)%$", re.M)


def write_tied_llama(path) -> str:
    return write_tiny_llama(path, tied=True)


def argv(model, out, **changes) -> list[str]:
    return train_argv(model, out, **{"steps": 1, "progress": True, **changes})  # the start print is on


def printed_rows(text: str) -> dict:
    """(group, status) -> (tensors, params, percent) of the printed table."""
    return {(g, s): (int(t), int(p.replace(",", "")), float(pct)) for g, s, t, p, pct in ROW.findall(text)}


def counted_by_name(path: str, kind: str) -> dict:
    """The groups counted from the saved tensors' names (a tied head is not saved: the embedding stands for both)."""
    tensors = load_file(os.path.join(path, "model.safetensors"))
    groups = {}
    for name, t in tensors.items():
        if kind == "llama":
            group = TIED if "embed_tokens" in name else NORMS if "norm" in name else COVERED
        else:
            group = TIED if ".wte." in name else EMBEDDINGS if ".wpe." in name else NORMS if ".ln_" in name else \
                COVERED
        tensors_, params = groups.get(group, (0, 0))
        groups[group] = (tensors_ + 1, params + t.numel())
    return groups


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_start_print_lists_every_group_with_counts_that_sum_to_the_model(kind, tmp_path, capsys):
    base = write_tied_llama(tmp_path / "base") if kind == "llama" else write_tiny_model(tmp_path / "base")
    assert cli.main(argv(base, tmp_path / "run")) == 0
    text = capsys.readouterr().out
    rows = printed_rows(text)
    expected = counted_by_name(base, kind)
    total = sum(p for _, p in expected.values())
    assert {g for g, _ in rows} == set(expected)
    for (group, status), (tensors, params, percent) in rows.items():
        assert status == (DR if group == COVERED else FROZEN)
        assert (tensors, params) == expected[group], group
        assert abs(percent - 100 * params / total) <= 0.005 + 1e-9
    assert abs(sum(pct for _, _, pct in rows.values()) - 100) <= 0.005 * len(rows)
    assert f"what is trained: {total:,} parameters" in text
    covered_layers = 7 * 2 if kind == "llama" else 4 * 2
    assert f"covered linear layers ({covered_layers}):" in text
    assert "--train-uncovered trains them" in text
    if kind == "gpt2":
        assert "transformer.h.*.attn.c_attn x2" in text
        final = load_file(os.path.join(tmp_path, "run", "final", "model.safetensors"))
        init = load_file(os.path.join(base, "model.safetensors"))
        assert torch.equal(final["transformer.wte.weight"].float(), init["transformer.wte.weight"])  # frozen


def test_moe_experts_and_routers_are_their_own_groups():
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=32, tie_word_embeddings=False)
    model = MixtralForCausalLM(cfg)
    rows = {(r.group, r.status): r for r in coverage(model)}
    named = dict(model.named_parameters())
    fused = [n for n, p in named.items() if p.dim() == 3]
    routers = [n for n in named if n.endswith("mlp.gate.weight")]
    assert len(fused) == 4 and len(routers) == 2  # gate_up_proj and down_proj per layer; one router per layer
    assert sorted(rows[(EXPERTS, FROZEN)].names) == sorted(fused)
    assert sorted(rows[(ROUTERS, FROZEN)].names) == sorted(routers)
    assert rows[(EXPERTS, FROZEN)].params == sum(named[n].numel() for n in fused)
    assert rows[(EMBEDDINGS, FROZEN)].names == ["model.embed_tokens.weight"]
    assert "lm_head.weight" in rows[(COVERED, DR)].names  # untied: an nn.Linear, covered
    assert sum(r.params for r in rows.values()) == sum(p.numel() for p in model.parameters())
    assert abs(sum(r.share for r in rows.values()) - 1) <= 1e-12


def _sft_losses(model, batch):
    """Per-unit SFT losses written here (eq. (1) of theory/losses.md): answer-token mean NLL of each row."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (R, T, V)
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]  # (R, T - 1)
    scored = batch.loss_mask[:, 1:].to(logp.dtype)
    return -(logp * scored).sum(-1) / scored.sum(-1)  # (R,)


@pytest.mark.parametrize("kind, method", [("gpt2", "simplex"), ("llama", "ball")])
def test_train_uncovered_moves_the_rest_by_the_reweighted_loss_gradient(kind, method, tmp_path, monkeypatch, capsys):
    """simplex: weights chosen by the Gram (alpha = 0); ball: 0 < alpha < 1 (the target term counts too)."""
    base = write_tied_llama(tmp_path / "base") if kind == "llama" else write_tiny_model(tmp_path / "base")
    seen, real = [], dr.capture

    def spy(model, unit_loss, general, target):  # the parameters and the batches each step starts from
        seen.append(dict(state={k: v.detach().clone() for k, v in model.state_dict().items()}, general=general,
                         target=target))
        return real(model, unit_loss, general, target)

    monkeypatch.setattr(dr, "capture", spy)
    out, lr = tmp_path / "run", 0.5
    assert cli.main(argv(base, out, steps=2, train_uncovered=True, lr=lr, method=method)) == 0
    assert "--train-uncovered: " in capsys.readouterr().out
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True, local_files_only=True).double().eval()
    covered = {n for r in coverage(model) if r.group == COVERED for n in r.names}
    uncovered = [n for n, _ in model.named_parameters() if n not in covered]
    assert uncovered
    after = [s["state"] for s in seen[1:]]
    final = load_file(os.path.join(out, "final", "model.safetensors"))
    after.append({n: final[n] for n in uncovered})
    for rec, step, nxt in zip(records, seen, after):
        model.load_state_dict(step["state"])
        n = step["general"].num_units
        general_losses, target_losses = _sft_losses(model, step["general"]), _sft_losses(model, step["target"])
        alpha, w = rec["alpha"][0], torch.tensor(rec["weights"][0], dtype=torch.float64)
        objective = alpha * target_losses.mean() + (w * general_losses).sum()  # eq. (3) of theory/lora.md
        named = dict(model.named_parameters())
        grads = torch.autograd.grad(objective, [named[k] for k in uncovered])
        assert len(w) == n and (0 < alpha < 1 if method == "ball" else float(w.max() - w.min()) > 0)
        for name, g in zip(uncovered, grads):
            moved = nxt[name] - step["state"][name]
            assert float(g.abs().max()) > 0, name
            assert float((moved + lr * g).abs().max()) <= UPDATE_RTOL * float((lr * g).abs().max()), name
    rows = {(r.group, r.status) for r in coverage(model, uncovered)}
    assert (TIED, REWEIGHTED) in rows and (NORMS, REWEIGHTED) in rows

"""The FLOP floor of `drpt bench step` (theory/step_cost.md) against torch's own FLOP counter, and the floor table.

torch.utils.flop_counter.FlopCounterMode counts the matrix products autograd really runs: the standard step's
forward and backward must match eq. (1), the capture's eq. (2) (no weight-gradient product), the Gram's per-unit
gradients and products eq. (5) of gram.md, and the update from kept per-unit gradients eq. (3). Attention is left
out of the comparison (FlopCounterMode does not count the CPU attention kernel).
"""

import pytest
import torch
from tiny_lm import write_tiny_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from drpt_ref.cli import main
from drpt_ref.experiments.bench.floor import ADAMW_BYTES_PER_PARAM, model_counts, phase_floors
from drpt_ref.experiments.bench.shapes import SHAPES, build_shape
from drpt_ref.experiments.bench.step import token_batch
from drpt_ref.gram.compute import gram_from_capture
from drpt_ref.gram.ghost import capture
from drpt_ref.gram.update import assemble_update
from drpt_ref.losses.sft import SFTLoss
from drpt_ref.losses.unit_batch import token_logprobs
from drpt_ref.training.dr_step import freeze_uncovered

UNIT_RATES = {"flops": 1.0, "bytes": float("inf")}  # floors in FLOPs, the optimizer's traffic left out


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(write_tiny_model(tmp_path_factory.mktemp("m"), n_embd=64)).eval()
    freeze_uncovered(model)
    return model


def _no_attention(counts):
    return dict(counts, attn=0)


@pytest.mark.parametrize("n, m, T", [(6, 2, 32), (4, 3, 16)])
def test_floor_counts_match_torch_flop_counter(tiny, n, m, T):
    gen = torch.Generator().manual_seed(0)
    vocab = tiny.config.vocab_size
    general, target = token_batch(n, T, vocab, gen, "cpu"), token_batch(m, T, vocab, gen, "cpu")
    counts = _no_attention(model_counts(tiny))
    floors = phase_floors(counts, n, m, T, UNIT_RATES)

    def standard():
        SFTLoss()(token_logprobs(tiny, general.input_ids, general.attention_mask), general).mean().backward()

    measured = _flops(standard)  # its CPU attention kernel is not counted by FlopCounterMode: attn = 0 above
    tiny.zero_grad(set_to_none=True)
    assert measured == pytest.approx(floors["standard"]["forward_backward"], rel=0.02)
    cap = [None]
    measured = _flops(lambda: cap.__setitem__(0, capture(tiny, SFTLoss(), general, target)))
    assert measured == pytest.approx(floors["dr"]["forward_backward"], rel=0.02)  # eq. (2): no weight gradients
    cap = cap[0]
    assert _flops(lambda: gram_from_capture(cap, "ghost")) == pytest.approx(floors["dr"]["gram"], rel=0.02)
    assert cap.flat, "the tiny model's per-unit gradients are small enough to be kept"
    coef = torch.rand(n, generator=gen)
    assert _flops(lambda: assemble_update(cap, 0.5, coef)) == pytest.approx(floors["dr"]["update"], rel=0.02)
    # the memory side of the roofline, eq. (3'): at infinite FLOP rate the update's floor is the bytes of the F the
    # ghost Gram kept (read once) plus AdamW's traffic over the covered parameters
    memory = phase_floors(counts, n, m, T, {"flops": float("inf"), "bytes": 1.0})
    kept_bytes = sum(F.numel() * F.element_size() for F in cap.flat.values())
    adamw_bytes = ADAMW_BYTES_PER_PARAM * sum(p.numel() for layer in cap.layers for p in layer.params)
    assert memory["dr"]["update"] == pytest.approx(kept_bytes + adamw_bytes, rel=1e-9)
    assert memory["standard"]["update"] == pytest.approx(adamw_bytes, rel=1e-9)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shapes_are_the_published_sizes(name):
    model = build_shape(name, 1, 16, torch.device("cpu"), 0)
    cls, sizes = SHAPES[name]
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == sizes["hidden_size"]
    counts = model_counts(model)
    d, f, V = sizes["hidden_size"], sizes["intermediate_size"], sizes["vocab_size"]
    hd = sizes.get("head_dim", d // sizes["num_attention_heads"])
    q, kv = sizes["num_attention_heads"] * hd, sizes["num_key_value_heads"] * hd
    per_block = d * q + 2 * d * kv + q * d + 3 * d * f
    head = 0 if sizes["tie_word_embeddings"] else d * V  # an untied head is covered
    assert counts["P"] == per_block + head and counts["H"] == (d * V if sizes["tie_word_embeddings"] else 0)
    with pytest.raises(ValueError, match="unknown"):
        build_shape("gpt-5", 1, 16, torch.device("cpu"), 0)


def test_bench_prints_the_floor_table(tmp_path):
    model = write_tiny_model(tmp_path / "model")
    out = tmp_path / "bench.md"
    assert main(["bench", "step", "--grid", "4x8", "--crossover", "4x8", "--methods", "capped_simplex",
                 "--gram-methods", "", "--repeat", "1", "--model", model, "--out", str(out),
                 "--shapes", "smollm2-360m", "--layers", "1", "--shape-grid", "2x8x1"]) == 0
    text = out.read_text()
    lines = text[text.index("## Measured over the FLOP floor"):].splitlines()
    rows = [line.strip("|").split("|") for line in lines if line.startswith("| ") and "shape" not in line]
    assert [(r[0].strip(), r[4].strip()) for r in rows] == [
        ("model", "standard"), ("model", "capped_simplex"), ("smollm2-360m", "standard"),
        ("smollm2-360m", "capped_simplex")]
    for r in rows:
        assert float(r[5].split("(")[1].rstrip("x) ")) > 0 and r[10].strip().endswith("x")
    with pytest.raises(SystemExit):
        main(["bench", "step", "--shapes", "gpt-5"])


def test_floor_table_says_when_a_phase_beat_its_floor():
    """A phase faster than its floor means the run measured its rates low: the table says so (computed, not assumed)."""
    from drpt_ref.experiments.bench.floor import floor_table

    def row(fb, floor_fb):
        return dict(shape="s", n=2, T=8, m=1, method="standard", forward_backward=fb, gram=0.0, solve=0.0,
                    update=1e-3, total=fb + 1e-3, ratio=1.0,
                    floor={"forward_backward": floor_fb, "gram": 0.0, "solve": 0.0, "update": 1e-3})

    rates = {"flops": 1e11, "bytes": 1e10}
    assert not any("below their floor" in line for line in floor_table([row(2e-3, 1e-3)], rates))
    assert any(line.startswith("1 phase(s) above ran below their floor") for line in floor_table(
        [row(2e-3, 1e-3), row(0.5e-3, 1e-3)], rates))

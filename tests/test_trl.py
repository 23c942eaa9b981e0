"""DrSFTTrainer and DrDPOTrainer (drpt_ref/integrations, theory/trl.md) against TRL's own trainers.

The reference is TRL itself: with dr_method = "mean" the Dr subclasses must end a few steps with the
parameters SFTTrainer / DPOTrainer reach on the same general batches (same seed, data order, SGD, float64
models; the parameters outside the covered linear layers frozen in both, as the Dr step freezes them). A
Dr method (simplex, global and per layer) runs, logs its weights, and its objective is at most the mean's
at the first step (the mean lies in the simplex). Tiny models are built from configs with the project's
character tokenizer built in memory: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from drpt_ref.data.tokenizer import build_tokenizer  # noqa: E402
from drpt_ref.gram.layers import covered_parameters  # noqa: E402
from drpt_ref.integrations import DrDPOConfig, DrDPOTrainer, DrSFTConfig, DrSFTTrainer  # noqa: E402
from drpt_ref.training.dr_step import freeze_uncovered  # noqa: E402

# TRL's fused LM head (trl/kernels/chunked_logprob.py) keeps its softmax statistics in float32 even for a
# float64 model, so TRL's gradient carries a relative error of ~1e-7 while the Dr step's is float64's. After
# a few SGD steps the parameter changes of the two trainers then agree to ~1e-7 of their size; 1e-5 is that
# round-off with a 100x margin, and 1e-3 below it is what a real difference (another normaliser) gives.
CHANGE_RTOL = 1e-5
STEPS, N, M = 3, 4, 3  # optimizer steps, general units per step, target units per step

TRAIN_ARGS = dict(per_device_train_batch_size=N, max_steps=STEPS, learning_rate=0.5, lr_scheduler_type="constant",
                  optim="sgd", weight_decay=0.0, report_to="none", seed=0, bf16=False, fp16=False, use_cpu=True,
                  logging_steps=1, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)


def tiny_model(kind: str, tok, seed: int = 0, freeze: bool = True):
    """A float64 tiny causal LM without dropout: GPT-2 (Conv1D, tied head) or Llama (nn.Linear, untied head);
    freeze: only the covered linear layers trainable, as the Dr step trains them (theory/trl.md, section 1)."""
    torch.manual_seed(seed)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                          tie_word_embeddings=False, **ids)
        model = LlamaForCausalLM(cfg)
    model = model.to(torch.float64)
    if freeze:
        freeze_uncovered(model)
    return model


def sft_data(count: int, offset: int):
    """prompt/completion arithmetic; answers of 1-3 digits, so examples differ in length."""
    pairs = [((7 * i + offset) % 60, (13 * i + 2 * offset) % 50) for i in range(count)]
    return datasets.Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in pairs],
                                       "completion": [str(a * b) for a, b in pairs]})


def dpo_data(count: int, offset: int):
    """prompt/chosen/rejected arithmetic: the right sum against a wrong one of another length."""
    pairs = [((7 * i + offset) % 60, (13 * i + 2 * offset) % 50) for i in range(count)]
    return datasets.Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in pairs],
                                       "chosen": [str(a + b) for a, b in pairs],
                                       "rejected": [str(10 * (a + b) + 1) for a, b in pairs]})


def params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def change_gap(start: dict, reference: dict, other: dict, names) -> float:
    """max |other - reference| / max |reference - start| over the named parameters."""
    gap = max(float((other[k] - reference[k]).abs().max()) for k in names)
    size = max(float((reference[k] - start[k]).abs().max()) for k in names)
    assert size > 1e-6, "the reference did not move: the comparison would be empty"
    return gap / size


def run_sft(tmp_path, kind: str, dr: dict | None, name: str, freeze: bool = True, **overrides):
    tok = build_tokenizer()
    model = tiny_model(kind, tok, freeze=freeze)
    start = params(model)
    common = dict(dict(TRAIN_ARGS, **overrides), output_dir=str(tmp_path / name))
    if dr is None:
        trainer = SFTTrainer(model, args=SFTConfig(**common), train_dataset=sft_data(12, 0), processing_class=tok)
    else:
        trainer = DrSFTTrainer(model, args=DrSFTConfig(**common, dr_target_batch_size=M, **dr),
                               train_dataset=sft_data(12, 0), target_dataset=sft_data(8, 5), processing_class=tok)
    trainer.train()
    return start, params(model), trainer


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_dr_sft_mean_takes_sfttrainers_steps(tmp_path, kind):
    start, ref, ref_trainer = run_sft(tmp_path, kind, None, "ref")
    _, dr, trainer = run_sft(tmp_path, kind, {"dr_method": "mean"}, "dr")
    covered = set(covered_parameters(trainer.model))
    assert change_gap(start, ref, dr, covered) < CHANGE_RTOL
    assert all(torch.equal(dr[k], start[k]) for k in dr if k not in covered)  # frozen outside the covered layers
    ref_losses = [h["loss"] for h in ref_trainer.state.log_history if "loss" in h]
    dr_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(dr_logs) == STEPS and "mean_token_accuracy" in dr_logs[0] and "dr/alpha" in dr_logs[0]
    assert [h["loss"] for h in dr_logs] == pytest.approx(ref_losses, rel=1e-6)  # TRL's loss, logged as TRL logs it
    assert all(h["dr/alpha"] == 0 and h["dr/weight_sum"] == pytest.approx(1.0) for h in dr_logs)


def test_dr_sft_mean_with_fused_adamw_takes_sfttrainers_steps(tmp_path):
    """With transformers' fused AdamW (its default optimizer): the kernel steps wrongly on a gradient laid out unlike
    its parameter, and the Dr step's update of an nn.Linear weight was a transposed view until it was made contiguous
    (training/optimizer.py, as_grad): then the parameter changes differed from TRL's by their own size (gap ~2).
    Adam divides by sqrt(v), so the ~1e-7 float32 round-off of TRL's LM head (above) grows where v is small:
    1e-3 is that growth with margin (measured ~3e-5), far below the gap of a wrong step."""
    adam = dict(optim="adamw_torch_fused", learning_rate=1e-2)
    start, ref, _ = run_sft(tmp_path, "llama", None, "ref", **adam)
    _, dr, trainer = run_sft(tmp_path, "llama", {"dr_method": "mean"}, "dr", **adam)
    assert type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer) \
        is torch.optim.AdamW
    assert change_gap(start, ref, dr, set(covered_parameters(trainer.model))) < 1e-3


def test_dr_sft_mean_with_train_uncovered_is_plain_sfttrainer(tmp_path):
    """Nothing frozen: the uncovered parameters (embeddings, norms, the tied head) follow the same reweighted loss."""
    start, ref, _ = run_sft(tmp_path, "gpt2", None, "ref", freeze=False)
    _, dr, _ = run_sft(tmp_path, "gpt2", {"dr_method": "mean", "dr_train_uncovered": True}, "dr", freeze=False)
    assert change_gap(start, ref, dr, list(ref)) < CHANGE_RTOL
    assert all(float((ref[k] - start[k]).abs().max()) > 0 for k in ref)  # every parameter moved


def test_sequence_normaliser_is_not_trls_loss(tmp_path):
    """Examples of unequal length: the per-example token mean (eq. (1) of theory/losses.md) moves elsewhere."""
    start, ref, _ = run_sft(tmp_path, "gpt2", None, "ref")
    _, dr, trainer = run_sft(tmp_path, "gpt2", {"dr_method": "mean", "dr_sft_normaliser": "sequence"}, "dr")
    assert change_gap(start, ref, dr, covered_parameters(trainer.model)) > 1e-3


@pytest.mark.parametrize("per_layer", [False, True])
def test_dr_sft_simplex_runs_and_logs_weights(tmp_path, per_layer):
    _, _, mean = run_sft(tmp_path, "gpt2", {"dr_method": "mean", "dr_per_layer": per_layer}, "mean")
    _, _, simplex = run_sft(tmp_path, "gpt2", {"dr_method": "simplex", "dr_per_layer": per_layer}, "simplex")
    problems = len(covered_parameters(simplex.model)) // 2 if per_layer else 1  # GPT-2: weight and bias per layer
    for rec in simplex.dr_history:
        w = torch.tensor(rec["weights"], dtype=torch.float64)
        assert w.shape == (problems, N) and rec["converged"]
        assert bool((w >= -1e-12).all()) and torch.allclose(w.sum(-1), torch.ones(problems, dtype=w.dtype))
    # step 1: same parameters, same batches; the mean is a point of the simplex, so the projection is closer
    assert sum(simplex.dr_history[0]["objective"]) <= sum(mean.dr_history[0]["objective"]) * (1 + 1e-9)
    with open(os.path.join(simplex.args.output_dir, "dr_steps.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1)) and lines == simplex.dr_history
    assert any("dr/effective_units" in h for h in simplex.state.log_history)


def test_dr_sft_runs_under_trls_bf16_autocast(tmp_path):
    """bf16=True: TRL's autocast wraps the Dr step too; the capture runs in bfloat16, the Gram and the QP in float32
    (theory/precision.md). Step 1 (same parameters and batches) against the float32 run: bfloat16 rounds each
    activation by up to u = 2^-8 = 3.9e-3, which moves K, b, c and so the weights and the objective by a few u;
    measured 8e-4 (weights) and 0.5 % (objective), allowed 2e-2 and 2e-2 (5 u)."""
    tok = build_tokenizer()
    first = {}
    for bf16 in (False, True):
        model = tiny_model("gpt2", tok).to(torch.float32)
        args = DrSFTConfig(output_dir=str(tmp_path / f"bf16_{bf16}"), **{**TRAIN_ARGS, "bf16": bf16, "max_steps": 1},
                           dr_method="simplex", dr_target_batch_size=M)
        trainer = DrSFTTrainer(model, args=args, train_dataset=sft_data(12, 0), target_dataset=sft_data(8, 5),
                               processing_class=tok)
        trainer.train()
        first[bf16] = trainer.dr_history[0]
    w32, w16 = (torch.tensor(first[k]["weights"]) for k in (False, True))
    assert float((w16 - w32).abs().max()) < 2e-2 and first[True]["converged"]
    assert first[True]["objective"][0] == pytest.approx(first[False]["objective"][0], rel=2e-2)


def run_dpo(tmp_path, dr: dict | None, name: str):
    tok = build_tokenizer()
    model, ref_model = tiny_model("gpt2", tok), tiny_model("gpt2", tok)
    start = params(model)
    common = dict(output_dir=str(tmp_path / name), beta=0.5, **TRAIN_ARGS)
    if dr is None:
        trainer = DPOTrainer(model, ref_model, args=DPOConfig(**common), train_dataset=dpo_data(12, 0),
                             processing_class=tok)
    else:
        trainer = DrDPOTrainer(model, ref_model, args=DrDPOConfig(**common, dr_target_batch_size=M, **dr),
                               train_dataset=dpo_data(12, 0), target_dataset=dpo_data(8, 5), processing_class=tok)
    trainer.train()
    return start, params(model), trainer


def test_dr_dpo_mean_takes_dpotrainers_steps(tmp_path):
    start, ref, ref_trainer = run_dpo(tmp_path, None, "ref")
    _, dr, trainer = run_dpo(tmp_path, {"dr_method": "mean"}, "dr")
    assert change_gap(start, ref, dr, covered_parameters(trainer.model)) < CHANGE_RTOL
    ref_logs = [h for h in ref_trainer.state.log_history if "loss" in h]
    dr_logs = [h for h in trainer.state.log_history if "loss" in h]
    for key in ("loss", "rewards/margins"):  # TRL's own quantities, logged as TRL logs them
        assert [h[key] for h in dr_logs] == pytest.approx([h[key] for h in ref_logs], rel=1e-5, abs=1e-8)


def test_dr_dpo_simplex_runs_and_logs_weights(tmp_path):
    _, _, trainer = run_dpo(tmp_path, {"dr_method": "simplex"}, "simplex")
    assert len(trainer.dr_history) == STEPS
    for rec in trainer.dr_history:
        w = torch.tensor(rec["weights"], dtype=torch.float64)  # (1, n)
        assert w.shape == (1, N) and bool((w >= -1e-12).all()) and float(w.sum()) == pytest.approx(1.0)
    trainer.save_model(str(tmp_path / "saved"))  # TRL's saving, unchanged: safetensors
    assert os.path.exists(tmp_path / "saved" / "model.safetensors")


def test_bad_settings_are_refused_with_the_setting_named(tmp_path):
    tok = build_tokenizer()
    common = dict(output_dir=str(tmp_path / "x"), **TRAIN_ARGS)
    with pytest.raises(ValueError, match="dr_method"):
        DrSFTConfig(**common, dr_method="nope")
    with pytest.raises(ValueError, match="dr_lam"):
        DrSFTConfig(**common, dr_method="mix", dr_lam=2.0)
    with pytest.raises(ValueError, match="dr_train_uncovered"):
        DrSFTConfig(**common, dr_train_uncovered=True, dr_per_layer=True)
    with pytest.raises(ValueError, match="DrSFTConfig"):
        DrSFTTrainer(tiny_model("gpt2", tok), args=SFTConfig(**common), train_dataset=sft_data(8, 0),
                     target_dataset=sft_data(4, 1), processing_class=tok)
    with pytest.raises(ValueError, match="target_dataset"):
        DrSFTTrainer(tiny_model("gpt2", tok), args=DrSFTConfig(**common), train_dataset=sft_data(8, 0),
                     processing_class=tok)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        DrSFTTrainer(tiny_model("gpt2", tok), args=DrSFTConfig(**{**common, "gradient_accumulation_steps": 2}),
                     train_dataset=sft_data(8, 0), target_dataset=sft_data(4, 1), processing_class=tok)
    with pytest.raises(ValueError, match="loss_type"):
        DrDPOTrainer(tiny_model("gpt2", tok), tiny_model("gpt2", tok),
                     args=DrDPOConfig(**common, loss_type=["hinge"]), train_dataset=dpo_data(8, 0),
                     target_dataset=dpo_data(4, 1), processing_class=tok)


def test_drpt_ref_imports_without_trl():
    """trl hidden: `import drpt_ref` and its integrations package work; asking for a trainer names the fix."""
    code = ("import sys; sys.modules['trl'] = None\n"
            "import drpt_ref, drpt_ref.integrations\n"
            "try:\n    drpt_ref.integrations.DrSFTTrainer\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "pip install drpt_ref[trl]" in out.stdout


def test_the_readme_trl_example_runs_as_written(tmp_path):
    """README's TRL snippet, run as a reader would (from the repository root), with only max_steps and
    output_dir made small: it trains, logs the Dr quantities and writes every step's weights."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md")) as f:
        readme = f.read()
    start = readme.index("```python", readme.index("### TRL")) + len("```python")
    code = readme[start:readme.index("```", start)]
    assert "max_steps=300" in code and '"runs/trl_sft"' in code
    out = tmp_path / "trl_sft"
    code = code.replace("max_steps=300", "max_steps=2").replace('"runs/trl_sft"', repr(str(out)))
    env = {**os.environ, "PYTHONPATH": root, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(out / "dr_steps.jsonl") as f:
        steps = [json.loads(line) for line in f]
    assert len(steps) == 2 and all(len(s["weights"][0]) == 16 for s in steps)  # per_device_train_batch_size units

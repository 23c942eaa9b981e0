"""LoRA through `drpt train` (issue 16, item 3; theory/lora.md): tiny GPT-2 and Llama models built from configs.

- Through the command line (drpt_ref.cli.main): only the adapter tensors change, and the K, b, c that the run's
  ghost Gram computes at a step equal those of per-unit adapter gradients by torch.func (functional_call +
  vmap(grad)), per layer, in float64, to 1e-10 relative.
- final/ is a peft adapter in safetensors; `drpt eval` and `drpt train --model RUN/final` load it on its base (the
  adapters train on); --resume is bitwise; a bias='all' adapter's biases are named as frozen, and trained by
  --train-uncovered.
- Bad flags and folders are refused with the flag named; peft stays optional (no top-level import).
"""

import ast
import json
import os
import pathlib
import re
import sys

import pytest
import torch

peft = pytest.importorskip("peft")

from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import drpt_ref  # noqa: E402
from drpt_ref import cli  # noqa: E402
from drpt_ref.training import dr_step as dr  # noqa: E402
from drpt_ref.training.lora import check_lora_settings  # noqa: E402
from drpt_ref.training.model_folder import load_model_folder, require_peft  # noqa: E402
from drpt_ref.training.train import TrainConfig  # noqa: E402
from tests.tiny_lm import train_argv as argv  # noqa: E402
from tests.tiny_lm import write_tiny_llama, write_tiny_model  # noqa: E402

GHOST_RTOL = 1e-10  # float64: the ghost and torch.func sums differ by round-off only (~1e-15 relative)
TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj", "down_proj"]}  # gpt2: peft's default, no flag




def write_base(kind: str, path) -> str:
    return write_tiny_model(path) if kind == "gpt2" else write_tiny_llama(path)


def spy_on_gram(monkeypatch) -> list:
    """Record, at each step, the capture's batch, the covered layers' weights (the adapters) and the run's Gram."""
    seen, real = [], dr.gram_from_capture

    def spy(cap, *args, **kwargs):
        G = real(cap, *args, **kwargs)
        seen.append(dict(batch=cap.batch, n=cap.n, m=cap.m, G=G,
                         weights={f"{ly.name}.weight": ly.module.weight.detach().clone() for ly in cap.layers}))
        return G

    monkeypatch.setattr(dr, "gram_from_capture", spy)
    return seen


def torch_func_unit_grads(model, params: dict, batch) -> dict:
    """Per-unit SFT gradients of the named parameters by torch.func: vmap(grad) over the rows (one unit each).

    The attention mask is all ones, the same for every row (vmap refuses transformers' branches on a per-row mask):
    the rows are right-padded, so a real token attends only to real tokens before it, at the same positions, mask
    or not; the padding changes only log-probs that no loss scores."""
    ones = torch.ones_like(batch.input_ids[:1])  # (1, T): not batched by vmap

    def unit_loss(p, ids, answer):
        logits = functional_call(model, p, args=(), kwargs=dict(input_ids=ids[None], attention_mask=ones)).logits
        logp = torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, ids[1:, None])[:, 0]  # (T - 1,)
        scored = answer[1:].to(logp.dtype)
        return -(logp * scored).sum() / scored.sum()  # eq. (1) of theory/losses.md, written again here

    return vmap(grad(unit_loss), in_dims=(None, 0, 0))(params, batch.input_ids, batch.loss_mask)


def reference_model(base: str, kind: str, r: int, alpha: float):
    """The base model with peft adapters of the run's shape, built here (not through drpt's add_lora)."""
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True, local_files_only=True).double().eval()
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS[kind], lora_dropout=0.0,
                        fan_in_fan_out=kind == "gpt2", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_lora_cli_trains_only_adapters_and_its_ghost_gram_is_torch_func_exact(kind, tmp_path, monkeypatch):
    base, out = write_base(kind, tmp_path / "base"), tmp_path / "run"
    seen = spy_on_gram(monkeypatch)
    extra = {} if kind == "gpt2" else {"lora_targets": ",".join(TARGETS[kind])}
    assert cli.main(argv(base, out, lora_r=4, lora_alpha=8, checkpoint_every=3, **extra)) == 0
    assert len(seen) == 3
    # ---- the ghost Gram of step 3 (lora_B no longer zero) against torch.func on the adapters -----------------------
    rec = seen[-1]
    model = reference_model(base, kind, 4, 8)
    named = dict(model.named_parameters())
    assert set(rec["weights"]) == {n for n, p in named.items() if "lora_" in n}  # the covered layers: adapters only
    with torch.no_grad():
        for name, value in rec["weights"].items():
            named[name].copy_(value)
    grads = torch_func_unit_grads(model, {k: named[k].detach() for k in rec["weights"]}, rec["batch"])
    n, m, G = rec["n"], rec["m"], rec["G"]
    assert G.K.dtype == torch.float64 and len(G.layer_names) == len(rec["weights"])
    for layer, name in enumerate(G.layer_names):
        F = grads[f"{name}.weight"].reshape(n + m, -1)  # (U, p_l) per-unit gradients of one adapter factor
        J = F @ F.T
        K, b, c = J[:n, :n], J[:n, n:].sum(-1) / m, J[n:, n:].sum() / m**2  # eq. (2) of theory/gram.md
        scale = float(J.abs().max())
        assert scale > 0
        for ours, ref in ((G.K[layer], K), (G.b[layer], b), (G.c[layer], c)):
            assert float((ours - ref).abs().max()) <= GHOST_RTOL * scale, name
    # ---- only adapter tensors changed: the last checkpoint holds the whole wrapped model ----------------------------
    ckpt = load_file(os.path.join(out, "checkpoint-000003", "tensors.safetensors"))
    init = {k: v.double() for k, v in load_file(os.path.join(base, "model.safetensors")).items()}
    moved = 0
    for key, value in ckpt.items():
        if not key.startswith("model."):
            continue
        name = key[len("model.base_model.model."):]
        if "lora_" in name:
            moved += int("lora_B" in name and bool(value.abs().max() > 0))
            continue
        name = name.replace(".base_layer.", ".")
        assert torch.equal(value, init[name]), name  # the base model is untouched
    assert moved == len([k for k in rec["weights"] if "lora_B" in k])
    # ---- final/ is the peft adapter (safetensors) and equals the checkpoint's adapters ----------------------------
    final = out / "final"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(final))
    assert not any(n.endswith((".bin", ".pt")) or n == "model.safetensors" for n in os.listdir(final))
    adapter = load_file(os.path.join(final, "adapter_model.safetensors"))
    ours = {k[len("model."):].replace(".default.", "."): v for k, v in ckpt.items() if "lora_" in k}
    assert adapter.keys() == ours.keys() and all(torch.equal(adapter[k], ours[k]) for k in adapter)
    with open(final / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.abspath(base)


def test_adapter_folder_loads_for_eval_and_trains_on(tmp_path, capsys):
    base, first, second = write_tiny_model(tmp_path / "base"), tmp_path / "first", tmp_path / "second"
    assert cli.main(argv(base, first, lora_r=2, steps=2)) == 0
    final = str(first / "final")
    model, _ = load_model_folder(final)  # for evaluation: frozen adapters on the base
    assert not any(p.requires_grad for p in model.parameters())
    assert cli.main(["eval", "--model", final, "--task", "add3", "--n", "4"]) == 0
    assert "add3" in capsys.readouterr().out
    assert cli.main(argv(final, second, steps=2)) == 0  # an adapter as --model: its adapters train on
    a = load_file(os.path.join(final, "adapter_model.safetensors"))
    b = load_file(os.path.join(second, "final", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k].double(), b[k]) for k in a)
    with open(second / "final" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.abspath(base)  # the base, not the adapter


def test_lora_resume_is_bitwise(tmp_path):
    base = write_tiny_model(tmp_path / "base")
    kw = dict(lora_r=2, optimizer="adamw", lr=0.01, checkpoint_every=2)
    assert cli.main(argv(base, tmp_path / "straight", steps=4, **kw)) == 0
    assert cli.main(argv(base, tmp_path / "resumed", steps=2, **kw)) == 0
    assert cli.main(argv(base, tmp_path / "resumed", steps=4, resume=True, **kw)) == 0
    a = load_file(os.path.join(tmp_path, "straight", "final", "adapter_model.safetensors"))
    b = load_file(os.path.join(tmp_path, "resumed", "final", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bias_all_adapter_biases_are_named_frozen_or_trained_by_train_uncovered(tmp_path, capsys):
    base = write_tiny_model(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True, local_files_only=True)
    adapter = tmp_path / "adapter"
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn"], bias="all", fan_in_fan_out=True,
                        task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(adapter, safe_serialization=True)
    with open(adapter / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == str(base)
    biases = [k for k, p in model.named_parameters() if k.endswith(".bias") and p.requires_grad]
    assert biases  # peft's bias='all': every bias of the model is trainable in peft
    with pytest.warns(RuntimeWarning, match=f"{len(biases)} tensors that peft left trainable"):
        assert cli.main(argv(adapter, tmp_path / "frozen", steps=1, progress=True)) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^  biases\s+frozen\s+\d+ tensors", printed, re.M)
    assert f"frozen: {len(biases)} trainable tensors" in printed
    assert cli.main(argv(adapter, tmp_path / "trained", steps=1, progress=True, train_uncovered=True)) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^  biases\s+reweighted loss\s+\d+ tensors", printed, re.M)
    before = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    after = load_file(os.path.join(tmp_path, "trained", "final", "adapter_model.safetensors"))
    frozen = load_file(os.path.join(tmp_path, "frozen", "final", "adapter_model.safetensors"))
    bias_keys = [k for k in before if k.endswith(".bias")]
    assert bias_keys and all(torch.equal(frozen[k].float(), before[k]) for k in bias_keys)
    assert any(not torch.equal(after[k].float(), before[k]) for k in bias_keys)


@pytest.mark.parametrize("changes, message", [
    (dict(lora_alpha=8), "--lora-alpha and --lora-targets apply to new LoRA adapters"),
    (dict(lora_r=2, lora_targets="q_proj;v"), "--lora-targets 'q_proj;v'"),
    (dict(lora_r=2, lora_targets="no_such_module"), "--lora-targets 'no_such_module' on a 'gpt2' model"),
    (dict(lora_r=-1), "--lora-r must be a whole number >= 0"),
    (dict(lora_r=2, lora_targets="wte"), "--lora-targets 'wte' adapts modules that are not linear layers"),
    (dict(train_uncovered=True, per_layer=True), "--train-uncovered trains the parameters outside the Gram"),
])
def test_bad_lora_flags_are_refused_naming_the_flag(changes, message, tmp_path, capsys):
    base = write_tiny_model(tmp_path / "base")
    with pytest.raises(SystemExit) as exc:
        cli.main(argv(base, tmp_path / "run", **changes))
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run" / "final")


def test_adapter_folders_that_cannot_load_are_refused(tmp_path, capsys):
    base = write_tiny_model(tmp_path / "base")
    assert cli.main(argv(base, tmp_path / "first", lora_r=2, steps=1)) == 0
    final = tmp_path / "first" / "final"
    with pytest.raises(SystemExit):  # new adapters on an adapter
        cli.main(argv(final, tmp_path / "x", lora_r=2))
    assert "holds a LoRA adapter already" in capsys.readouterr().err
    with open(final / "adapter_config.json") as f:
        config = json.load(f)
    config["base_model_name_or_path"] = "some-org/some-model"  # a hub id: never downloaded
    (final / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        cli.main(argv(final, tmp_path / "y"))
    assert "which is not a local folder (nothing is downloaded" in capsys.readouterr().err
    os.rename(final / "adapter_model.safetensors", final / "adapter_model.bin")
    with pytest.raises(SystemExit):
        cli.main(argv(final, tmp_path / "z"))
    assert "adapter_model.bin, a pickle" in capsys.readouterr().err


def test_peft_stays_optional(monkeypatch, tmp_path):
    """No module of drpt_ref imports peft at its top level; without peft a LoRA flag names the extra to install,
    and the settings of a run without LoRA pass."""
    for path in pathlib.Path(drpt_ref.__file__).parent.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "peft" for n in names), path
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(ValueError, match=re.escape("pip install drpt_ref[lora]")):
        require_peft("--lora-r")
    base = write_tiny_model(tmp_path / "base")
    check_lora_settings(TrainConfig(model=base))
    with pytest.raises(ValueError, match=re.escape("--lora-r needs peft, an optional extra of drpt_ref: `pip install")):
        check_lora_settings(TrainConfig(model=base, lora_r=2))

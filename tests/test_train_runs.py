"""Whole training runs (issue 5): solver equivalence over 20 steps, and bitwise resume.

- `--solver cvxpy` and `--solver batched` (float64) end with parameters equal within 1e-5
  relative and the same loss curves, for SFT, DPO and GRPO;
- a run interrupted at a checkpoint and resumed with --resume ends bitwise equal to an
  uninterrupted one, and writes the same metrics.
"""

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import final_params, small_run, tree, write_tiny_model

from drpt_ref.cli import main
from drpt_ref.training.checkpoint import find_checkpoint
from drpt_ref.training.run_state import read_metrics
from drpt_ref.training.train import TrainConfig, train


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_run"))


def _cfg(tiny_path, out, **kw):
    return small_run(tiny_path, out, **kw)


def _params(run_dir):
    return final_params(run_dir)


@pytest.mark.parametrize("paradigm", ["sft", "dpo", "grpo"])
def test_cvxpy_and_batched_solvers_give_the_same_run(tiny_path, tmp_path, paradigm):
    """SGD: Adam divides by sqrt(v), so where the projected direction is ~0 (g_T in the set) it would turn
    the two solvers' round-off (1e-6 for cvxpy's interior point, 1e-70 for the batched one) into full steps."""
    runs = {}
    for solver in ("cvxpy", "batched"):
        runs[solver] = train(_cfg(tiny_path, tmp_path / solver, paradigm=paradigm, method="simplex", solver=solver,
                                  optimizer="sgd", lr=0.5))
    a, b = _params(runs["cvxpy"]), _params(runs["batched"])
    for k in a:
        rel = (a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-30)
        assert rel <= 1e-5, (k, float(rel))
    la = [r["loss_target"] for r in read_metrics(runs["cvxpy"])]
    lb = [r["loss_target"] for r in read_metrics(runs["batched"])]
    assert len(la) == 20 and torch.allclose(torch.tensor(la), torch.tensor(lb), rtol=1e-6)
    init = load_file(os.path.join(tiny_path, "model.safetensors"))
    moved = max(float((a[k] - init[k]).norm() / init[k].norm().clamp_min(1e-30)) for k in a if k in init)
    assert moved > 1e-3  # the runs really trained: the agreement is not that of two frozen models


def test_resume_is_bitwise(tiny_path, tmp_path):
    # the warmup spans the checkpoint (the lr is a function of the step), both held-out halves are logged
    kw = dict(paradigm="grpo", method="capped_simplex", checkpoint_every=6, eval_every=6, dtype="float32",
              warmup=6, eval_split="select", report_split="report")
    straight = train(_cfg(tiny_path, tmp_path / "straight", steps=12, **kw))
    part = _cfg(tiny_path, tmp_path / "resumed", steps=6, **kw)
    train(part)
    with open(os.path.join(part.out, "metrics.jsonl"), "a") as f:  # a crash after step 6 left a partial log
        f.write(json.dumps({"step": 7, "loss_target": -1.0}) + "\n")
    train(dataclasses.replace(part, steps=12, resume=True))
    a, b = _params(straight), _params(part.out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(read_metrics(straight)) == strip(read_metrics(part.out))
    assert {"eval_loss", "report_loss"} <= read_metrics(straight)[5].keys()


def test_resume_refuses_a_different_config(tiny_path, tmp_path):
    cfg = _cfg(tiny_path, tmp_path / "r", steps=2, checkpoint_every=2, eval_every=2)
    train(cfg)
    with pytest.raises(ValueError, match="different config"):
        train(dataclasses.replace(cfg, steps=4, lr=1.0, resume=True))


def test_cli_train_help_and_unknown_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--per-layer" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--no-such-flag", "1"])


def test_a_new_run_in_an_old_folder_needs_overwrite_and_cannot_resume_the_old_weights(tiny_path, tmp_path,
                                                                                      monkeypatch):
    """Run A leaves a checkpoint; run B (fresh, same --out) is refused without --overwrite; with it, B is
    interrupted before its first checkpoint, and a --resume then refuses instead of continuing A's weights."""
    import drpt_ref.training.train as train_module

    out = tmp_path / "shared"
    train(_cfg(tiny_path, out, method="mean", steps=2, checkpoint_every=2, eval_every=2))
    assert find_checkpoint(str(out)) and os.path.isdir(out / "final")
    fresh = _cfg(tiny_path, out, method="simplex", steps=3, checkpoint_every=3, eval_every=3)
    before = tree(out)
    with pytest.raises(ValueError, match="--lr must be in"):  # bad flags are refused before the folder is touched
        train(dataclasses.replace(fresh, lr=-1.0, overwrite=True))
    with pytest.raises(ValueError, match="holds a drpt run already; continue it with --resume"):
        train(fresh)
    assert tree(out) == before

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        train(dataclasses.replace(fresh, overwrite=True))
    monkeypatch.undo()
    assert find_checkpoint(str(out)) is None and not os.path.exists(out / "final")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(dataclasses.replace(fresh, resume=True))


def test_resume_accepts_harmless_changes_and_refuses_fewer_steps(tiny_path, tmp_path):
    cfg = _cfg(tiny_path, tmp_path / "r2", steps=3, checkpoint_every=3, eval_every=2)
    train(cfg)
    first = read_metrics(cfg.out)
    assert "eval_accuracy" in first[2]  # step 3 was evaluated because the run ended there
    with pytest.raises(ValueError, match="--steps 1 is below the step of the checkpoint"):
        train(dataclasses.replace(cfg, steps=1, resume=True))
    moved_model = os.path.join(os.path.dirname(tiny_path), ".", os.path.basename(tiny_path))
    train(dataclasses.replace(cfg, steps=4, resume=True, progress=True, model=moved_model, out=str(cfg.out) + "/"))
    straight = _cfg(tiny_path, tmp_path / "r2straight", steps=4, checkpoint_every=3, eval_every=2)
    train(straight)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(read_metrics(cfg.out)) == strip(read_metrics(straight.out))  # no stale evaluation at step 3


@pytest.mark.parametrize("flags, message", [
    (["--eval-every", "0"], "--eval-every must be >= 1"), (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--paradigm", "grpo", "--group-size", "1"], "--group-size must be >= 2"),
    (["--paradigm", "grpo", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--method", "softmax", "--tau-rel", "-1"], "--tau-rel must be > 0"), (["--k", "-3"], "--k must be >= 1"),
    (["--optimizer", "sgd", "--weight-decay", "0.1"], "--weight-decay is AdamW"),
    (["--kl-coef", "0.5"], "--kl-coef is a GRPO term"), (["--method", "adapt", "--adapt-ramp", "5"], "ramp must lie"),
    (["--method", "nope"], "invalid choice"),
])
def test_cli_refuses_bad_values_with_the_flag_named(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path / "never"), "--progress", "false", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "never")


def test_cli_train_help_explains_every_flag(capsys):
    import re

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        entry = text.split(flag + " ")[-1].split("(default:")[0]  # the help entry (usage mentions come first)
        words = re.sub(r"\{[^}]*\}|\[BOOL\]", " ", entry).replace(field.name.upper(), " ").split()  # metavar aside
        assert len(words) >= 2, (flag, entry)


@pytest.mark.parametrize("flags, message", [(["--n", "0"], "--n must be >= 1"),
                                            (["--batch-size", "0"], "--batch-size must be >= 1"),
                                            (["--split", "test"], "--split 'test'")])
def test_cli_eval_refuses_bad_values_with_the_flag_named(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_warmup_scales_the_first_sgd_step_linearly(tiny_path, tmp_path):
    """With SGD, step 1 of a 4-step warmup at lr 0.5 is the step at lr 0.125, bitwise (same gradient)."""
    kw = dict(paradigm="sft", method="simplex", steps=1, checkpoint_every=1, eval_every=1, optimizer="sgd",
              dtype="float64")
    warm = _params(train(_cfg(tiny_path, tmp_path / "warm", lr=0.5, warmup=4, **kw)))
    quarter = _params(train(_cfg(tiny_path, tmp_path / "quarter", lr=0.125, **kw)))
    full = _params(train(_cfg(tiny_path, tmp_path / "full", lr=0.5, **kw)))
    assert all(torch.equal(warm[k], quarter[k]) for k in warm)
    assert any(not torch.equal(warm[k], full[k]) for k in warm)

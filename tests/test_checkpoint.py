"""Checkpoints that lose nothing (issue 15): a save interrupted at any of its file operations, and every kind of
damaged checkpoint, either resumes to the bitwise result of an uninterrupted run or is refused with a message
naming the file. A refused resume changes nothing in the run folder.

Each damage is tried twice: as found (the manifest catches it) and with the manifest rewritten to match (a
checkpoint consistent on disk but wrong for the model, the optimizer or the run: the deeper checks catch it).
"""

import dataclasses
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from tiny_lm import final_params, same_weights, small_run, tree, write_tiny_model

import drpt_ref.training.checkpoint as ck
from drpt_ref.cli import main
from drpt_ref.training.run_state import read_metrics
from drpt_ref.training.train import train

STEPS, EVERY = 4, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny model, an uninterrupted 4-step run, and a run stopped after its step-2 checkpoint."""
    root = tmp_path_factory.mktemp("ckpt")
    model = write_tiny_model(root / "model")
    straight = train(small_run(model, root / "straight", steps=STEPS, checkpoint_every=EVERY, eval_every=EVERY))
    half = train(small_run(model, root / "half", steps=EVERY, checkpoint_every=EVERY, eval_every=EVERY))
    return {"model": model, "straight": straight, "half": half}


def _copy(runs, tmp_path) -> str:
    out = str(tmp_path / "run")
    shutil.copytree(runs["half"], out)
    return out


def _resume(runs, out):
    return train(small_run(runs["model"], out, steps=STEPS, checkpoint_every=EVERY, eval_every=EVERY, resume=True))


def _strip(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _assert_same_as_straight(runs, out):
    assert same_weights(final_params(runs["straight"]), final_params(out))
    assert _strip(read_metrics(runs["straight"])) == _strip(read_metrics(out))


# ---- a save interrupted at each of its file operations ------------------------------------------------------

class Crash(BaseException):
    """A kill: nothing in the program catches it."""


OPS = ("_write", "_make_dir", "_rename", "remove_path", "_sync_dir")


class Faults:
    """Counts the file operations of one save and crashes at the k-th (a torn write: half the bytes first)."""

    def __init__(self, k: int, torn: bool):
        self.k, self.torn, self.calls = k, torn, []

    def wrap(self, name, op):
        def faulty(*args):
            self.calls.append(name)
            if len(self.calls) < self.k:
                return op(*args)
            if self.torn and name == "_write":  # the file is cut in the middle, then the process dies
                op(args[0], args[1][: len(args[1]) // 2])
            raise Crash(f"{name} #{self.k}")
        return faulty


@pytest.mark.parametrize("torn", [False, True], ids=["before-the-operation", "half-written"])
def test_a_save_interrupted_at_each_file_operation_resumes_exactly(runs, tmp_path, monkeypatch, torn):
    """The save of step 4 (with step 2's checkpoint on disk) crashes at its k-th file operation, k = 1, 2, ...
    until a save completes; every time, --resume ends bitwise equal to the uninterrupted run."""
    import drpt_ref.training.train as train_module

    real_save = train_module.save_checkpoint
    interrupted, k = [], 0
    while True:
        k += 1
        out = _copy(runs, tmp_path / f"k{k}")
        faults = Faults(k, torn)

        def save_with_faults(run_dir, step, *args, _faults=faults, **kwargs):
            if step != STEPS:
                return real_save(run_dir, step, *args, **kwargs)
            with monkeypatch.context() as m:
                for name in OPS:
                    m.setattr(ck, name, _faults.wrap(name, getattr(ck, name)))
                return real_save(run_dir, step, *args, **kwargs)

        monkeypatch.setattr(train_module, "save_checkpoint", save_with_faults)
        try:
            _resume(runs, out)
            crashed = False
        except Crash:
            crashed = True
        monkeypatch.setattr(train_module, "save_checkpoint", real_save)
        if not crashed:
            break
        interrupted.append(faults.calls[-1])
        assert ck.find_checkpoint(out) is not None  # step 2's or step 4's, never neither
        _resume(runs, out)
        _assert_same_as_straight(runs, out)
        assert sorted(os.listdir(out)) == sorted(os.listdir(runs["straight"]))  # no leftovers
    assert len(interrupted) >= 8 and {"_write", "_rename", "remove_path", "_sync_dir"} <= set(interrupted), interrupted


# ---- damaged checkpoints ------------------------------------------------------------------------------------

def _folder(out) -> str:
    return os.path.join(out, ck.checkpoint_name(EVERY))


def _edit_state(out, change):
    path = os.path.join(_folder(out), ck.STATE)
    with open(path) as f:
        state = json.load(f)
    state = change(state)
    with open(path, "w") as f:
        f.write(state if isinstance(state, str) else json.dumps(state))


def _edit_tensors(out, change):
    path = os.path.join(_folder(out), ck.TENSORS)
    with open(path, "rb") as f:
        tensors = load_tensors(f.read())
    with open(path, "wb") as f:
        f.write(save_tensors(change(tensors)))


def _write_raw(name, data):
    def damage(out):
        path = os.path.join(_folder(out), name)
        new = data(path)
        with open(path, "wb") as f:
            f.write(new)
    return damage


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _flip_last_byte(path) -> bytes:
    data = bytearray(_read(path))
    data[-1] ^= 0x01  # the last byte of the last tensor's data
    return bytes(data)


def _other_model(runs, tmp_path):
    other = write_tiny_model(tmp_path / "other", n_embd=16)
    return train(small_run(other, tmp_path / "other_run", steps=EVERY, checkpoint_every=EVERY, eval_every=EVERY))


def _reshape_one(t):
    name = next(k for k in t if k.startswith("model.") and t[k].dim() == 2)
    t[name] = t[name][:-1].contiguous()
    return t


def _retype_one(t):
    name = next(k for k in t if k.startswith("model."))
    t[name] = t[name].float()
    return t


DAMAGES = {
    "truncated tensors": (_write_raw(ck.TENSORS, lambda p: _read(p)[: len(_read(p)) // 2]), ck.TENSORS),
    "garbage tensors": (_write_raw(ck.TENSORS, lambda p: b"\x8f garbage \x00" * 40), ck.TENSORS),
    "empty tensors": (_write_raw(ck.TENSORS, lambda p: b""), ck.TENSORS),
    "one flipped data byte": (_write_raw(ck.TENSORS, _flip_last_byte), ck.TENSORS),
    "state is a JSON list": (lambda out: _edit_state(out, lambda s: [s]), ck.STATE),
    "state misses a key": (lambda out: _edit_state(out, lambda s: {k: v for k, v in s.items() if k != "optimizer"}),
                           ck.STATE),
    "garbage state JSON": (lambda out: _edit_state(out, lambda s: "{\"step\": 2, garbage"), ck.STATE),
    "step -5": (lambda out: _edit_state(out, lambda s: {**s, "step": -5}), ck.STATE),
    "step lowered by one": (lambda out: _edit_state(out, lambda s: {**s, "step": s["step"] - 1}), ck.STATE),
    "wrong shape": (lambda out: _edit_tensors(out, _reshape_one), ck.TENSORS),
    "wrong dtype": (lambda out: _edit_tensors(out, _retype_one), ck.TENSORS),
    "optimizer tensors removed": (lambda out: _edit_tensors(
        out, lambda t: {k: v for k, v in t.items() if not k.startswith("optim.")}), ck.TENSORS),
    "one optimizer tensor removed": (lambda out: _edit_tensors(
        out, lambda t: {k: v for k, v in t.items() if not k.endswith("exp_avg_sq")}), ck.TENSORS),
    "garbage manifest": (_write_raw(ck.MANIFEST, lambda p: b"not json at all"), ck.MANIFEST),
    "manifest is a JSON list": (_write_raw(ck.MANIFEST, lambda p: b"[1, 2]"), ck.MANIFEST),
    "manifest missing": (lambda out: os.remove(os.path.join(_folder(out), ck.MANIFEST)), ck.MANIFEST),
    "stray file": (_write_raw("extra.bin", lambda p: b"x"), ck.MANIFEST),
}


def _resign(out):
    """Rewrite the manifest so that it matches the (damaged) files: the checkpoint is consistent on disk."""
    folder = _folder(out)
    with open(os.path.join(folder, ck.MANIFEST), "w") as f:
        json.dump(ck.manifest_of(folder, EVERY), f)


@pytest.mark.parametrize("resign", [False, True], ids=["as-found", "manifest-rewritten"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_refused_naming_the_file(runs, tmp_path, damage, resign):
    if resign and damage in ("one flipped data byte", "garbage manifest", "manifest is a JSON list",
                             "manifest missing"):
        pytest.skip("a rewritten manifest makes these a consistent checkpoint of other weights (or undoes them)")
    out = _copy(runs, tmp_path)
    apply, name = DAMAGES[damage]
    apply(out)
    if resign:
        _resign(out)
        name = ck.MANIFEST if damage == "stray file" else name
    before = tree(out)
    with pytest.raises(ValueError) as err:
        _resume(runs, out)
    message = str(err.value)
    named = os.path.join(_folder(out), name)
    assert named in message or (resign and os.path.join(_folder(out), ck.STATE) in message), message
    assert tree(out) == before  # a refused resume writes nothing


def test_tensors_of_another_model_are_refused(runs, tmp_path):
    out = _copy(runs, tmp_path)
    other = _other_model(runs, tmp_path)
    shutil.rmtree(_folder(out))
    shutil.copytree(_folder(other), _folder(out))  # a whole, consistent checkpoint of a smaller model
    with pytest.raises(ValueError, match="holds the tensors of another model|has shape"):
        _resume(runs, out)


def test_a_renamed_checkpoint_is_refused(runs, tmp_path):
    """A checkpoint of step 2 moved to the name of step 3: the folder, the manifest and the state disagree."""
    out = _copy(runs, tmp_path)
    os.rename(_folder(out), os.path.join(out, ck.checkpoint_name(3)))
    with pytest.raises(ValueError, match="named for step 3"):
        _resume(runs, out)


def _forge_step_one(out):
    """Lower the checkpoint of `out` to step 1 consistently: state.json, folder name and a rewritten manifest."""
    _edit_state(out, lambda s: {**s, "step": 1})
    os.rename(_folder(out), os.path.join(out, ck.checkpoint_name(1)))
    folder = os.path.join(out, ck.checkpoint_name(1))
    with open(os.path.join(folder, ck.MANIFEST), "w") as f:
        json.dump(ck.manifest_of(folder, 1), f)


def test_a_consistent_forgery_of_the_step_is_refused(runs, tmp_path):
    """Step lowered by one in state.json, manifest and folder name alike: AdamW's own step count disagrees."""
    out = _copy(runs, tmp_path)
    _forge_step_one(out)
    with pytest.raises(ValueError, match="optimizer has taken 2 steps"):
        _resume(runs, out)


def test_a_torn_metrics_line_and_a_leftover_tmp_are_recovered_exactly(runs, tmp_path, capsys):
    out = _copy(runs, tmp_path)
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "loss_targ')  # a kill during the write of step 3's line
    shutil.copytree(_folder(out), os.path.join(out, ck.TMP))  # and during the save of step 4
    _resume(runs, out)
    assert "dropped a torn last line" in capsys.readouterr().out
    _assert_same_as_straight(runs, out)


def test_cli_resume_of_a_damaged_checkpoint_is_a_usage_error(runs, tmp_path, capsys):
    out = _copy(runs, tmp_path)
    DAMAGES["garbage state JSON"][0](out)
    cfg = small_run(runs["model"], out, steps=STEPS, checkpoint_every=EVERY, eval_every=EVERY)
    flags = []
    for f in dataclasses.fields(cfg):
        flags += ["--" + f.name.replace("_", "-"), str(getattr(cfg, f.name))]
    with pytest.raises(SystemExit) as exit_:
        main(["train", *flags, "--resume"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "usage: drpt train" in err and ck.MANIFEST in err and "Traceback" not in err


def test_sgd_checkpoints_round_trip_and_are_checked(tmp_path):
    """SGD with momentum (a momentum buffer per parameter, no step count) and without (no state at all)."""
    for momentum in (0.9, 0.0):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        run = tmp_path / f"m{momentum}"
        run.mkdir()
        ck.save_checkpoint(str(run), 1, model, opt)
        fresh = torch.nn.Linear(3, 2)
        fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=momentum)
        assert ck.load_checkpoint(str(run), fresh, fresh_opt) == (1, {})
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
        with pytest.raises(ValueError, match="this run uses AdamW"):
            ck.load_checkpoint(str(run), fresh, torch.optim.AdamW(fresh.parameters()))


# ---- review findings 2b, 2c, 3: checkpoints bound to their run, rule state and optimizer values checked ------

def _consistent_edit(out, change_state=None, change_tensors=None):
    """Edit the checkpoint and rewrite its manifest: consistent on disk, wrong for the run."""
    if change_state is not None:
        _edit_state(out, change_state)
    if change_tensors is not None:
        _edit_tensors(out, change_tensors)
    _resign(out)


def test_a_checkpoint_copied_from_another_run_is_refused(runs, tmp_path):
    other = train(small_run(runs["model"], tmp_path / "seed1", steps=EVERY, checkpoint_every=EVERY,
                            eval_every=EVERY, seed=1))
    out = _copy(runs, tmp_path)
    shutil.rmtree(_folder(out))
    shutil.copytree(_folder(other), _folder(out))
    before = tree(out)
    with pytest.raises(ValueError, match="belongs to run .* a checkpoint copied from another run") as err:
        _resume(runs, out)
    assert os.path.join(_folder(out), ck.STATE) in str(err.value) and tree(out) == before


def test_an_sgd_step_forgery_is_refused(runs, tmp_path):
    """SGD keeps no step count: the step in the safetensors metadata catches a consistent edit of the step."""
    sgd = dict(steps=EVERY, checkpoint_every=EVERY, eval_every=EVERY, optimizer="sgd")
    out = train(small_run(runs["model"], tmp_path / "sgd", **sgd))
    _forge_step_one(out)
    with pytest.raises(ValueError, match="records step '2', but the checkpoint is of step 1"):
        train(small_run(runs["model"], out, **{**sgd, "steps": STEPS}, resume=True))


@pytest.mark.parametrize("value", ["x", 3, None])
def test_optimizer_values_of_the_wrong_type_are_refused_before_anything_changes(runs, tmp_path, value):
    """A non-tensor optimizer value AdamW does not keep (here a 'momentum_buffer' for one parameter) is refused
    naming state.json, with the metrics and config untouched (before: an error at the next step, after the
    metrics were cut back and the config rewritten)."""
    out = _copy(runs, tmp_path)
    with open(os.path.join(_folder(out), ck.TENSORS), "rb") as f:
        name = next(k for k in load_tensors(f.read()) if k.endswith(".exp_avg"))[len("optim."):-len(".exp_avg")]

    def change(s):
        s["optimizer"]["scalars"][name] = {"momentum_buffer": value}
        return s
    _consistent_edit(out, change)
    before = tree(out)
    with pytest.raises(ValueError, match="optimizer values \\['momentum_buffer'\\]") as err:
        _resume(runs, out)
    assert os.path.join(_folder(out), ck.STATE) in str(err.value) and tree(out) == before


@pytest.mark.parametrize("rule_state", [{}, {"centroid": [0.5, 0.5], "encoded_at": 1, "dtype": "float64"},
                                        {"centroid": "x", "encoded_at": 1, "dtype": "float64"}, None],
                         ids=["empty", "wrong-shape", "not-a-list", "missing"])
def test_an_adapt_rule_state_that_does_not_fit_is_refused(runs, tmp_path, rule_state):
    cfg = dict(steps=EVERY, checkpoint_every=EVERY, eval_every=EVERY, method="adapt")
    out = train(small_run(runs["model"], tmp_path / "adapt", **cfg))

    def change(s):
        if rule_state is None:
            s["extra"].pop("rule_state")
        else:
            s["extra"]["rule_state"] = rule_state
        return s
    _consistent_edit(out, change)
    before = tree(out)
    with pytest.raises(ValueError, match="state of the weight rule|holds no state of the weight rule") as err:
        train(small_run(runs["model"], out, **{**cfg, "steps": STEPS}, resume=True))
    assert os.path.join(_folder(out), ck.STATE) in str(err.value) and tree(out) == before


def test_symlinked_checkpoint_and_final_are_never_followed(runs, tmp_path, capsys):
    out = _copy(runs, tmp_path)
    elsewhere = str(tmp_path / "elsewhere")
    shutil.move(_folder(out), elsewhere)
    os.symlink(elsewhere, _folder(out))
    before = tree(elsewhere)
    with pytest.raises(ValueError, match="is a symlink"):
        _resume(runs, out)
    shutil.rmtree(os.path.join(out, "final"))
    os.symlink(elsewhere, os.path.join(out, "final"))
    train(small_run(runs["model"], out, steps=EVERY, checkpoint_every=EVERY, eval_every=EVERY, overwrite=True))
    assert tree(elsewhere) == before and not os.path.islink(os.path.join(out, "final"))


def test_a_model_whose_config_is_a_json_list_is_a_usage_error(runs, tmp_path, capsys):
    bad = str(tmp_path / "bad")
    shutil.copytree(runs["model"], bad)
    with open(os.path.join(bad, "config.json"), "w") as f:
        f.write("[1, 2]")
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", bad, "--n", "1", "--task", "add2"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "config.json" in err and "Traceback" not in err

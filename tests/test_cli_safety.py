"""Every bad path, device or number given to `drpt train`, `drpt eval` or `drpt reproduce` ends as usage plus a
message naming the flag or the file (exit 2, no traceback), and writes nothing: --out naming a file, a path
under a file, a read-only folder, the --model folder or one inside it; --device foo or mps; --lr inf, nan or
1e300; a --model that is missing or holds only a pickle (issue 15)."""

import os
import shutil

import pytest
import torch
from tiny_lm import tree, write_tiny_model

from drpt_ref.cli import main


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("cli") / "model")


@pytest.fixture(scope="module")
def pickle_model(model, tmp_path_factory):
    """The tiny model with its weights as a pickle (pytorch_model.bin) and no safetensors."""
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("cli") / "pickled"
    shutil.copytree(model, folder)
    torch.save(load_file(os.path.join(folder, "model.safetensors")), os.path.join(folder, "pytorch_model.bin"))
    os.remove(os.path.join(folder, "model.safetensors"))
    return str(folder)


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "usage: drpt" in err and "Traceback" not in err, err
    return err


def _train(model, out, *flags):
    return ["train", "--model", model, "--out", str(out), "--steps", "1", "--progress", "false", *flags]


def test_out_that_cannot_be_a_folder(model, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert "--out" in _usage_error(_train(model, a_file), capsys) and a_file.read_text() == "x"
    assert "lies under the file" in _usage_error(_train(model, a_file / "run"), capsys)
    err = _usage_error(_train(model, "/sys/drpt_never_here"), capsys)  # read-only, even for root
    assert "--out '/sys/drpt_never_here'" in err


@pytest.mark.parametrize("inside", [False, True], ids=["the-model-folder", "a-folder-inside-it"])
def test_out_on_the_model_folder_is_refused_and_the_model_is_untouched(model, capsys, inside):
    before = tree(model)
    out = os.path.join(model, "run") if inside else model
    for flags in ([], ["--overwrite"]):
        assert "never writes into a model folder" in _usage_error(_train(model, out, *flags), capsys)
    assert tree(model) == before


def test_a_folder_drpt_did_not_make_is_never_written(model, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{\"mine\": true}")
    for flags in ([], ["--overwrite"], ["--resume"]):
        assert "holds files that drpt did not write" in _usage_error(_train(model, mine, *flags), capsys)
    assert tree(mine) == {"config.json": b"{\"mine\": true}"}


@pytest.mark.parametrize("flags, message", [
    (["--device", "foo"], "--device 'foo'"), (["--device", "mps"], "--device 'mps'"),
    (["--device", "cuda:x"], "--device 'cuda:x'"),
    (["--lr", "inf"], "--lr must be a finite number"), (["--lr", "nan"], "--lr must be a finite number"),
    (["--lr", "1e300"], "--lr must be in (0, 10]"), (["--tau-rel=-inf"], "--tau-rel must be a finite number"),
    (["--resume", "--overwrite"], "pass one of them"),
    (["--eval-split", "train"], "--eval-split 'train'"), (["--report-split", "test"], "--report-split 'test'"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
])
def test_train_flags(model, tmp_path, capsys, flags, message):
    assert message in _usage_error(_train(model, tmp_path / "never", *flags), capsys)
    assert not os.path.exists(tmp_path / "never")


def test_missing_and_pickle_models_are_refused(model, pickle_model, tmp_path, capsys):
    missing = str(tmp_path / "no_such_model")
    assert "--model" in _usage_error(_train(missing, tmp_path / "never"), capsys)
    assert "no such folder" in _usage_error(["eval", "--model", missing, "--n", "1"], capsys)
    for argv in (_train(pickle_model, tmp_path / "never"), ["eval", "--model", pickle_model, "--n", "1"]):
        err = _usage_error(argv, capsys)
        assert "pytorch_model.bin, a pickle, which drpt never loads" in err
    assert not os.path.exists(tmp_path / "never")
    a_file = tmp_path / "x.txt"
    a_file.write_text("x")
    assert "--json" in _usage_error(["eval", "--model", model, "--n", "1", "--json", str(a_file / "rows.json")],
                                    capsys)


@pytest.mark.parametrize("device", ["foo", "mps"])
def test_eval_and_reproduce_devices(model, tmp_path, capsys, device):
    assert f"--device '{device}'" in _usage_error(["eval", "--model", model, "--device", device], capsys)
    argv = ["reproduce", "--model", model, "--out", str(tmp_path / "never"), "--device", device]
    assert f"--device '{device}'" in _usage_error(argv, capsys)


def test_eval_json_never_overwrites_a_model_file_or_a_foreign_file(model, tmp_path, capsys):
    """Finding 1b: --json inside --model (even through a symlink) and an existing file that is not an eval table
    are refused before evaluation; an earlier eval table is replaced."""
    before = tree(model)
    link = tmp_path / "link"
    os.symlink(os.path.join(model, "config.json"), link)
    for path in (os.path.join(model, "config.json"), os.path.join(model, "rows.json"), str(link)):
        assert "inside the --model folder" in _usage_error(["eval", "--model", model, "--n", "1", "--json", path],
                                                            capsys)
    assert tree(model) == before
    notes = tmp_path / "notes.json"
    notes.write_text("{\"mine\": 1}")
    err = _usage_error(["eval", "--model", model, "--n", "1", "--task", "add2", "--json", str(notes)], capsys)
    assert "--json" in err and "not a table written by `drpt eval --json`" in err
    assert notes.read_text() == "{\"mine\": 1}"
    rows = tmp_path / "rows.json"
    for _ in range(2):  # a new file, then the earlier table replaced
        assert main(["eval", "--model", model, "--n", "1", "--task", "add2", "--json", str(rows)]) == 0
    assert '"task": "add2"' in rows.read_text()


def test_build_model_writes_only_new_empty_or_its_own_folders(model, tmp_path, capsys):
    """Finding 1d: build-model refuses, before training, a folder it did not write and (without --overwrite)
    one it built; --overwrite replaces its own model. The shipped model folder is never written by a test."""
    tiny = ["build-model", "--steps", "1", "--warmup", "1", "--eval-n", "1", "--n-layer", "1", "--n-embd", "16",
            "--n-head", "2", "--batch-size", "2", "--progress", "false"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    for flags in ([], ["--overwrite"]):
        assert "did not write" in _usage_error([*tiny, "--out", str(mine), *flags], capsys)
    assert tree(mine) == {"README.md": b"my notes"}
    before = tree(model)  # the test model has no build-model card
    assert "did not write" in _usage_error([*tiny, "--out", model, "--overwrite"], capsys)
    assert tree(model) == before
    built = tmp_path / "built"
    assert main([*tiny, "--out", str(built)]) == 0
    card = (built / "card.json").read_bytes()
    assert "--overwrite" in _usage_error([*tiny, "--out", str(built)], capsys)
    assert (built / "card.json").read_bytes() == card
    assert main([*tiny, "--out", str(built), "--overwrite", "--seed", "1"]) == 0
    assert (built / "card.json").read_bytes() != card


def test_bias_variance_defaults_to_an_ignored_folder(capsys):
    with pytest.raises(SystemExit):
        main(["bias-variance", "--help"])
    assert "(default: runs/bias_variance" in " ".join(capsys.readouterr().out.split())

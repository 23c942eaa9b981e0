"""A run folder is written by one process at a time (drpt_run.lock) and never through a symlink: temporary
names that are symlinks are replaced, not followed, and deleting a symlink removes the link, not its target
(issue 15, review findings 1c, 2a, 3)."""

import os
import subprocess
import sys

import pytest
from tiny_lm import small_run, tree, write_tiny_model

from drpt_ref.cli import main
from drpt_ref.training.run_files import LOCK, acquire_lock, release_lock, write_json_atomic
from drpt_ref.training.run_state import MARKER, MetricsLog, check_out_folder, claim_folder, read_metrics
from drpt_ref.training.train import train


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_text("precious")
    return path


def test_temporary_names_that_are_symlinks_are_replaced_not_followed(tmp_path, victim):
    run = tmp_path / "run"
    claim_folder(str(run), "train")
    os.symlink(victim, run / "config.json.tmp")
    write_json_atomic(str(run / "config.json"), {"a": 1})
    log = MetricsLog(str(run))
    log.write({"step": 1})
    os.symlink(victim, run / "metrics.jsonl.tmp")
    MetricsLog(str(run), resume_step=1)
    assert victim.read_text() == "precious" and read_metrics(str(run)) == [{"step": 1}]
    assert not os.path.lexists(run / "config.json.tmp") and not os.path.islink(run / "config.json")


def test_a_symlinked_marker_tmp_is_not_taken_for_drpts_own(tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / (MARKER + ".tmp"))
    with pytest.raises(ValueError, match="holds files that drpt did not write"):
        check_out_folder(str(out), "train")
    (out / (MARKER + ".tmp")).unlink()
    (out / (MARKER + ".tmp")).write_text("{")  # a kill during the marker's write: still an empty run folder
    check_out_folder(str(out), "train")


def test_overwrite_unlinks_a_symlinked_final_and_spares_its_target(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "model.safetensors").write_text("keep")
    run = tmp_path / "run"
    claim_folder(str(run), "train")
    os.symlink(target, run / "final")
    os.symlink(target, run / "checkpoint-000002")
    assert sorted(claim_folder(str(run), "train", overwrite=True)) == ["checkpoint-000002", "final"]
    assert tree(target) == {"model.safetensors": b"keep"} and sorted(os.listdir(run)) == [MARKER]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_refuses_a_second_writer_and_takes_over_a_dead_ones(tmp_path, capsys):
    run = str(tmp_path / "run")
    lock = acquire_lock(run)
    with pytest.raises(ValueError, match=f"--out '{run}' is in use by drpt process {os.getpid()}"):
        acquire_lock(run)
    release_lock(lock)
    assert not os.path.exists(lock)
    with open(lock, "w") as f:
        f.write(f"{_dead_pid()}\n")
    release_lock(acquire_lock(run))
    assert "taking over the lock" in capsys.readouterr().out and not os.path.exists(lock)


def test_train_is_refused_while_another_process_holds_the_run(tmp_path, capsys):
    model = write_tiny_model(tmp_path / "model")
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(f"{os.getppid()}\n")  # a live process
    argv = ["train", "--model", model, "--out", str(out), "--steps", "1", "--progress", "false"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "is in use by drpt process" in err and "Traceback" not in err
    assert os.listdir(out) == [LOCK]
    (out / LOCK).unlink()
    train(small_run(model, out, steps=1, eval_every=1, checkpoint_every=1))
    assert LOCK not in os.listdir(out)  # released at the end
    with pytest.raises(ValueError):
        train(small_run(model, out, steps=1, eval_every=1, checkpoint_every=1, resume=True, seed=5))
    assert LOCK not in os.listdir(out)  # and on an error


def test_resume_before_the_first_checkpoint_names_overwrite(tmp_path):
    model = write_tiny_model(tmp_path / "model")
    out = tmp_path / "run"
    claim_folder(str(out), "train")  # a run killed before its first checkpoint
    with pytest.raises(FileNotFoundError, match="--overwrite"):
        train(small_run(model, out, steps=1, resume=True))

"""Checkpoints restore parameters and optimizer state exactly; the metrics log is cut back on resume (a torn
last line dropped, a log that does not reach the checkpoint refused); --out is checked before anything is
written (never the --model folder, never a folder drpt did not make, an old run only with --overwrite)."""

import os

import pytest
import torch

from drpt_ref.training.checkpoint import load_checkpoint, save_checkpoint
from drpt_ref.training.run_state import (
    MARKER,
    MetricsLog,
    check_out_folder,
    check_resumed_config,
    claim_folder,
    read_metrics,
    step_generator,
)


def _train(model, opt, steps, start=0):
    for step in range(start, steps):
        x = torch.randn(8, 4, generator=step_generator(0, step), dtype=torch.float64)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def test_resume_is_bitwise(tmp_path):
    """4 steps, checkpoint, 4 more == 8 steps straight, for AdamW and SGD with momentum."""
    for make_opt in (lambda p: torch.optim.AdamW(p, lr=1e-2), lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9)):
        torch.manual_seed(0)
        straight = torch.nn.Linear(4, 3).double()
        resumed = torch.nn.Linear(4, 3).double()
        resumed.load_state_dict(straight.state_dict())
        opt_a = make_opt(straight.parameters())
        _train(straight, opt_a, 8)
        opt_b = make_opt(resumed.parameters())
        _train(resumed, opt_b, 4)
        save_checkpoint(str(tmp_path), 4, resumed, opt_b)
        fresh = torch.nn.Linear(4, 3).double()  # a new process: new model, new optimizer
        opt_c = make_opt(fresh.parameters())
        assert load_checkpoint(str(tmp_path), fresh, opt_c) == (4, {})
        _train(fresh, opt_c, 8, start=4)
        for a, b in zip(straight.parameters(), fresh.parameters()):
            assert torch.equal(a, b)


def test_metrics_cut_back_on_resume(tmp_path):
    log = MetricsLog(str(tmp_path))
    for step in range(1, 6):
        log.write({"step": step, "loss": float(step)})
    MetricsLog(str(tmp_path), resume_step=3).write({"step": 4, "loss": -4.0})
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4]
    assert read_metrics(str(tmp_path))[-1]["loss"] == -4.0


def _log(tmp_path, steps):
    log = MetricsLog(str(tmp_path))
    for step in range(1, steps + 1):
        log.write({"step": step, "loss": float(step)})
    return os.path.join(tmp_path, "metrics.jsonl")


@pytest.mark.parametrize("torn", ['{"step": 6, "lo', '{"step": 6, "loss": 6.0}', "\x00\x00"])
def test_a_torn_last_line_is_dropped_with_a_message(tmp_path, capsys, torn):
    """What a kill during a write leaves: part of a line, or a whole record without its newline."""
    path = _log(tmp_path, 5)
    with open(path, "a") as f:
        f.write(torn)
    MetricsLog(str(tmp_path), resume_step=4).write({"step": 5, "loss": -5.0})
    assert "dropped a torn last line" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]


def test_a_log_that_does_not_reach_the_checkpoint_is_refused(tmp_path):
    path = _log(tmp_path, 3)
    with pytest.raises(ValueError, match="metrics.jsonl holds steps"):
        MetricsLog(str(tmp_path), resume_step=5)
    with open(path, "a") as f:
        f.write("not json\n" + '{"step": 4}\n')
    with pytest.raises(ValueError, match="metrics.jsonl: line 4 is not a metrics record"):
        MetricsLog(str(tmp_path), resume_step=3)


def test_out_folder_rules(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for out in (model, model / "runs" / "x"):  # the model folder, or a folder inside it
        with pytest.raises(ValueError, match="never writes into a model folder"):
            check_out_folder(str(out), "train", model=str(model))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for reuse in (False, True):  # --overwrite does not make a foreign folder drpt's
        with pytest.raises(ValueError, match="holds files that drpt did not write"):
            check_out_folder(str(foreign), "train", reuse=reuse)
    run = tmp_path / "run"
    check_out_folder(str(run), "train")  # a new folder
    claim_folder(str(run), "train")
    (run / "metrics.jsonl").write_text("")
    (run / "keep.txt").write_text("not a run file")
    with pytest.raises(ValueError, match="--resume, or replace it with --overwrite"):
        check_out_folder(str(run), "train")
    with pytest.raises(ValueError, match="holds a drpt train folder, not a reproduce one"):
        check_out_folder(str(run), "reproduce", reuse=True)
    check_out_folder(str(run), "train", reuse=True)
    assert claim_folder(str(run), "train", overwrite=True) == ["metrics.jsonl"]
    assert sorted(os.listdir(run)) == sorted([MARKER, "keep.txt"])  # only what a run writes goes


def test_out_paths_that_cannot_be_folders(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="--out .* is a file"):
        check_out_folder(str(a_file), "train")
    with pytest.raises(ValueError, match="--out .* lies under the file"):
        check_out_folder(str(a_file / "sub" / "run"), "train")
    with pytest.raises(ValueError, match="--out .*cannot be written"):  # a read-only file system, even for root
        claim_folder("/sys/drpt_never", "train")
    if os.geteuid() != 0:  # root may write anywhere the file system allows
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        with pytest.raises(ValueError, match="is not writable"):
            check_out_folder(str(locked / "run"), "train")


def test_resume_counts_a_setting_added_since_the_run_as_its_default(tmp_path):
    """A run made before a TrainConfig field existed resumes when the field is at its default, and is refused
    when the resumed config sets it to anything else."""
    from drpt_ref.training.run_state import write_config

    write_config(str(tmp_path), {"lr": 0.1, "model": "m"}, "abc-123")
    defaults = {"lr": 0.001, "lora_r": 0, "model": "x"}
    assert check_resumed_config(str(tmp_path), {"lr": 0.1, "lora_r": 0, "model": "m"}, defaults) == "abc-123"
    with pytest.raises(ValueError, match="lora_r"):
        check_resumed_config(str(tmp_path), {"lr": 0.1, "lora_r": 4, "model": "m"}, defaults)
    with pytest.raises(ValueError, match="lora_r"):  # without defaults a missing key is a difference
        check_resumed_config(str(tmp_path), {"lr": 0.1, "lora_r": 0, "model": "m"})

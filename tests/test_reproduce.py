"""`drpt reproduce` on a small plan: every run trains, the report aggregates over seeds, a rerun resumes;
a run made with other settings is trained again (only with --overwrite), not served from its old summary; a run
folder drpt did not make is never deleted; bad settings are refused;
the default output is one git ignores, and a finished run leaves no weights unless --keep-checkpoints."""

import dataclasses
import json
import logging
import os

import pytest
from tiny_lm import tree, write_tiny_model

import drpt_ref.experiments.reproduce.run as rep
from drpt_ref.cli import main
from drpt_ref.experiments import build_model
from drpt_ref.experiments.reproduce.plan import FULL, HEADLINE
from drpt_ref.experiments.reproduce.plan import plan as full_plan
from drpt_ref.experiments.reproduce.report import verdict_lines, write_report
from drpt_ref.experiments.reproduce.stats import rows_by_seed


def test_small_reproduction_and_resume(tmp_path, monkeypatch):
    model = write_tiny_model(tmp_path / "model")
    specs = [rep.RunSpec("sft", m, s) for s in (0, 1) for m in ("target", "mean", "oracle", "simplex", "random")]
    specs += [rep.RunSpec("sft", "capped_simplex", 0, knobs=(("k", v),), sweep="k") for v in (8.0, 1.0)]
    monkeypatch.setattr(rep, "plan", lambda cfg: specs)
    cfg = rep.ReproduceConfig(out=str(tmp_path / "out"), workers=1, seeds=2, steps=2, eval_every=1, n_general=4,
                              m_target=2, target_size=4, oracle_size=16, oracle_m_target=4, oracle_warmup=1,
                              eval_n=8, retention_n=4, model=model, progress=False, paradigms="sft")
    summaries = rep.reproduce(cfg)
    assert [s["name"] for s in summaries] == [s.name for s in specs]
    by_seed = rows_by_seed(summaries, "accuracy")
    assert {(row, len(runs)) for (_, row), runs in by_seed.items()} == {
        ("target", 2), ("target (early-stopped)", 2), ("mean", 2), ("oracle", 2), ("simplex", 2), ("random", 2)}
    oracle = next(s for s in summaries if s["row"] == "oracle")
    assert oracle["config"]["train"]["target_size"] == 16 and oracle["config"]["train"]["method"] == "target"
    assert any("best Dr `simplex` against best baseline `random` (2 paired seeds)" in line
               for line in verdict_lines(by_seed, ["sft"], "accuracy"))
    text = write_report(cfg, summaries, rep.start_eval(cfg))
    assert "| simplex | dr | 2 |" in text and "## Verdicts" in text
    for figure in ("curves.png", "spectrum.png", "weights.png"):
        assert os.path.getsize(os.path.join(cfg.out, figure)) > 5000, figure
    summary = os.path.join(cfg.out, "runs", specs[0].name, "summary.json")
    stamp = os.path.getmtime(summary)
    again = rep.reproduce(cfg)  # finished runs are skipped, not retrained
    assert os.path.getmtime(summary) == stamp and again == summaries


def _small(tmp_path, **changes):
    model = str(tmp_path / "model")
    if not os.path.isdir(model):
        write_tiny_model(model)
    cfg = rep.ReproduceConfig(out=str(tmp_path / "out"), workers=1, seeds=1, spectrum_seeds=1, steps=2, eval_every=1,
                              n_general=4, m_target=2, target_size=4, oracle_size=16, oracle_m_target=4,
                              oracle_warmup=1, eval_n=8, retention_n=4, model=model, progress=False)
    return dataclasses.replace(cfg, **changes)


def test_changed_settings_are_trained_again_not_served_from_the_old_summary(tmp_path, caplog):
    spec = rep.RunSpec("sft", "mean", 0)
    clean = rep.run_one(_small(tmp_path, steps=3, out=str(tmp_path / "clean")), spec)  # the reference: a new folder
    two = rep.run_one(_small(tmp_path), spec)
    assert [e["step"] for e in two["evals"]] == [1, 2] and two["config"]["train"]["steps"] == 2
    with caplog.at_level(logging.WARNING, logger="drpt_ref.experiments.reproduce.run"):
        three = rep.run_one(_small(tmp_path, steps=3, overwrite=True), spec)  # same out: the 2-step summary is stale
    assert "steps: 2 -> 3" in caplog.text
    assert three["evals"] == clean["evals"] and [e["step"] for e in three["evals"]] == [1, 2, 3]
    assert three["config"] == clean["config"] and not three["resumed"]
    summary = os.path.join(tmp_path, "out", "runs", spec.name, "summary.json")
    stamp = os.path.getmtime(summary)
    assert rep.run_one(_small(tmp_path, steps=3), spec) == three and os.path.getmtime(summary) == stamp  # skipped
    retention = rep.run_one(_small(tmp_path, steps=3, retention_n=5, overwrite=True), spec)  # outside TrainConfig
    assert retention["config"]["retention_n"] == 5 and os.path.getmtime(summary) != stamp


def test_an_interrupted_run_resumes_only_with_its_own_settings(tmp_path, caplog):
    spec = rep.RunSpec("sft", "mean", 0)
    run_dir = os.path.join(tmp_path, "out", "runs", spec.name)
    clean = rep.run_one(_small(tmp_path, steps=3, out=str(tmp_path / "clean")), spec)
    rep.run_one(_small(tmp_path, steps=3, keep_checkpoints=True), spec)
    os.remove(os.path.join(run_dir, "summary.json"))  # interrupted after its last checkpoint
    resumed = rep.run_one(_small(tmp_path, steps=3), spec)
    assert resumed["resumed"] and resumed["evals"] == clean["evals"]
    with pytest.raises(ValueError, match="steps: 3 -> 2.*--overwrite"):
        rep.run_one(_small(tmp_path, steps=2, keep_checkpoints=True), spec)
    rep.run_one(_small(tmp_path, steps=2, keep_checkpoints=True, overwrite=True), spec)
    os.remove(os.path.join(run_dir, "summary.json"))  # a 2-step checkpoint of other settings is left
    with caplog.at_level(logging.WARNING, logger="drpt_ref.experiments.reproduce.run"):
        fresh = rep.run_one(_small(tmp_path, steps=3, overwrite=True), spec)
    assert "steps: 2 -> 3" in caplog.text
    assert not fresh["resumed"] and fresh["evals"] == clean["evals"]
    with open(os.path.join(run_dir, "summary.json")) as f:
        assert json.load(f)["config"] == clean["config"]  # stored with the summary


@pytest.mark.parametrize("field", rep.POSITIVE_INTS)
def test_counts_below_one_are_refused_with_the_flag_named(tmp_path, field):
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ValueError, match=f"^{flag} must be >= 1"):
        rep.reproduce(_small(tmp_path, **{field: 0}))
    assert not os.path.exists(tmp_path / "out")  # refused before anything was written


def test_cli_seeds_and_workers_zero_are_usage_errors(tmp_path, capsys):
    for flag in ("--seeds", "--workers"):
        with pytest.raises(SystemExit) as exit_:
            main(["reproduce", flag, "0", "--model", str(tmp_path), "--out", str(tmp_path / "out")])
        assert exit_.value.code == 2
        assert f"{flag} must be >= 1" in capsys.readouterr().err


def test_full_mode_reads_the_model_the_large_preset_writes():
    assert FULL["model"] == build_model.make_config({"config": "large"}).out == build_model.LARGE_MODEL


def _files(folder) -> dict[str, int]:
    return {os.path.relpath(os.path.join(root, name), folder): os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(folder) for name in names}


def test_the_quick_job_leaves_tables_not_weights(tmp_path, monkeypatch):
    """Two runs at the quick job's own per-run settings (steps, units, evaluation sizes): no safetensors is
    left, and their disk use times the quick plan's number of runs stays under 50 MB. With
    --keep-checkpoints the checkpoint and final model stay."""
    quick = rep.ReproduceConfig()
    specs = [rep.RunSpec("sft", "simplex", 0), rep.RunSpec("grpo", "softmax", 0, per_layer=True)]
    monkeypatch.setattr(rep, "plan", lambda cfg: specs)
    cfg = _small(tmp_path, steps=quick.steps, eval_every=quick.eval_every, n_general=quick.n_general,
                 m_target=quick.m_target, target_size=quick.target_size, eval_n=quick.eval_n,
                 retention_n=quick.retention_n)
    write_report(cfg, rep.reproduce(cfg), rep.start_eval(cfg))
    files = _files(cfg.out)
    assert not [f for f in files if f.endswith(".safetensors")], files
    per_run = max(sum(size for f, size in files.items() if f.startswith(os.path.join("runs", s.name) + os.sep))
                  for s in specs)
    summaries = files["summaries.json"] / len(specs)  # grows with the number of runs
    n_runs = len(full_plan(quick))  # the plan itself (rep.plan is replaced above)
    total = sum(files.values()) + n_runs * (per_run + summaries)
    assert total < 50e6, (n_runs, per_run, total)
    keep = dataclasses.replace(cfg, out=str(tmp_path / "keep"), keep_checkpoints=True)
    rep.run_one(keep, specs[0])
    kept = _files(os.path.join(keep.out, "runs", specs[0].name))
    assert any(f.startswith("checkpoint-") for f in kept) and os.path.join("final", "model.safetensors") in kept


def test_default_outputs_are_ignored_by_git():
    """A newcomer's `drpt reproduce --quick` (or --full, or `drpt train`) writes where git does not look, so
    the committed results/ never change without an explicit --out."""
    import shutil
    import subprocess

    from drpt_ref.training.train import TrainConfig

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    inside = shutil.which("git") is not None and subprocess.run(
        ["git", "rev-parse", "--is-inside-work-tree"], cwd=root, capture_output=True).returncode == 0
    if not inside:  # a worktree's .git is a file: ask git, not the file system
        pytest.skip("not a git checkout")
    for out in (rep.ReproduceConfig().out, HEADLINE["out"], FULL["out"], TrainConfig().out):
        probe = os.path.join(out, "runs", "x", "summary.json")
        assert subprocess.run(["git", "check-ignore", "-q", probe], cwd=root).returncode == 0, out
        tracked = subprocess.run(["git", "ls-files", out], cwd=root, capture_output=True, text=True).stdout
        assert tracked == "", out


def test_reproduce_refuses_the_model_folder_and_foreign_folders(tmp_path, capsys):
    cfg = _small(tmp_path)
    with pytest.raises(ValueError, match="never writes into a model folder"):
        rep.reproduce(dataclasses.replace(cfg, out=cfg.model))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(SystemExit) as exit_:
        main(["reproduce", "--model", cfg.model, "--out", str(foreign), "--progress", "false"])
    assert exit_.value.code == 2 and "holds files that drpt did not write" in capsys.readouterr().err
    assert os.listdir(foreign) == ["thesis.tex"]


def test_runs_of_other_settings_need_overwrite_and_foreign_run_folders_are_never_deleted(tmp_path, monkeypatch,
                                                                                         capsys):
    """Finding 1a: a second reproduce with another --steps refuses (naming --overwrite) before it removes or
    trains anything; a runs/<name> folder without drpt's marker is refused even with --overwrite."""
    spec = rep.RunSpec("sft", "mean", 0)
    monkeypatch.setattr(rep, "plan", lambda cfg: [spec])
    cfg = _small(tmp_path)
    rep.reproduce(cfg)
    run_dir = os.path.join(cfg.out, "runs", spec.name)
    before = tree(cfg.out)
    with pytest.raises(ValueError, match="--overwrite"):
        rep.reproduce(dataclasses.replace(cfg, steps=3))
    with pytest.raises(ValueError, match="--overwrite"):
        rep.run_one(dataclasses.replace(cfg, steps=3), spec)
    assert tree(cfg.out) == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    real = rep.train_config
    monkeypatch.setattr(rep, "train_config", lambda c, s: dataclasses.replace(real(c, s), out=str(tmp_path / "mine")))
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="drpt did not write"):
            rep.run_one(dataclasses.replace(cfg, overwrite=overwrite), spec)
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    monkeypatch.undo()
    monkeypatch.setattr(rep, "plan", lambda cfg: [spec])
    again = rep.reproduce(dataclasses.replace(cfg, steps=3, overwrite=True))
    assert [e["step"] for e in again[0]["evals"]] == [1, 2, 3] and os.path.isdir(run_dir)


def test_reproduce_help_names_what_each_mode_changes(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    cfg = rep.ReproduceConfig()
    assert f"(default: {cfg.seeds}; --headline: {HEADLINE['seeds']}; --full: {FULL['seeds']})" in text
    assert f"(default: {cfg.steps}; --full: {FULL['steps']})" in text


def test_every_planned_run_is_checked_before_the_folder_is_claimed(tmp_path):
    """--n-general above the general pool passes reproduce's own checks; train's settings check of every planned
    run refuses it, naming the flag, before the output folder is created."""
    from drpt_ref.training.train import TrainConfig

    with pytest.raises(ValueError, match="--n-general <= --pool-size"):
        rep.reproduce(_small(tmp_path, n_general=TrainConfig().pool_size + 1))
    assert not os.path.exists(tmp_path / "out")


def test_the_spectrum_does_not_train_a_main_table_run_twice(tmp_path):
    """k = 4 (the default) of the capped-simplex sweep is the main table's capped_simplex run: planned once,
    and the spectrum plot reads it from the main table."""
    from drpt_ref.experiments.reproduce.report import at_point

    cfg = dataclasses.replace(_small(tmp_path), seeds=2, spectrum_seeds=2)
    specs = full_plan(cfg)
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    k_values = sorted(dict(s.knobs)["k"] for s in specs if s.sweep == "k" and s.seed == 0)
    assert 4.0 not in k_values and k_values == [1.0, 2.0, 8.0, 16.0]
    main = {"sweep": "", "row": "capped_simplex", "paradigm": "sft", "config": {"train": {"k": 4.0}}}
    assert at_point(main, "k", "capped_simplex", 4.0) and not at_point(main, "k", "capped_simplex", 8.0)


def _interrupting_run(cfg, spec):
    if spec.seed == 0:
        raise KeyboardInterrupt
    import time

    time.sleep(0.5)
    open(os.path.join(cfg.out, f"ran_{spec.seed}"), "w").close()
    return {}


def test_ctrl_c_cancels_the_queued_runs_and_says_how_to_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(rep, "run_one", _interrupting_run)
    cfg = _small(tmp_path)
    os.makedirs(cfg.out)
    specs = [rep.RunSpec("sft", "mean", s) for s in range(8)]
    with pytest.raises(KeyboardInterrupt, match="run the same command again to resume"):
        rep.run_all(cfg, specs)
    import time

    time.sleep(1.5)  # a queued run that was not cancelled would have written its file by now
    assert len([f for f in os.listdir(cfg.out) if f.startswith("ran_")]) < 3


def test_the_committed_headline_runs_stay_reusable_as_drpt_gains_settings():
    """Every committed headline run matches the run its plan asks for today (a TrainConfig field added since
    counts as its default), so `drpt reproduce --headline --out results/reproduce_headline` reuses them."""
    folder = os.path.join(os.path.dirname(__file__), "..", "results", "reproduce_headline")
    with open(os.path.join(folder, "reproduce_config.json")) as f:
        cfg = rep.ReproduceConfig(**json.load(f))
    with open(os.path.join(folder, "summaries.json")) as f:
        summaries = json.load(f)
    specs = {spec.name: spec for spec in full_plan(cfg)}
    assert set(specs) <= {s["name"] for s in summaries}
    for s in summaries:
        if s["name"] in specs:
            wanted = rep.run_config(cfg, rep.train_config(cfg, specs[s["name"]]))
            assert rep.config_changes(s["config"], wanted) == [], s["name"]
    stored = {**summaries[0]["config"], "train": {**summaries[0]["config"]["train"], "lr": 0.5}}
    assert rep.config_changes(stored, rep.run_config(cfg, rep.train_config(cfg, specs[summaries[0]["name"]]))) == [
        "lr: 0.5 -> 0.0001"]
    trimmed = {**summaries[0]["config"], "train": {k: v for k, v in summaries[0]["config"]["train"].items()
                                                   if k != "warmup"}}  # as if made before --warmup existed
    changed = dataclasses.replace(cfg, oracle_warmup=7)
    oracle = next(spec for spec in full_plan(cfg) if spec.method == "oracle")
    assert rep.config_changes(trimmed, rep.run_config(cfg, rep.train_config(cfg, specs[summaries[0]["name"]]))) == []
    assert "warmup: 0 -> 7" in rep.config_changes(
        {**trimmed, "train": {**trimmed["train"], "method": "target", "lr": 2e-3, "m_target": 64,
                              "target_size": 2000}}, rep.run_config(changed, rep.train_config(changed, oracle)))


def test_oracle_warmup_must_end_before_the_last_step(tmp_path):
    with pytest.raises(ValueError, match=r"--oracle-warmup must be in \[0, --steps\)"):
        rep.reproduce(_small(tmp_path, oracle_warmup=2))
    assert not os.path.exists(tmp_path / "out")


def test_ctrl_c_in_the_cli_is_a_message_and_exit_130_not_a_traceback(tmp_path, monkeypatch, capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt("interrupted after 3 of 45 runs; run the same command again to resume")

    monkeypatch.setattr(rep, "reproduce", interrupted)
    assert main(["reproduce", "--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert "run the same command again to resume" in err and "Traceback" not in err

"""`drpt reproduce` on a small plan: every run trains, the report aggregates over seeds, a rerun resumes."""

import os

from tiny_lm import write_tiny_model

import drpt_ref.reproduce as rep
from drpt_ref.reproduce_report import comparison, table_rows, write_report


def test_small_reproduction_and_resume(tmp_path, monkeypatch):
    model = write_tiny_model(tmp_path / "model")
    specs = [rep.RunSpec("sft", m, s) for s in (0, 1) for m in ("target", "mean", "simplex", "random")]
    specs += [rep.RunSpec("sft", "capped_simplex", 0, knobs=(("k", v),), sweep="k") for v in (8.0, 1.0)]
    monkeypatch.setattr(rep, "plan", lambda cfg: specs)
    cfg = rep.ReproduceConfig(out=str(tmp_path / "out"), workers=1, seeds=2, steps=2, n_general=4, m_target=2,
                              eval_n=8, retention_n=4, model=model, progress=False)
    summaries = rep.reproduce(cfg)
    assert [s["name"] for s in summaries] == [s.name for s in specs]
    rows = table_rows(summaries)
    assert {(r["method"], r["seeds"]) for r in rows} == {("target", 2), ("mean", 2), ("simplex", 2), ("random", 2)}
    assert any("best Dr `simplex`" in line for line in comparison(rows))
    text = write_report(cfg, summaries)
    assert "| sft | simplex | dr | 2 |" in text
    assert os.path.getsize(os.path.join(cfg.out, "curves.png")) > 5000
    assert os.path.getsize(os.path.join(cfg.out, "spectrum.png")) > 5000
    final = os.path.join(cfg.out, "runs", specs[0].name, "final", "model.safetensors")
    stamp = os.path.getmtime(final)
    again = rep.reproduce(cfg)  # finished runs are skipped, not retrained
    assert os.path.getmtime(final) == stamp and again == summaries

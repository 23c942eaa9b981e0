"""Every notebook executes top to bottom in a fresh kernel, stored without outputs.

The notebooks are stored without outputs, so their diffs are their sources; here each runs with the
working directory set to notebooks/ (as a reader's Jupyter would), a non-interactive matplotlib backend,
this checkout's drpt_ref first on the path, at the notebooks' default settings (what a reader runs;
DRPT_NOTEBOOK_SMALL=1 selects the small settings for a quick look, and is not used here). Notebooks 06-08
read the committed reproduction (results/reproduce_headline) by default; one more test trains 06's rows
live through the same code (DRPT_NOTEBOOK_RUN=live, small settings) so that path runs too. Each notebook
asserts its own claims (orderings, agreement between solvers,
the update against materialized gradients), so a failing assertion in a cell fails the test.
"""

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
# name -> wall-clock budget in seconds (the "under a minute", kernel start included), or None
NOTEBOOKS = {
    "01_geometry": 60.0,
    "02_special_cases": 60.0,
    "03_batched_solvers": 60.0,
    "04_dr_step": None,
    "05_unified_view": 60.0,
    "06_sft": None,
    "07_dpo": None,
    "08_grpo": None,
}


def test_every_notebook_is_listed():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


def _execute(name, monkeypatch, env):
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip outputs before committing"
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for key in ("DRPT_NOTEBOOK_SMALL", "DRPT_NOTEBOOK_RUN"):
        monkeypatch.delenv(key, raising=False)  # the default settings, as a reader runs them
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - start
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    return nb, elapsed


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_executes(name, monkeypatch):
    _, elapsed = _execute(name, monkeypatch, {})
    budget = NOTEBOOKS[name]
    assert budget is None or elapsed < budget, f"{name} took {elapsed:.1f} s, over the {budget:.0f} s budget"


def _text(nb) -> str:
    return "\n".join(out.get("text", "") + str(out.get("data", {}).get("text/markdown", ""))
                     for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


def test_the_sft_notebook_states_the_committed_verdicts():
    """The closing text of 06 is computed from the committed runs: it names the same verdicts as results.md."""
    from drpt_ref.experiments.reproduce import report
    from drpt_ref.experiments.reproduce.view import read_view

    view = read_view(str(ROOT / "results" / "reproduce_headline"), "sft")
    lines = report.verdict_lines(view.by_seed, ["sft"], view.metric)
    results = (ROOT / "results" / "reproduce_headline" / "results.md").read_text()
    assert lines and all(line in results for line in lines)


def test_the_sft_notebook_trains_live(monkeypatch):
    nb, _ = _execute("06_sft", monkeypatch, {"DRPT_NOTEBOOK_RUN": "live", "DRPT_NOTEBOOK_SMALL": "1"})
    text = _text(nb)
    assert "runs of sft, seeds [0]; 6 steps" in text and "On sft, the best Dr row chosen on the select half" in text

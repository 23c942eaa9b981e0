"""notebooks/05_unified_view.ipynb executes top to bottom, stored without outputs, in under a minute.

Run with DRPT_NOTEBOOK_SMALL=1 (its small settings); the notebook asserts its own claims (the nesting
of the projections, eq. (3) of theory/unified_view.md for every rule, the SFT and PPO-clip instances
against autograd, the HPT gate).
"""

import os
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "05_unified_view.ipynb"
BUDGET_S = 60.0  # the budget for a notebook, kernel start included


def test_notebook_05_executes(monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "strip outputs before committing"
    monkeypatch.setenv("DRPT_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert not errors, f"{errors[0].ename}: {errors[0].evalue}"
    assert elapsed < BUDGET_S, f"took {elapsed:.0f} s"

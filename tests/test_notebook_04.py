"""notebooks/04_dr_step.ipynb executes top to bottom on small settings (its cells assert its claims)."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_notebook_04_executes(monkeypatch):
    path = ROOT / "notebooks" / "04_dr_step.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("DRPT_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()

"""notebooks/06_sft, 07_dpo, 08_grpo execute top to bottom on small settings (short runs of every kind)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["06_sft.ipynb", "07_dpo.ipynb", "08_grpo.ipynb"])
def test_run_notebook_executes(name, monkeypatch, tmp_path):
    path = ROOT / "notebooks" / name
    nb = nbformat.read(path, as_version=4)
    assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("DRPT_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()

"""Executes every notebooks/*.ipynb top to bottom on the CPU; any cell error fails the test.

The notebooks assert their own numerical claims (chunked vs token recurrence, WY/UT pieces,
affine composition, training, decoding, context parallelism), so running them is the check.
They are stored without outputs; that is checked too. DPLR_NOTEBOOK_QUICK=1 runs every cell,
at the smaller sizes of a notebook's first (parameters) cell where it has one (02: 200 training
steps of 24 sequences instead of 300 of 32; it still has to reach a tenth of the chance loss).
"""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))


def test_notebooks_exist():
    assert [p.name for p in PATHS] == ["01_math.ipynb", "02_your_model.ipynb",
                                       "03_context_parallel.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_executes(path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    stored = [i for i, c in enumerate(nb.cells)
              if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not stored, f"{path.name}: cells {stored} were committed with outputs; clear them"
    # "python3" runs the interpreter running pytest (jupyter_client substitutes sys.executable),
    # with this process's environment (tests/conftest.py: CPU, 8 virtual devices).
    monkeypatch.setenv("DPLR_NOTEBOOK_QUICK", "1")
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()

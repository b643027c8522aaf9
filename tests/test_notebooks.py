"""Every notebook in notebooks/ runs top to bottom without an error.

Each notebook is read, executed in memory with nbclient (kernel ``python3``, working directory
notebooks/) and thrown away: the committed files, outputs included, are never rewritten.
Figures go to a temporary folder through ``IVON_JAX_FIGURES`` (the notebooks save to
``notebooks/figures/`` when it is unset). New notebooks are picked up automatically.
"""

import warnings
from pathlib import Path

import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # per cell; each notebook as a whole is meant to take well under a minute


@pytest.mark.skipif(not NOTEBOOKS, reason="no notebooks in notebooks/")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is needed to run the notebooks")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is needed to run the notebooks")
    pytest.importorskip("ipykernel", reason="ipykernel (the python3 kernel) is needed")

    # The kernel is a child process and inherits the environment: figures go to tmp_path, and
    # it runs on one CPU device as a user's would, not with conftest's 8 simulated devices.
    monkeypatch.setenv("IVON_JAX_FIGURES", str(tmp_path / "figures"))
    monkeypatch.delenv("XLA_FLAGS", raising=False)

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    with warnings.catch_warnings():
        # Jupyter's own deprecation notices (paths, datetime) are not this project's concern.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", ResourceWarning)
        client.execute()  # raises CellExecutionError, naming the cell, on any error

    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, errors
    assert any(cell.cell_type == "code" for cell in nb.cells), f"{path.name} has no code"

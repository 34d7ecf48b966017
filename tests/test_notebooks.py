"""The notebooks in notebooks/ run top to bottom on the CPU, and are committed without outputs.

Each notebook executes in a fresh "python3" kernel (nbclient) in a directory outside the
repository, with this process's environment (JAX_PLATFORMS=cpu from conftest.py) and this
checkout first on the kernel's path, as an installed seqmix would be: the notebooks find
nothing through the working directory. Any cell that raises fails the test, and the notebooks
assert their own checks (kernels against the oracle, cached decoding against the full
forward pass, a restored model against the loop's evaluation, the figures their text states).
"""

from __future__ import annotations

import os
import pathlib

import pytest

# the [test] extra installs both; a GPU machine's environment may lack them
nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = ("01_kernels.ipynb", "02_recall.ipynb", "03_hybrids.ipynb", "04_distill.ipynb")
CELL_TIMEOUT_S = 300  # each notebook takes under a minute on 2 CPU cores


def test_the_notebooks_are_the_listed_ones():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: cell {i} has outputs (strip them)"
            assert cell.execution_count is None, f"{name}: cell {i} has an execution count"


@pytest.mark.parametrize("name", NAMES)
def test_says_which_extra_it_needs_and_reaches_into_no_checkout(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert "seqmix[notebooks]" in nb.cells[0].source
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "sys.path" not in code and "pyproject.toml" not in code


@pytest.mark.parametrize("name", NAMES)
def test_runs_top_to_bottom_from_another_directory(name, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, on any error
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors

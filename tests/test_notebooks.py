"""Execute the notebooks in ``notebooks/`` with nbclient (each on a small budget).

The list and the runner live in ``scripts/execute_notebooks.py``, which also refreshes the outputs
committed with the notebooks (the documentation site renders them). To add a notebook, append
``(file name, timeout in seconds)`` to its ``NOTEBOOKS``; keep it fast (small sample sizes) since CI
runs every notebook on a shared 2-core machine. Here each runs in memory (the files are left alone),
with the Agg backend: earlier outputs in the files are replaced, never compared.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "execute_notebooks.py"
_spec = importlib.util.spec_from_file_location("execute_notebooks", SCRIPT)
execute_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute_notebooks)
NOTEBOOK_DIR, NOTEBOOKS = execute_notebooks.NOTEBOOK_DIR, execute_notebooks.NOTEBOOKS


@pytest.mark.slow
@pytest.mark.parametrize("name,timeout", NOTEBOOKS, ids=[n for n, _ in NOTEBOOKS])
def test_notebook_runs(name, timeout):
    nb = execute_notebooks.execute_notebook(NOTEBOOK_DIR / name, timeout, mpl_backend="Agg")
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"
    ]
    assert not errors


def test_every_notebook_is_executed():
    listed = {name for name, _ in NOTEBOOKS}
    assert {p.name for p in NOTEBOOK_DIR.glob("*.ipynb")} <= listed


def test_committed_notebooks_carry_their_outputs():
    # the site renders the committed outputs: every code cell was run (scripts/execute_notebooks.py)
    import nbformat

    for name, _ in NOTEBOOKS:
        nb = nbformat.read(str(NOTEBOOK_DIR / name), as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.execution_count is not None for c in code), name
        assert not any(o.get("output_type") == "error" for c in code for o in c.outputs), name

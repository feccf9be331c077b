"""Execute the notebooks in ``notebooks/`` with nbclient (each on a small budget).

To add a notebook, append ``(file name, timeout in seconds)`` to ``NOTEBOOKS``; keep it
fast (small sample sizes) since CI runs every notebook on a shared 2-core machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = [
    ("digits.ipynb", 180),
    ("value_matching.ipynb", 180),
    ("discrete.ipynb", 300),  # its last cell asserts the reward rose
    ("rql.ipynb", 300),
    ("adjoint_matching.ipynb", 300),
]


def execute_notebook(path: Path, timeout: int = 120) -> object:
    """Run every cell of ``path`` in a fresh ``python3`` kernel (cwd: the notebook's folder).

    The kernel inherits ``MPLBACKEND=Agg`` (no display) and ``OMP_NUM_THREADS=1``.
    Raises ``nbclient.exceptions.CellExecutionError`` on the first failing cell.
    """
    import ipykernel  # noqa: F401 - the python3 kernel (dev extra); missing means a broken set-up, not a skip
    import nbclient
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    old = {k: os.environ.get(k) for k in ("MPLBACKEND", "OMP_NUM_THREADS")}
    os.environ.update(MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    try:
        client = nbclient.NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        )
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


@pytest.mark.slow
@pytest.mark.parametrize("name,timeout", NOTEBOOKS, ids=[n for n, _ in NOTEBOOKS])
def test_notebook_runs(name, timeout):
    nb = execute_notebook(NOTEBOOK_DIR / name, timeout)
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"
    ]
    assert not errors


def test_every_notebook_is_executed():
    listed = {name for name, _ in NOTEBOOKS}
    assert {p.name for p in NOTEBOOK_DIR.glob("*.ipynb")} <= listed

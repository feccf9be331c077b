"""Execute the notebooks in ``notebooks/`` in place, so the committed files carry their outputs.

    OMP_NUM_THREADS=1 python scripts/execute_notebooks.py                 # every notebook, one by one
    OMP_NUM_THREADS=1 python scripts/execute_notebooks.py digits.ipynb    # only these

The documentation site renders the committed outputs (mkdocs-jupyter with ``execute: false``), so
rerun this after changing a notebook or what it calls. ``tests/test_notebooks.py`` executes the
same list with :func:`execute_notebook` (in memory; the files are left alone). Each notebook runs in a
fresh ``python3`` kernel with its folder as the working directory; a failing cell stops the script
and leaves that notebook's file untouched. Files are written atomically (temp file + ``os.replace``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
# the IPython inline backend: figures become PNG outputs (no display needed)
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
# tqdm.auto's notice that ipywidgets is absent (an absolute path of this machine): not kept in the files
_NOISE = "TqdmWarning: IProgress not found"

# (file name, timeout in seconds per cell); keep them fast: CI runs every notebook on a shared 2-core machine
NOTEBOOKS = [
    ("digits.ipynb", 180),
    ("value_matching.ipynb", 180),
    ("discrete.ipynb", 300),  # its last cell asserts the reward rose
    ("rql.ipynb", 300),
    ("adjoint_matching.ipynb", 300),
    ("td_flows.ipynb", 120),
]


def execute_notebook(path: Path, timeout: int = 120, mpl_backend: str = INLINE_BACKEND) -> object:
    """Run every cell of ``path`` in a fresh ``python3`` kernel (cwd: the notebook's folder).

    Earlier outputs are replaced. The kernel inherits ``MPLBACKEND=mpl_backend`` (default: the
    inline backend, so figures are kept as PNG outputs; no display is needed) and
    ``OMP_NUM_THREADS=1``; no timing metadata is recorded (so re-running changes only outputs).
    Returns the executed ``nbformat`` notebook, which is not written anywhere.
    Raises ``nbclient.exceptions.CellExecutionError`` on the first failing cell.
    """
    import ipykernel  # noqa: F401 - the python3 kernel (dev extra); missing means a broken set-up, not a skip
    import nbclient
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    old = {k: os.environ.get(k) for k in ("MPLBACKEND", "OMP_NUM_THREADS")}
    os.environ.update(MPLBACKEND=mpl_backend, OMP_NUM_THREADS="1")
    try:
        client = nbclient.NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            record_timing=False,
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def drop_noise(nb: object) -> object:
    """``nb`` without the stderr outputs that only say tqdm found no ipywidgets."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [
                o for o in cell.outputs if not (o.get("name") == "stderr" and _NOISE in "".join(o.get("text", "")))
            ]
    return nb


def write_notebook(nb: object, path: Path) -> None:
    """Write ``nb`` to ``path`` atomically (a temp file in the same folder, then ``os.replace``),
    keeping the file's permissions."""
    import nbformat

    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            nbformat.write(nb, f)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="notebook file names in notebooks/ (default: all of NOTEBOOKS)")
    args = parser.parse_args(argv)
    timeouts = dict(NOTEBOOKS)
    names = args.names or list(timeouts)
    unknown = [n for n in names if n not in timeouts]
    if unknown:
        parser.error(f"unknown notebooks {unknown}; expected some of {list(timeouts)}")
    for name in names:
        start = time.perf_counter()
        path = NOTEBOOK_DIR / name
        write_notebook(drop_noise(execute_notebook(path, timeouts[name])), path)
        print(f"{name}: executed in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

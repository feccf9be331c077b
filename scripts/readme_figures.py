"""Regenerate the README's pictures: run the demo (its defaults, as ``make demo`` does) into a
temporary folder and copy its three figures to ``docs/images/``.

    python scripts/readme_figures.py            # about 2 CPU-minutes
    python scripts/readme_figures.py --dest somewhere/else

Only the PNGs named in ``diffusiongym.demo.FIGURES`` are copied (not the CSV log or the logger's
sample grids), each atomically.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from diffusiongym import demo
from diffusiongym.loggers.atomic import write_atomic

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        demo.main(["--out", tmp, "--no-progress"])
        for name in demo.FIGURES:
            print(f"wrote {write_atomic(args.dest / name, (Path(tmp) / name).read_bytes())}")


if __name__ == "__main__":
    main()

"""MkDocs hook (``hooks:`` in ``mkdocs.yml``): the executed notebooks of ``notebooks/`` become pages.

They stay where they are (one copy, run by ``tests/test_notebooks.py``, executed in place by
``scripts/execute_notebooks.py``); this adds each ``notebooks/*.ipynb`` to the site's files as
``notebooks/<name>.ipynb`` before mkdocs-jupyter converts it (its ``on_files`` runs at the default
priority, this one first). The ``examples/*.py`` scripts are added too (copied as they are), so
pages can link to them as ``../examples/<name>.py`` both on GitHub and on the site.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = ("examples", "notebooks")  # repository folders whose files the site carries
_LINK = re.compile(r"\]\((\.\./[^)\s#]+)")
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):(<code>)~?")


@event_priority(100)
def on_files(files: Files, config) -> Files:
    # notebooks become pages (mkdocs-jupyter); the examples are copied as they are, so links to them resolve
    for path in [*sorted((ROOT / "notebooks").glob("*.ipynb")), *sorted((ROOT / "examples").glob("*.py"))]:
        files.append(
            File(
                f"{path.parent.name}/{path.name}",
                src_dir=str(ROOT),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    """Links written for GitHub from ``docs/`` to ``examples/`` or ``notebooks/`` (``../examples/x.py``)
    point to the same files inside the site."""
    page_dir = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match) -> str:
        target = posixpath.normpath(posixpath.join("docs", page_dir, match.group(1)))
        if target.split("/")[0] not in OUTSIDE or files.get_file_from_path(target) is None:
            return match.group(0)  # left for mkdocs to report
        return "](" + posixpath.relpath(target, page_dir or ".")

    return _LINK.sub(rewrite, markdown)


def on_page_content(html: str, page, config, files: Files) -> str:
    """Sphinx roles in docstrings (``:class:`Trainer```) show as plain code in the API reference."""
    return _ROLE.sub(r"\1", html)

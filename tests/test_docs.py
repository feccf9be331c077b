"""The documentation site: ``mkdocs build --strict`` (warnings are errors), every internal link and
anchor of the built HTML resolves, and headless Chromium renders the built index page.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it). Without it the browser test
skips with the reason, except in CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))


class _Page(HTMLParser):
    """The ids (and ``<a name>``) a page defines and the local URLs it refers to."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("id",) + (("name",) if tag == "a" else ()):
            if a.get(key):
                self.ids.add(a[key])
        ref = a.get("href") if tag in ("a", "link") else a.get("src") if tag in ("img", "script") else None
        if ref:
            self.refs.append(ref)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


def test_strict_build_has_every_page(site):
    for page in [
        "index",
        "getting_started",
        "maths",
        "adding_a_method",
        "tasks",
        "diffusers",
        "rl_libraries",
        "methods/index",
        "methods/value_matching",
        "methods/adjoint_matching",
        "methods/efm",
        "methods/policy_gradient",
        "methods/rql",
        "methods/reward_weighted_regression",
        "methods/discrete",
        "api/trainers",
    ]:
        assert (site / f"{page}.html").is_file(), page
    # the maths is marked up for MathJax (pymdownx.arithmatex): no dollar is left outside it
    maths = (site / "maths.html").read_text(encoding="utf-8")
    article = maths[maths.index("<article") : maths.index("</article>")]
    assert article.count('class="arithmatex"') > 50
    assert "$" not in re.sub(r'<(span|div) class="arithmatex">.*?</\1>', "", article, flags=re.S)
    # pages include the tested example files verbatim (pymdownx.snippets)
    rl = (site / "rl_libraries.html").read_text(encoding="utf-8")
    for name in ("sb3_ppo", "cleanrl_loop", "torchrl_collector"):
        first = (ROOT / "examples" / f"{name}.py").read_text(encoding="utf-8").splitlines()[0].strip('"')
        assert first[:40] in rl, name
    # the API reference is rendered by mkdocstrings (a signature and a parameter table of a trainer)
    api = (site / "api" / "trainers.html").read_text(encoding="utf-8")
    assert 'id="diffusiongym.trainers.value_matching.ValueMatching"' in api and "doc-signature" in api
    # every notebook is a page; one that plots shows its committed figures (inline PNGs)
    for stem in NOTEBOOKS:
        html = (site / "notebooks" / f"{stem}.html").read_text(encoding="utf-8")
        if "plt." in (ROOT / "notebooks" / f"{stem}.ipynb").read_text(encoding="utf-8"):
            assert '<div class="jp-RenderedImage' in html, f"{stem}.ipynb: no figure; run scripts/execute_notebooks.py"


def test_internal_links_and_anchors_resolve(site):
    pages = {path: _parse(path) for path in site.rglob("*.html")}
    assert len(pages) > 30
    broken = []
    checked = 0
    for path, page in pages.items():
        for ref in page.refs:
            parts = urlsplit(ref)
            if parts.scheme or ref.startswith("//"):
                continue  # external (https:, mailto:, data:) or protocol-relative
            if not parts.path:
                target = path
            elif parts.path.startswith("/"):  # root-relative (404.html): the site is served at /
                target = (site / unquote(parts.path).lstrip("/")).resolve()
            else:
                target = (path.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            checked += 1
            if not target.is_file() or site.resolve() not in target.resolve().parents:
                broken.append(f"{path.relative_to(site)}: {ref} (no such file)")
                continue
            fragment = unquote(parts.fragment)
            if fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if fragment not in ids:
                    broken.append(f"{path.relative_to(site)}: {ref} (no id {fragment!r})")
    assert checked > 1000
    assert not broken, "\n".join(broken[:50])


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; CI must install Debian's chromium package (see .ci/run)")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); CI installs it and runs this test")
    return exe


def _run_chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)


def test_index_page_renders_in_headless_chromium(site, tmp_path):
    exe = _chromium()
    index = (site / "index.html").resolve().as_uri()
    dom = _run_chromium(exe, tmp_path / "profile", "--dump-dom", index)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "<title>diffusiongym</title>" in html
    assert 'class="md-nav' in html and "Getting started" in html and "Plug in your RL library" in html
    # Material's JavaScript ran: it adds the copy button to code blocks (content.code.copy); the file has none
    assert "md-code__button" in html and "md-code__button" not in (site / "index.html").read_text(encoding="utf-8")

    shot = tmp_path / "index.png"
    run = _run_chromium(exe, tmp_path / "profile", "--window-size=1280,900", f"--screenshot={shot}", index)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 900)
    pixels = list(image.getdata())
    assert len(set(pixels)) > 50  # text and colours, not a blank page
    # Material's header bar (indigo primary, #4051b5) across the top of the page
    header = [image.getpixel((x, 20)) for x in range(200, 1200, 50)]
    assert sum(abs(r - 0x40) + abs(g - 0x51) + abs(b - 0xB5) < 40 for r, g, b in header) >= len(header) // 2


def test_every_snippet_line_includes_an_existing_file():
    """``--8<-- "path"`` lines (pymdownx.snippets) must keep their exact form, or the page shows the
    line instead of the tested file (a formatter once rewrote them to ``--8 < --"path"``)."""
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith("--8"):
                match = re.fullmatch(r'--8<-- "([^"]+)"', line.strip())
                assert match, f"{page.relative_to(ROOT)}:{number}: malformed snippet line {line!r}"
                assert (ROOT / match.group(1)).is_file(), f"{page.relative_to(ROOT)}:{number}: {match.group(1)} missing"

"""The built documentation site renders whole: no code line hidden behind a horizontal scroll, API signatures
formatted one parameter per line, every link working when ``site/index.html`` is opened from disk, nothing
loaded from the network. The site is built here with ``mkdocs build --strict``, as CI builds it."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from helpers import ROOT

# What a code block shows without wrapping on a laptop screen (measured on screenshots of the built pages in
# headless Chromium at 1280 pixels); longer lines would wrap (docs/stylesheets/wrap.css), never scroll.
CODE_LINE_LIMIT = 88
PRE = re.compile(r"<pre[^>]*>(.*?)</pre>", re.S)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    folder = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(folder)], cwd=ROOT,
                   check=True, capture_output=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1",
                                                                       "PATH": "/usr/bin:/bin"})
    return folder


def pages(site: Path) -> list[Path]:
    return sorted(path for path in site.rglob("*.html") if path.name != "404.html")


def code_lines(page: Path) -> list[str]:
    return [line for block in PRE.findall(page.read_text(encoding="utf-8"))
            for line in html.unescape(re.sub(r"<[^>]+>", "", block)).splitlines()]


def test_every_page_is_built(site):
    names = {str(path.relative_to(site)) for path in pages(site)}
    assert {"index.html", "gpu.html", "troubleshooting.html", "changelog.html", "benchmarks/SUMMARY.html",
            "benchmarks/RESULTS.html", "reference/module.html"} <= names


def test_no_code_line_is_wider_than_the_page(site):
    wide = [f"{path.relative_to(site)}: {len(line)}: {line[:60]}..." for path in pages(site)
            for line in code_lines(path) if len(line) > CODE_LINE_LIMIT]
    assert not wide, "code lines that would wrap on a laptop screen:\n" + "\n".join(wide)
    # And a line that is still too wide (a narrow window) wraps instead of scrolling, on every page.
    css = (site / "stylesheets" / "wrap.css").read_text(encoding="utf-8")
    assert re.search(r"pre > code \{[^}]*white-space: pre-wrap", css)
    assert all('href="' in text and "stylesheets/wrap.css" in text
               for text in (path.read_text(encoding="utf-8") for path in pages(site)))


def test_api_signatures_are_formatted_one_parameter_per_line(site):
    signatures = re.findall(r'<div class="doc-signature[^"]*">(.*?)</div>',
                            (site / "reference" / "module.html").read_text(encoding="utf-8"), re.S)
    text = html.unescape(re.sub(r"<[^>]+>", "", signatures[0]))
    lines = text.strip().splitlines()
    assert lines[0] == "FinSightModule(" and lines[-1] == ")"
    assert '    model_name: str = "HuggingFaceTB/SmolLM2-1.7B-Instruct",' in lines
    assert len(lines) > 10 and max(len(line) for line in lines) <= CODE_LINE_LIMIT


def test_every_link_works_from_disk_and_nothing_comes_from_the_network(site):
    """Opened as file://.../site/index.html, a link to a folder would show a folder listing: every internal
    link names an existing file, and its anchor exists in it. No page loads fonts or scripts from elsewhere."""
    broken = []
    for page in pages(site):
        text = page.read_text(encoding="utf-8")
        assert "fonts.googleapis.com" not in text and "fonts.gstatic.com" not in text, page
        for href in re.findall(r'(?:href|src)="([^"]+)"', text):
            parts = urlsplit(href)
            if parts.scheme or href.startswith(("#", "mailto:")):
                continue
            target = (page.parent / unquote(parts.path)).resolve()
            if not target.is_file():
                broken.append(f"{page.relative_to(site)} -> {href}")
            elif parts.fragment and target.suffix == ".html" and \
                    f'id="{parts.fragment}"' not in target.read_text(encoding="utf-8"):
                broken.append(f"{page.relative_to(site)} -> {href} (no such anchor)")
    assert not broken, "\n".join(broken[:40])
    assert (site / "search" / "search_index.js").is_file()  # search without a server (offline plugin)

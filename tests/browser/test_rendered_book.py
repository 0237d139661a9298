"""Open the built book in headless Chromium with the network cut off: each chapter shows every figure it
defines exactly once, captioned; every glued number rendered; no path, repr or raw glue role is visible;
MathJax, served from the book itself, typeset the equations. Screenshots go to _build/screenshots.
Runs after `make strict-book`; skipped (with the reason) where there is no browser or no built book."""

import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageStat

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHAPTERS = ["01_objective_transformation", "02_ntk_linearisation", "03_convexified_trajectories", "04_experiments"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
# No host name resolves: a page that needs a CDN (MathJax's, say) fails here as it would offline.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--host-resolver-rules=MAP * ~NOTFOUND"]
# ... nor a Markdown table left as text (its separator row, whose dashes a browser may show as em dashes).
LEAKS = re.compile(r"PosixPath\(|WindowsPath\(|(?:^|[\s'\"(=])/(?:[\w.-]+/)+[\w.-]+|<[\w.]+ object at 0x|\{glue|"
                   r"\|\s*:?[-\u2013\u2014]{1,3}:?\s*\|")

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs Debian's chromium)"),
    pytest.mark.skipif(not (HTML / "index.html").exists(), reason="the book is not built (run `make strict-book`)"),
]


class _Page(HTMLParser):
    """The article's images (inside or outside <figure>), its captions, glued numbers, MathJax output,
    and its visible text."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.in_article = 0
        self.figure_images, self.loose_images, self.captions = [], [], 0
        self.pasted = self.typeset = 0
        self.text: list[str] = []
        self.skip = 0
        self.divs: list[bool] = []  # per open <div>: is it a code cell's input (code, not output)?

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = attrs.get("class") or ""
        if tag in ("script", "style", "noscript"):
            self.skip += 1
        if tag == "div":
            self.divs.append("cell_input" in classes)
        if tag == "article" or "bd-article" in classes:
            self.in_article += 1
        self.stack.append(tag)
        if not self.in_article:
            return
        src = attrs.get("src") or ""
        # the theme's own images (the launch buttons' logos) live in _static; figures are written elsewhere
        if tag == "img" and src and not src.startswith(("http", "data:")) and "_static/" not in src:
            (self.figure_images if "figure" in self.stack else self.loose_images).append(attrs["src"])
        if tag == "figcaption":
            self.captions += 1
        if "pasted" in classes:
            self.pasted += 1
        if tag == "mjx-container":
            self.typeset += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style", "noscript"):
            self.skip = max(0, self.skip - 1)
        if tag == "div" and self.divs:
            self.divs.pop()
        if tag in self.stack:
            while self.stack and self.stack.pop() != tag:
                pass
        if tag == "article" and self.in_article:
            self.in_article -= 1

    def handle_data(self, data):
        if self.in_article and not self.skip and not any(self.divs):
            self.text.append(data)


def _chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=180)


def _defined_figures(chapter: str) -> list[str]:
    cells = json.loads((ROOT / "notebooks" / f"{chapter}.ipynb").read_text())["cells"]
    return [c["metadata"]["mystnb"]["figure"]["name"] for c in cells
            if c["cell_type"] == "code" and "figure" in c.get("metadata", {}).get("mystnb", {})]


def _has_math(chapter: str) -> bool:
    cells = json.loads((ROOT / "notebooks" / f"{chapter}.ipynb").read_text())["cells"]
    return any("$" in "".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_renders_each_figure_once_captioned_and_typesets_offline(chapter):
    page = HTML / "notebooks" / f"{chapter}.html"
    assert page.exists(), f"{page} was not built"
    dom = _chromium("--virtual-time-budget=20000", "--dump-dom", page.as_uri()).stdout
    assert "<main" in dom or "bd-article" in dom, "Chromium did not render the page"
    parsed = _Page()
    parsed.feed(dom)

    defined = _defined_figures(chapter)
    assert defined, f"{chapter} defines no figure"
    assert not parsed.loose_images, f"{chapter}: images outside a captioned figure: {parsed.loose_images}"
    assert len(parsed.figure_images) == len(defined), (
        f"{chapter}: {len(parsed.figure_images)} figures rendered for the {len(defined)} it defines {defined}")
    assert len(set(parsed.figure_images)) == len(parsed.figure_images), f"{chapter}: a figure is shown twice"
    assert parsed.captions >= len(defined), f"{chapter}: a figure without a caption"
    for name in defined:
        assert f'id="{name}"' in dom, f"{chapter}: figure {name} has no anchor"
    for src in parsed.figure_images:
        with Image.open((page.parent / src).resolve()) as img:
            assert img.width > 50 and img.height > 50, f"{chapter}: figure {src} is empty"

    assert parsed.pasted > 0, f"{chapter}: no glued number rendered"
    text = "".join(parsed.text)
    leak = LEAKS.search(text)
    assert not leak, f"{chapter}: the page shows {leak.group(0)!r}"
    if _has_math(chapter):
        assert parsed.typeset > 0, f"{chapter}: MathJax typeset nothing (is it served from _build/html/_static?)"
        assert "\\(" not in text and "$$" not in text, f"{chapter}: raw LaTeX left on the page"

    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / f"{chapter}.png"
    _chromium("--virtual-time-budget=20000", f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri())
    assert shot.exists(), f"{chapter}: no screenshot"
    with Image.open(shot) as img:
        spread = ImageStat.Stat(img.convert("L")).stddev[0]
    assert spread > 5, f"{chapter}: the screenshot is blank"


def test_mathjax_is_served_from_the_book():
    page = (HTML / "book" / "intro.html").read_text()  # index.html only redirects here
    assert "_static/mathjax/tex-chtml.js" in page and "cdn.jsdelivr" not in page
    assert (HTML / "_static" / "mathjax" / "tex-chtml.js").exists()

"""Open the built book in headless Chromium: screenshot each chapter, and check that every figure
and every glued number rendered. Runs after `make strict-book`; skipped (with the reason) where there
is no browser or no built book."""

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
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs Debian's chromium)"),
    pytest.mark.skipif(not (HTML / "index.html").exists(), reason="the book is not built (run `make strict-book`)"),
]


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.pasted = [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img" and attrs.get("src"):
            self.images.append(attrs["src"])
        if "pasted" in (attrs.get("class") or ""):
            self.pasted += 1


def _chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=120)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_renders_its_figures_and_glued_numbers(chapter):
    page = HTML / "notebooks" / f"{chapter}.html"
    assert page.exists(), f"{page} was not built"
    dom = _chromium("--dump-dom", page.as_uri()).stdout
    assert "<main" in dom or "bd-article" in dom, "Chromium did not render the page"
    parsed = _Page()
    parsed.feed(dom)
    figures = [src for src in parsed.images if not src.startswith(("http", "data:")) and "logo" not in src]
    assert figures, f"{chapter}: no figure rendered"
    for src in figures:
        file = (page.parent / src).resolve()
        assert file.exists(), f"{chapter}: figure {src} is missing"
        with Image.open(file) as img:
            assert img.width > 50 and img.height > 50, f"{chapter}: figure {src} is empty"
    assert parsed.pasted > 0, f"{chapter}: no glued number rendered"
    prose = re.sub(r"<pre.*?</pre>", "", dom, flags=re.S)  # code cells may mention glue; rendered prose must not
    assert not re.search(r"\{glue:?\w*\}", prose), f"{chapter}: an unresolved glue role is visible"

    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / f"{chapter}.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri())
    assert shot.exists(), f"{chapter}: no screenshot"
    with Image.open(shot) as img:
        spread = ImageStat.Stat(img.convert("L")).stddev[0]
    assert spread > 5, f"{chapter}: the screenshot is blank"

"""Every chapter's Colab badge and install cell come from the one repository setting in `_config.yml`
(`repository.url`, `repository.branch`, `launch_buttons.colab_url`): a chapter that names another
repository, branch or notebook path fails here, and so does one that lacks either."""

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BADGE = re.compile(r"\]\((https://[^)\s]*colab[^)\s]*/github/[^)\s]+)\)")
INSTALL = re.compile(r"%pip install\b[^\n]*?git\+(?P<url>https://[^\s\"'@]+?)(?:\.git)?(?:@(?P<ref>[^\s\"'#]+))?[\"'\s]")


def book_settings() -> dict:
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    return {"url": cfg["repository"]["url"].rstrip("/"), "branch": cfg["repository"]["branch"],
            "colab": cfg["launch_buttons"]["colab_url"].rstrip("/")}


def chapters() -> list[str]:
    """The notebooks of `_toc.yml`, as paths from the repository root."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    return [f"{f}.ipynb" for f in files if (ROOT / f"{f}.ipynb").exists()]


def disagreements(notebook: dict, path: str, settings: dict) -> list[str]:
    """What in one chapter disagrees with the book's repository setting (empty: nothing)."""
    markdown = "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "markdown")
    code = "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    repo = settings["url"].removeprefix("https://github.com/")
    expected = f"{settings['colab']}/github/{repo}/blob/{settings['branch']}/{path}"
    badges = BADGE.findall(markdown)
    installs = list(INSTALL.finditer(code))
    out = []
    if not badges:
        out.append(f"{path}: no Colab badge; expected one linking {expected}")
    out += [f"{path}: Colab badge links {b}, not {expected}" for b in badges if b != expected]
    if not installs:
        out.append(f"{path}: no `%pip install ... git+{settings['url']}` cell")
    for m in installs:
        if m["url"].rstrip("/") != settings["url"]:
            out.append(f"{path}: installs from {m['url']}, not {settings['url']}")
        if m["ref"] is not None and m["ref"] != settings["branch"]:
            out.append(f"{path}: installs ref {m['ref']}, not the branch {settings['branch']}")
    return out


def test_the_book_has_chapters_to_check():
    assert len(chapters()) >= 4


@pytest.mark.parametrize("path", chapters())
def test_badge_and_install_follow_the_config(path):
    notebook = json.loads((ROOT / path).read_text())
    assert disagreements(notebook, path, book_settings()) == []


def _chapter(badge: str, install: str) -> dict:
    return {"cells": [{"cell_type": "markdown", "source": [f"# 1. A chapter\n\n[![Open In Colab](x.svg)]({badge})\n"]},
                      {"cell_type": "code", "source": ["import sys\n", f'    %pip install -q "mctlib[book] @ {install}"']}]}


def test_a_chapter_that_disagrees_is_named():
    settings = {"url": "https://github.com/o/book", "branch": "main", "colab": "https://colab.research.google.com"}
    good = "https://colab.research.google.com/github/o/book/blob/main/notebooks/01.ipynb"
    assert disagreements(_chapter(good, "git+https://github.com/o/book"), "notebooks/01.ipynb", settings) == []
    assert disagreements(_chapter(good, "git+https://github.com/o/book.git@main"), "notebooks/01.ipynb", settings) == []
    wrong_branch = good.replace("/blob/main/", "/blob/dev/")
    assert disagreements(_chapter(wrong_branch, "git+https://github.com/o/book"), "notebooks/01.ipynb", settings) == [
        f"notebooks/01.ipynb: Colab badge links {wrong_branch}, not {good}"]
    assert disagreements(_chapter(good, "git+https://github.com/fork/book@main"), "notebooks/01.ipynb", settings) == [
        "notebooks/01.ipynb: installs from https://github.com/fork/book, not https://github.com/o/book"]
    assert disagreements(_chapter(good, "git+https://github.com/o/book@v2"), "notebooks/01.ipynb", settings) == [
        "notebooks/01.ipynb: installs ref v2, not the branch main"]
    other_path = disagreements(_chapter(good, "git+https://github.com/o/book"), "notebooks/02.ipynb", settings)
    assert len(other_path) == 1 and "not https://colab.research.google.com/github/o/book/blob/main/notebooks/02" in \
        other_path[0]
    assert len(disagreements({"cells": []}, "notebooks/01.ipynb", settings)) == 2  # neither badge nor install

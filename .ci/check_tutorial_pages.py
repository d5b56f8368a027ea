"""Fail when a rendered tutorial page shows no figure or no table (the docs build executes the notebooks).

Usage: ``python .ci/check_tutorial_pages.py [docs/_build/html]``, after
``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def check(html_dir: Path) -> list[str]:
    """Return one problem per tutorial page without an image or a table; an empty list when all pages have both."""
    notebooks = sorted((REPO / "docs" / "tutorials").glob("*.ipynb"))
    if not notebooks:
        return [f"no notebooks under {REPO / 'docs' / 'tutorials'}"]
    problems = []
    for nb in notebooks:
        page = html_dir / "tutorials" / f"{nb.stem}.html"
        if not page.is_file():
            problems.append(f"{page}: missing (was the docs build run?)")
            continue
        text = page.read_text(encoding="utf-8")
        images = len(re.findall(r'<img\b[^>]*\bsrc="[^"]*_images/', text))  # cell outputs, not theme logos
        tables = len(re.findall(r'<table[^>]*class="[^"]*dataframe', text))
        print(f"{page.relative_to(html_dir)}: {images} images, {tables} data frames")
        if images == 0:
            problems.append(f"{page}: no images (were the notebook's outputs rendered?)")
        if tables == 0:
            problems.append(f"{page}: no data frame tables (were the notebook's outputs rendered?)")
    return problems


def main(argv: list[str]) -> int:
    """Check the pages under ``argv[0]`` (default ``docs/_build/html``); print the problems and return 1 if any."""
    html_dir = Path(argv[0]) if argv else REPO / "docs" / "_build" / "html"
    problems = check(html_dir)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

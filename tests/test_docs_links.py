"""Every relative link in README.md and docs/ resolves: the file exists and, where a link
names a section (#anchor), a heading of that file has that anchor. Moving a section or a
file (docs/results.md's journal went to docs/history/) must not leave a reader at a dead end."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a '#' in a code block is no heading
    return {anchor(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def broken_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    problems = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        name, _, section = target.partition("#")
        linked = (page.parent / name).resolve() if name else page
        if not linked.exists():
            problems.append(f"{target}: no such file")
        elif section and linked.suffix == ".md" and section not in anchors(linked):
            problems.append(f"{target}: no heading with that anchor in {linked.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_a_dead_link_or_a_missing_section_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Issue 5: streaming\n\ntext\n")
    page = tmp_path / "page.md"
    page.write_text("[a](other.md#issue-5-streaming) [b](other.md#gone) [c](missing.md) "
                    "[d](https://example.org/x) [e](#here)\n\n## Here\n")
    assert broken_links(page) == ["other.md#gone: no heading with that anchor in other.md",
                                  "missing.md: no such file"]

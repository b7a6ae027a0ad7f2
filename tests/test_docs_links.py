"""Every relative link (and image) in README.md and docs/*.md points at a file that exists, and every
`#anchor` names a heading of the target page (GitHub's heading slugs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# [text](target) and ![alt](target); the target ends at whitespace or ')' (an optional "title" follows)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def doc_pages(root: Path = REPO_ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _prose_lines(text: str) -> list[str]:
    """The page's lines outside fenced code blocks, with inline code spans blanked."""
    out, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            out.append(re.sub(r"`[^`]*`", "``", line))
    return out


def heading_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    in_fence = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
            continue
        match = None if in_fence else HEADING.match(line)
        if match:
            slug = heading_slug(match.group(1))
            count = seen.get(slug, 0)
            found.add(slug if count == 0 else f"{slug}-{count}")
            seen[slug] = count + 1
    return found


def broken_links(page: Path) -> list[str]:
    """One line per relative link of ``page`` whose file, or whose anchor in a markdown file, is missing."""
    problems = []
    for number, line in enumerate(_prose_lines(page.read_text(encoding="utf-8")), 1):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
                continue
            path_part, _, anchor = target.partition("#")
            file = page if not path_part else (page.parent / path_part).resolve()
            if not file.exists():
                problems.append(f"{page.name}: link to missing file {target!r}")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                problems.append(f"{page.name}: link to missing heading {target!r}")
    return problems


def test_readme_and_docs_pages_exist():
    names = {p.name for p in doc_pages()}
    for page in ("editors.md", "datasets.md", "metrics.md", "circuits.md", "leaderboard.md",
                 "performance.md", "results.md", "development.md", "reliability.md"):
        assert page in names, f"docs/{page} is missing"


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.name)
def test_relative_links_resolve(page: Path):
    assert broken_links(page) == []


def test_checker_finds_broken_links(tmp_path: Path):
    (tmp_path / "other.md").write_text("# A heading: with `code`\n\n## Same\n\n## Same\n", encoding="utf-8")
    (tmp_path / "pic.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n"
        "[ok](other.md) ![ok](pic.png) [ok](other.md#a-heading-with-code) [ok](other.md#same-1) [ok](#top)\n"
        "[ok](https://example.org/missing.md) `[in code](nowhere.md)`\n"
        "```\n[in a fence](nowhere.md)\n```\n"
        "[bad](missing.md) ![bad](img/missing.png) [bad](other.md#no-such-heading) [bad](#nope)\n",
        encoding="utf-8")
    assert broken_links(page) == [
        "page.md: link to missing file 'missing.md'",
        "page.md: link to missing file 'img/missing.png'",
        "page.md: link to missing heading 'other.md#no-such-heading'",
        "page.md: link to missing heading '#nope'",
    ]


def test_heading_slug_matches_github():
    assert heading_slug("Causal tracing: `python -m bench trace`") == "causal-tracing-python--m-bench-trace"
    assert heading_slug("Regression gate for new editors (`bench check`)") == \
        "regression-gate-for-new-editors-bench-check"

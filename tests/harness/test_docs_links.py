"""Every relative link (and image) in README.md and docs/*.md points at a file that exists, and every
`#anchor` names a heading of the target page (GitHub's heading slugs). Repository paths written as inline
code in the prose (`tests/harness/test_run.py`, `editors/rome.py`) must exist too, so moved files leave no stale
pointers; paths with placeholders (`<editor>`, `*`, `{}`) are not checked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT


# [text](target) and ![alt](target); the target ends at whitespace or ')' (an optional "title" follows)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
# inline code naming a file or folder of this repository by one of its top-level folders
REPO_PATH = re.compile(r"`((?:bench|editors|circuits|datasets|leaderboard|tests|benchmarks|docs|\.ci)/[\w./-]+)`")


def doc_pages(root: Path = REPO_ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _outside_fences(text: str) -> list[str]:
    """The page's lines outside fenced code blocks."""
    out, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            out.append(line)
    return out


def _prose_lines(text: str) -> list[str]:
    """The page's lines outside fenced code blocks, with inline code spans blanked."""
    return [re.sub(r"`[^`]*`", "``", line) for line in _outside_fences(text)]


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


def missing_repo_paths(page: Path, root: Path = REPO_ROOT) -> list[str]:
    """One line per inline-code repository path of ``page`` (outside fences) that does not exist."""
    text = "\n".join(_outside_fences(page.read_text(encoding="utf-8")))
    return [f"{page.name}: names missing path {path!r}" for path in REPO_PATH.findall(text)
            if not (root / path).exists()]


def test_readme_and_docs_pages_exist():
    names = {p.name for p in doc_pages()}
    for page in ("editors.md", "datasets.md", "metrics.md", "circuits.md", "leaderboard.md",
                 "performance.md", "results.md", "development.md", "reliability.md"):
        assert page in names, f"docs/{page} is missing"


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.name)
def test_relative_links_resolve(page: Path):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.name)
def test_repository_paths_in_prose_exist(page: Path):
    assert missing_repo_paths(page) == []


def test_path_checker_finds_missing_paths(tmp_path: Path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "run.py").write_text("", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("`bench/run.py` `bench/gone.py` `editors/hparams/<editor>/x.yaml` `runs/abc`\n"
                    "```\n`tests/in_a_fence.py`\n```\n", encoding="utf-8")
    assert missing_repo_paths(page, root=tmp_path) == ["page.md: names missing path 'bench/gone.py'"]


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

"""The documentation stands on its own: every relative Markdown link points at a file (and heading)
of the repository, and no tracked file points outside the repository."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# [text](target) and [text](target "title"); images too. Not inside fenced code blocks.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)

# Written in pieces so that this file does not match them itself.
FORBIDDEN = ["../" + "shared", "/work" + "/", "shared/" + "reference", "DESIGN" + ".md", "REVIEW" + ".md"]


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, timeout=60
        ).stdout
        return [ROOT / name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        # Not a git checkout (e.g. an unpacked source tree): every file outside hidden and build dirs.
        skip = {".venv", ".tools", "node_modules", "runs", "__pycache__"}
        files = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in skip]
            files += [Path(folder) / n for n in names]
        return files


def markdown_docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in _HEADING.findall(_FENCE.sub("", path.read_text()))}


def relative_links(path: Path) -> list[str]:
    targets = _LINK.findall(_FENCE.sub("", path.read_text()))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, mailto:, ...


def test_the_docs_exist_and_readme_links_them():
    readme_links = set(relative_links(ROOT / "README.md"))
    for name in ("architecture", "ppo", "generation", "data", "deploy"):
        assert (ROOT / "docs" / f"{name}.md").is_file()
        assert f"docs/{name}.md" in readme_links, f"README.md does not link docs/{name}.md"


@pytest.mark.parametrize("doc", markdown_docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_and_headings_of_the_repository(doc: Path):
    problems = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.is_relative_to(ROOT):
            problems.append(f"{target}: outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not problems, f"{doc.relative_to(ROOT)}: " + "; ".join(problems)


def test_slug_follows_github():
    assert slug("Reward model (Bradley-Terry)") == "reward-model-bradley-terry"
    assert slug("`Generation.UpdateWeights`: weight pushes") == "generationupdateweights-weight-pushes"


def test_no_tracked_file_refers_outside_the_repository():
    found = []
    for path in tracked_files():
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary
        rel = path.relative_to(ROOT).as_posix()
        for bad in FORBIDDEN:
            if bad in text:
                line = text[: text.index(bad)].count("\n") + 1
                found.append(f"{rel}:{line}: {bad}")
    assert not found, "references to files outside the repository: " + ", ".join(found)

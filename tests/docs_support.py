"""The README and the docs pages read as the tests that run their examples read them."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
_HEADING = re.compile(r"(#{1,6}) ")


def section(path: Path, heading: str) -> str:
    """The text under ``heading`` (a whole line, e.g. "## Detect") up to the next
    heading of the same or a higher level; lines inside code fences are not headings."""
    level = len(heading.split(" ", 1)[0])
    lines = path.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.rstrip("\n") == heading)
    fenced, end = False, len(lines)
    for i in range(start + 1, len(lines)):
        fenced ^= lines[i].startswith("```")
        match = None if fenced else _HEADING.match(lines[i])
        if match and len(match.group(1)) <= level:
            end = i
            break
    return "".join(lines[start:end])


def blocks(text: str, lang: str) -> list[str]:
    """The ``lang`` code blocks of ``text``, as written."""
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)

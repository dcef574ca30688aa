"""``tierdet generate``: every generated file, written or checked for drift."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tierdet.artifacts import dashboards, docs, proto, rules
from tierdet.build import repository

SOURCES: dict[str, Callable[[], dict[Path, str]]] = {
    "model_repository": repository.committed_files,
    "dashboards": dashboards.files,
    "prometheus rules": rules.files,
    "protobuf code": proto.files,
    # Last: the README's and the docs' tables read what the others do not change.
    "README and docs tables": docs.files,
}


def all_files() -> dict[Path, str]:
    out: dict[Path, str] = {}
    for render in SOURCES.values():
        out.update(render())
    return out


def drift(files: dict[Path, str] | None = None) -> list[str]:
    """Paths (repository-relative) whose content differs from what is generated."""
    files = all_files() if files is None else files
    return [str(path.relative_to(rules.REPO)) for path, text in files.items()
            if not path.is_file() or path.read_text() != text]


def write_all() -> list[str]:
    """Write what differs; returns those paths."""
    files = all_files()
    changed = drift(files)
    for path, text in files.items():
        if str(path.relative_to(rules.REPO)) in changed:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return changed

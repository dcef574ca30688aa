"""What the gateway's own builds leave in Triton's repository
(``HOME/repository/TARGET/<model>``, which ``changes`` builds into). A change
that fails puts each model's folder back as it was; a model the gateway built
and then retired leaves it. A Triton that restarts loads what the folder holds
(compose: every model in it): neither a failed version nor a retired model
comes back with it."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.pbtxt"


@dataclass(frozen=True)
class Before:
    """A model's folder before a change: its version folders and its config."""

    folder: Path
    existed: bool
    versions: frozenset[str]
    config: bytes | None


def before(root: Path, names: Iterable[str]) -> tuple[Before, ...]:
    """Each of ``names``' folders in ``root`` as it is now."""
    return tuple(_before(root / name) for name in names)


def _before(folder: Path) -> Before:
    if not folder.is_dir():
        return Before(folder, False, frozenset(), None)
    config = folder / CONFIG
    return Before(folder, True, frozenset(p.name for p in folder.iterdir() if p.is_dir()),
                  config.read_bytes() if config.is_file() else None)


def put_back(found: Iterable[Before]) -> None:
    """Each folder as ``before`` found it: a new model's folder removed, a replaced
    one's new version folders removed and its config restored."""
    for was in found:
        _put_back(was)


def _put_back(was: Before) -> None:
    if not was.existed:
        remove(was.folder)
        return
    if not was.folder.is_dir():
        return
    for path in was.folder.iterdir():
        if path.is_dir() and path.name not in was.versions:
            shutil.rmtree(path, ignore_errors=True)
    if was.config is not None:
        (was.folder / CONFIG).write_bytes(was.config)


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)

"""Nothing large lands in the tree by accident (a profiler dump, a built model, a cache).

Big files belong in two places only: the shipped weights and the docs' images.
Every clone carries every tracked byte forever, so the check is on what git tracks.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import REPO

LIMIT_BYTES = 2 * 1024 * 1024
ALLOWED = ("weights/", "docs/images/")


def _tracked() -> list[str]:
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                             check=True, timeout=60).stdout.decode()
    return [path for path in listing.split("\0") if path]


def oversized(root: Path, paths: list[str]) -> list[str]:
    """The files among ``paths`` (relative to ``root``) over the limit, outside ALLOWED."""
    return [path for path in paths if not path.startswith(ALLOWED)
            and (root / path).is_file() and (root / path).stat().st_size > LIMIT_BYTES]


def test_no_tracked_file_over_2_mb_outside_weights_and_docs_images():
    assert not oversized(REPO, _tracked()), "move it to weights/ or docs/images/, or untrack it"


def test_the_check_flags_a_large_file_only_outside_the_allowed_folders(tmp_path):
    sizes = {"profile.json": LIMIT_BYTES + 1, "weights/model.pt": LIMIT_BYTES + 1,
             "docs/images/shot.png": LIMIT_BYTES + 1, "small.json": LIMIT_BYTES}
    for path, size in sizes.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"\0" * size)
    assert oversized(tmp_path, list(sizes)) == ["profile.json"]

"""The docs site builds clean, the README stays a front door, and the pages that
restate code (the commands, the metrics) name all of it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from docs_support import DOCS, README
from tierdet.cli import parser
from tierdet.serving.metrics import Metrics

README_MAX_BYTES = 16 * 1024


def _build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` of the site whose mkdocs.yml is in ``root``."""
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(site)], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_the_site_builds_with_strict_checks(tmp_path):
    run = _build(REPO, tmp_path / "site")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "site" / "api" / "options" / "index.html").is_file()


@pytest.mark.parametrize("defect", ["a broken link", "a page left out of the nav"])
def test_the_strict_build_fails_on(tmp_path, defect):
    """The oracle for the build above: a copy of the site with one defect fails."""
    shutil.copy(REPO / "mkdocs.yml", tmp_path)
    shutil.copytree(DOCS, tmp_path / "docs")
    if defect == "a broken link":
        with (tmp_path / "docs" / "quickstart.md").open("a") as page:
            page.write("\nSee [the missing page](missing.md).\n")
    else:
        (tmp_path / "docs" / "orphan.md").write_text("# Orphan\n")
    run = _build(tmp_path, tmp_path / "site")
    assert run.returncode != 0
    assert ("missing.md" if defect == "a broken link" else "orphan.md") in run.stderr


def test_the_readme_is_a_front_door():
    assert len(README.read_bytes()) <= README_MAX_BYTES


def test_the_readmes_relative_links_point_at_files_that_exist():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local)
    missing = [link for link in local if not (REPO / link).is_file()]
    assert not missing


def test_the_command_line_page_names_every_command():
    commands = set(parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert commands
    page = (DOCS / "api" / "cli.md").read_text()
    assert not {c for c in commands if f"`tierdet {c}`" not in page}


def test_the_operations_page_names_every_gateway_metric():
    page = (DOCS / "operations.md").read_text()
    names = {f.name + ("_total" if f.type == "counter" else "")
             for f in Metrics().registry.collect()}
    assert len(names) > 10
    assert not {name for name in names if f"`{name}`" not in page}

"""The HTTP and gRPC examples of the README ("Use it") and of the API pages
(docs/api/http.md, docs/api/grpc.md), run as written against a live gateway.

Only the address changes (the test gateway listens on a free port), and each
request is given a 60 s budget (`sla_ms`): the commands name none, what is
tested is that they work, not routing, and the default tier's 500 ms can be
missed on a loaded 2-core CI machine (a correct 504). The curl lines run
through bash, the Python block through a fresh interpreter.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import encode, photos
from docs_support import DOCS, README, blocks, section

BUDGET = "sla_ms=60000"
# Where the examples are shown, and how many curl commands each place shows.
CURL = {"README": (README, "## Use it", 2), "docs": (DOCS / "api" / "http.md", "## Detect", 5)}
GRPC = {"README": (README, "## Use it"), "docs": (DOCS / "api" / "grpc.md", "## Detect")}


def _at(command: str, address: str) -> str:
    """``command`` sent to ``address``, with the budget in the query string."""
    def url(match: re.Match) -> str:
        return f"{address}/v1/detect?{BUDGET}" + ("&" if match.group(1) else "")

    sent, count = re.subn(r"localhost:8080/v1/detect(\?)?", url, command)
    assert count == 1, command
    return sent


@pytest.fixture()
def cwd_with_photo(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(encode(photos()["astronaut"]))
    return tmp_path


@pytest.mark.parametrize("where", list(CURL))
def test_curl_examples(gateway, cwd_with_photo, where):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    page, heading, count = CURL[where]
    address = gateway.http.removeprefix("http://")
    # One command per line, joined where a line ends in "\\" or "|".
    commands = [c for block in blocks(section(page, heading), "bash") for c in
                re.split(r"(?<![\\|])\n", block.strip())]
    assert len(commands) == count and all("curl" in c for c in commands)
    for command in commands:
        run = subprocess.run(["bash", "-c", _at(command, address)],
                             cwd=cwd_with_photo, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, (command, run.stderr)
        body = json.loads(run.stdout)
        assert body["width"] == 512 and "detections" in body and "routing" in body, command
        if "classes=person,dog" in command:
            assert {d["class_name"] for d in body["detections"]} <= {"person", "dog"}


@pytest.mark.parametrize("where", list(GRPC))
def test_grpc_python_example(gateway, cwd_with_photo, where):
    (code,) = [b for b in blocks(section(*GRPC[where]), "python") if "DetectorStub" in b]
    code = code.replace('"localhost:50051"', f'"{gateway.grpc}"')
    assert code.count("pb.DetectRequest(") == 1
    code = code.replace("pb.DetectRequest(", f"pb.DetectRequest({BUDGET}, ")
    run = subprocess.run([sys.executable, "-c", code], cwd=cwd_with_photo,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr

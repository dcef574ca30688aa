"""Property-based fuzzing of the HTTP API from its own OpenAPI schema.

Thousands of generated requests (schemathesis, hypothesis underneath) hit
the real gateway: none may get an unexpected server error or a stack
trace, and the gateway must still be healthy afterwards. The only 5xx a
client may see are the deliberate ones (tests/schemathesis_hooks.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx

HERE = Path(__file__).parent


def test_schema_fuzzing_finds_no_server_errors(gateway, tmp_path):
    st = shutil.which("st") or str(Path(os.sys.executable).with_name("st"))
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [st, "run", gateway.http + "/openapi.json",
         "--checks", "no_unexpected_server_error,no_stack_traces",
         # One worker: with two, hypothesis parses lambda sources from two threads
         # at once and CPython 3.11's ast.parse can fail ("AST constructor
         # recursion depth mismatch"), an error of the tool, not of the service.
         "--max-examples", "400", "--workers", "1", "--generation-deterministic",
         "--request-timeout", "60", "--phases", "examples,coverage,fuzzing"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    generated = int(re.search(r"(\d+) generated", output).group(1))
    assert generated >= 1000, output[-2000:]
    print(f"schemathesis: {generated} generated test cases, no failures")


def test_gateway_healthy_after_fuzzing(gateway):
    assert httpx.get(gateway.http + "/healthz").status_code == 200
    assert httpx.get(gateway.http + "/readyz").status_code == 200

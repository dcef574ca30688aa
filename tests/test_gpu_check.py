"""benchmarks/gpu_check.py is never run in CI (it is made for a borrowed GPU
machine); this only checks that it parses its arguments without a GPU, torch or
the wheels it carries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_parses_its_help():
    run = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for option in ("--prepare", "--assets", "--device", "--quick", "--budget", "--json"):
        assert option in run.stdout

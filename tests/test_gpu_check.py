"""benchmarks/gpu_check.py is made for a borrowed GPU machine and never needs
one in CI: its CPU path (``--device cpu --quick``) runs every section end to
end here (PyTorch latency, the decoders, the exported ONNX against PyTorch),
so a change that breaks the script is caught before the GPU is lent."""

from __future__ import annotations

import json
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


def test_gpu_check_runs_every_section_on_the_cpu(tmp_path):
    report = tmp_path / "gpu_check.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick",
                          "--json", str(report)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(report.read_text())
    assert "errors" not in results, results["errors"]
    assert results["skipped"] == [], results["skipped"]
    assert [row["batch"] for row in results["latency"]["efficientdet-d0"]] == [1, 2]
    assert results["decode"]
    # The exported graph answers as PyTorch does on real photographs.
    assert results["onnx"]["efficientdet-d0"]["passed"], results["onnx"]

"""The native programs some benchmarks drive (load generators, a CPU hog), found
or installed before any work starts, so a benchmark never fails half-way with a
traceback for a missing binary.

As root with apt-get (the CI and development machines), a missing tool is
installed from Debian's packages; otherwise the benchmark stops at once with
the command that installs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

# executable -> Debian package
PACKAGES = {"hey": "hey", "h2load": "nghttp2-client", "wrk": "wrk", "stress-ng": "stress-ng"}


def require(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not missing:
        return
    packages = sorted({PACKAGES[tool] for tool in missing})
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {', '.join(packages)} (for {', '.join(missing)})", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(command, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run(command, env=env, capture_output=True)
    still = [tool for tool in missing if shutil.which(tool) is None]
    if still:
        sys.exit(f"{', '.join(still)} not found: install with `sudo {' '.join(command)}`")

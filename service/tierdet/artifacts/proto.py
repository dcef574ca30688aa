"""The generated protobuf and gRPC code in ``tierdet/proto``, from ``protos/detection.proto``.

Needs grpcio-tools (the ``dev`` extra), pinned to the grpcio the service runs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SOURCE = REPO / "protos" / "detection.proto"
OUT = REPO / "service" / "tierdet" / "proto"
GENERATED = ("detection_pb2.py", "detection_pb2.pyi", "detection_pb2_grpc.py")


def files() -> dict[Path, str]:
    with tempfile.TemporaryDirectory() as tmp:
        # Compiled as tierdet/proto/detection.proto, so the generated imports
        # name the package the code is imported from.
        root = Path(tmp)
        (root / "tierdet" / "proto").mkdir(parents=True)
        shutil.copyfile(SOURCE, root / "tierdet" / "proto" / "detection.proto")
        out = root / "out"
        out.mkdir()
        result = subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{root}", f"--python_out={out}",
             f"--pyi_out={out}", f"--grpc_python_out={out}", "tierdet/proto/detection.proto"],
            capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"protoc failed (is grpcio-tools installed?): {result.stderr}")
        return {OUT / name: (out / "tierdet" / "proto" / name).read_text() for name in GENERATED}

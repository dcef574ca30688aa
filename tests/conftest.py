"""Shared fixtures: the real stack (built model, tritonserver, gateway), started once.

Everything listens on 127.0.0.1 on free ports. Built models are cached in
``TIERDET_TEST_HOME`` (default: <repo>/.cache/test-home) so local reruns
skip the export; CI starts from a clean clone and builds once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_MODEL = "efficientdet-d0"
TEST_WEIGHTS = "random:0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} while waiting for {url}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def stop_process(proc: subprocess.Popen, timeout_s: float = 20.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.fixture(scope="session")
def home() -> Path:
    path = Path(os.environ.get("TIERDET_TEST_HOME", REPO / ".cache" / "test-home"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def built_d0(home: Path):
    """EfficientDet-D0 exported with deterministic random weights (seed 0)."""
    from tierdet.build import ensure_built
    from tierdet.weights import WeightsSource

    (model,) = ensure_built([TEST_MODEL], WeightsSource.parse(TEST_WEIGHTS), home,
                            progress=False)
    return model


@dataclass
class Triton:
    grpc_url: str
    http_url: str
    metrics_url: str
    repository: Path


@pytest.fixture(scope="session")
def triton(home: Path, built_d0, tmp_path_factory) -> Iterator[Triton]:
    from tierdet.build import assemble
    from tierdet.triton_server import LocalTriton

    repository = assemble([built_d0], home, "cpu-local", intra_op_threads=2)
    work = tmp_path_factory.mktemp("triton")
    server = LocalTriton(repository, work, http_port=free_port(), grpc_port=free_port(),
                         metrics_port=free_port(), models=[TEST_MODEL],
                         log_path=work / "triton.log")
    server.start()
    try:
        states = server.wait_ready(120)
        assert all(states.values()), (work / "triton.log").read_text()[-3000:]
        yield Triton(server.grpc_url, server.http_url,
                     f"http://127.0.0.1:{server.metrics_port}/metrics", repository)
    finally:
        server.stop()


@dataclass
class Gateway:
    http: str
    grpc: str
    process: subprocess.Popen
    log: Path


def start_gateway(triton_url: str, log: Path, **env: str) -> Gateway:
    http_port, grpc_port = free_port(), free_port()
    environ = {
        **os.environ,
        "TIERDET_TRITON_URL": triton_url,
        "TIERDET_HTTP_PORT": str(http_port),
        "TIERDET_GRPC_PORT": str(grpc_port),
        **{f"TIERDET_{k.upper()}": v for k, v in env.items()},
    }
    proc = subprocess.Popen([sys.executable, "-m", "tierdet.cli", "serve"], env=environ,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    gw = Gateway(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", proc, log)
    wait_http(gw.http + "/readyz", 60, proc)
    return gw


@pytest.fixture(scope="session")
def gateway(triton: Triton, tmp_path_factory) -> Iterator[Gateway]:
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    # A small byte limit keeps the 413 test cheap.
    gw = start_gateway(triton.grpc_url, log, max_image_bytes=str(8 * 1024 * 1024))
    try:
        yield gw
    finally:
        stop_process(gw.process)


@pytest.fixture(scope="session")
def client(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.http, timeout=30.0) as c:
        yield c


def photos() -> dict[str, np.ndarray]:
    """Real photographs shipped with scikit-image (RGB uint8)."""
    import skimage.data

    return {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(),
            "chelsea": skimage.data.chelsea(), "rocket": skimage.data.rocket()}


def encode(image: np.ndarray, ext: str = ".jpg") -> bytes:
    import cv2

    ok, buf = cv2.imencode(ext, image[..., ::-1] if image.ndim == 3 else image)
    assert ok
    return buf.tobytes()

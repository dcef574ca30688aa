"""The router follows the device it runs on: when the device slows down (a GPU
clocking down, a neighbour taking the cores), the latency the router predicts
follows within a few answers, read from the time Triton reports its device
ran the model, even while other clients keep the device busy.

The device is emulated (benchmarks/instant/model.py: each execution sleeps a
set time and uses no CPU), so its speed is known and changed on purpose, and
the test counts answers, not seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import REPO, TEST_MODEL, encode, photos
from tierdet.build.models import assemble
from tierdet.devstack.stack import GatewayProcess, free_port
from tierdet.devstack.triton import LocalTriton
from tierdet.serving.routing import LIKE_DEVICES
from tierdet.serving.security import hash_key
from waiting import wait_until

# The router's estimate includes the gateway's own CPU time per answer: beside
# another pytest worker's model builds it moved with their load, not the device's.
pytestmark = pytest.mark.alone
JPEG = encode(photos()["coffee"])
BASE_MS = 40.0
ADMIN = "admin-3f9d02"  # Triton addresses are on /metrics for the admin only


def set_device(path: Path, base_ms: float) -> None:
    """The emulated device's service time from its next execution on (atomic)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"base_ms": base_ms, "per_image_ms": 0.0}))
    os.replace(tmp, path)


def _emulated_triton(built_d0, work: Path) -> tuple[LocalTriton, Path]:
    """A tritonserver whose model runs on an emulated device of its own, started
    at ``BASE_MS``; the device's file."""
    repository = assemble([built_d0], work / "home", "cpu-local", intra_op_threads=1)
    version = repository / TEST_MODEL / "1"
    shutil.copy(REPO / "benchmarks" / "instant" / "model.py", version / "model.py")
    device = version / "device.json"
    set_device(device, BASE_MS)
    server = LocalTriton(repository, work, http_port=free_port(), grpc_port=free_port(),
                         metrics_port=free_port(), models=[TEST_MODEL],
                         log_path=work / "triton.log")
    server.start()
    try:
        server.wait_ready(120)
    except BaseException:
        server.stop()
        raise
    return server, device


@pytest.fixture(scope="module")
def emulated(built_d0, tmp_path_factory) -> Iterator[tuple[LocalTriton, GatewayProcess, Path]]:
    work = tmp_path_factory.mktemp("emulated-device")
    server, device = _emulated_triton(built_d0, work)
    try:
        gateway = GatewayProcess.start(server.endpoint, work / "gateway.log", models=TEST_MODEL)
        try:
            yield server, gateway, device
        finally:
            gateway.stop()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def emulated_pair(built_d0, tmp_path_factory) -> Iterator[tuple[dict, GatewayProcess]]:
    """Two tritonservers, each with its own emulated device, behind one gateway:
    name -> (server, device file)."""
    work = tmp_path_factory.mktemp("emulated-pair")
    pair: dict[str, tuple[LocalTriton, Path]] = {}
    try:
        for name in ("a", "b"):
            pair[name] = _emulated_triton(built_d0, work / name)
        gateway = GatewayProcess.start(",".join(s.endpoint for s, _ in pair.values()),
                                       work / "gateway.log", models=TEST_MODEL,
                                       admin_key_sha256=hash_key(ADMIN))
        try:
            yield pair, gateway
        finally:
            gateway.stop()
    finally:
        for server, _ in pair.values():
            server.stop()


def _estimate(gateway: GatewayProcess) -> float:
    models = httpx.get(gateway.http + "/v1/models", timeout=10).json()["models"]
    return next(m["latency_ms"] for m in models if m["name"] == TEST_MODEL)


def _detect(gateway: GatewayProcess) -> None:
    r = httpx.post(gateway.http + "/v1/detect", files={"image": ("a.jpg", JPEG, "image/jpeg")},
                   data={"model": TEST_MODEL, "sla_ms": "60000"}, timeout=60)
    assert r.status_code == 200, r.text


def _neighbour(server: LocalTriton, stop: threading.Event, clients: int = 2) -> list:
    """Another client keeping ``clients`` requests at the device all along."""
    def run() -> None:
        tensor = grpcclient.InferInput("images", [1, 512, 512, 3], "UINT8")
        tensor.set_data_from_numpy(np.zeros((1, 512, 512, 3), np.uint8))
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            while not stop.is_set():
                client.infer(TEST_MODEL, [tensor])

    threads = [threading.Thread(target=run, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    return threads


def test_a_busy_device_that_slows_down_twice_is_followed_in_a_few_answers(emulated):
    server, gateway, device = emulated
    stop = threading.Event()
    threads = _neighbour(server, stop)
    try:
        for _ in range(5):  # the router reads the busy device at its first speed
            _detect(gateway)
        before = _estimate(gateway)
        # Waiting behind the neighbour is not mistaken for a slow device.
        assert BASE_MS <= before < 1.5 * BASE_MS, before
        set_device(device, 2 * BASE_MS)
        answers = []

        def followed() -> bool:
            _detect(gateway)
            answers.append(_estimate(gateway))
            return answers[-1] >= 1.6 * before

        wait_until(followed, "the router's estimate to follow the slower device")
        print(f"estimate {before:.1f} ms, then after each answer: {answers}")
        assert len(answers) <= 6, answers
        for _ in range(10):
            _detect(gateway)
        # ...and settles at the device's new speed, queue waits not counted in it.
        assert 1.6 * before <= _estimate(gateway) < 1.4 * 2 * before, (
            before, answers, _estimate(gateway))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)


def _served_by(gateway: GatewayProcess, pair: dict) -> str:
    """Which of the pair's servers answered one request (their arrival counts)."""
    def arrived() -> dict[str, int]:
        return {n: s.queue().arrived.get(TEST_MODEL, 0) for n, (s, _) in pair.items()}

    before = arrived()
    _detect(gateway)

    def counted() -> str | None:  # Triton counts a request just after it answers
        grew = [n for n, count in arrived().items() if count > before[n]]
        return grew[0] if len(grew) == 1 else None

    return wait_until(counted, "one of the pair to count the request")


def test_of_two_endpoints_the_one_whose_device_slowed_down_is_left_while_the_other_is_free(
        emulated_pair):
    """One model on two Tritons, one request at a time: while both devices run
    alike the two take turns; when b's device slows to 3x (a neighbour on its
    node), b is read slower than a, not the model as a whole, and requests go
    to a, which is free each time."""
    pair, gateway = emulated_pair
    first = [_served_by(gateway, pair) for _ in range(6)]
    assert sorted(first) == ["a"] * 3 + ["b"] * 3, first
    set_device(pair["b"][1], 3 * BASE_MS)
    went: list[str] = []
    while len(went) < 40 and went[-8:] != ["a"] * 8:
        went.append(_served_by(gateway, pair))
    print(f"after b slowed down: {went}")
    assert went[-8:] == ["a"] * 8 and went.count("b") <= 3, went
    # Operators see it too: the estimate per endpoint on /metrics.
    a, b = (pair[n][0].grpc_url for n in ("a", "b"))
    estimates = wait_until(lambda: (e := _route_service(gateway)) and a in e and b in e and e,
                           "the estimates of both endpoints on /metrics")
    assert estimates[b] > LIKE_DEVICES * estimates[a], estimates


def _route_service(gateway: GatewayProcess) -> dict[str, float]:
    """Endpoint -> the router's service estimate for the test model (as the admin,
    who sees endpoint addresses)."""
    text = httpx.get(gateway.http + "/metrics", headers={"x-admin-key": ADMIN}, timeout=10).text
    found = re.findall(r'tierdet_route_service_seconds\{endpoint="([^"]+)",model="'
                       + TEST_MODEL + r'"\} (\S+)', text)
    return {endpoint: float(value) for endpoint, value in found}

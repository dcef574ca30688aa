"""The gateway's memory bound: at most ``image_slots`` decoded images per worker
are alive at once, so a flood of 40-megapixel images at the configured
concurrency keeps the process under the bound serving/memory.py computes
(the figure the chart's memory limit is checked against); beyond the
concurrency bound requests are refused at once, and probes still answer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from conftest import TEST_MODEL
from tierdet.devstack.stack import GatewayProcess
from tierdet.serving import memory
from tierdet.serving.settings import Settings

WIDTH, HEIGHT = 7680, 5200  # 39.9 MP, under the default 40 MP limit
CONCURRENCY, SLOTS = 6, 2
MAX_IMAGE_BYTES = 8 * 1024 * 1024


def large_png() -> bytes:
    """40 MP that decode in full (PNG has no reduced decode): 120 MB of pixels each."""
    ramp = np.linspace(0, 255, WIDTH, dtype=np.uint8)
    image = np.broadcast_to(ramp[None, :, None], (HEIGHT, WIDTH, 3)).copy()
    cv2.rectangle(image, (1000, 1000), (3000, 4000), (0, 0, 255), -1)
    return cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes()


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_slots_default_to_the_workers_share_of_the_cores():
    assert memory.image_slots(Settings(workers=2), cores=8) == 4
    assert memory.image_slots(Settings(workers=4), cores=2) == 1
    assert memory.image_slots(Settings(image_slots=3, workers=4), cores=2) == 3


def test_a_cgroup_quota_is_what_a_pod_may_use(tmp_path):
    limit = tmp_path / "cpu.max"
    limit.write_text("150000 100000\n")  # a CPU limit of 1.5
    assert memory.usable_cores(limit) == min(2, memory.usable_cores(tmp_path / "none"))
    limit.write_text("max 100000\n")
    assert memory.usable_cores(limit) == memory.usable_cores(tmp_path / "none")


def test_forty_megapixel_flood_stays_under_the_bound(triton, tmp_path):
    png = large_png()
    assert len(png) < MAX_IMAGE_BYTES
    settings = {"max_concurrency": str(CONCURRENCY), "image_slots": str(SLOTS),
                "max_image_bytes": str(MAX_IMAGE_BYTES), "models": TEST_MODEL}
    bound = memory.bound(Settings.from_env(
        {f"TIERDET_{k.upper()}": v for k, v in settings.items()}))
    gateway = GatewayProcess.start(triton.endpoint, tmp_path / "gateway.log", **settings)
    try:
        idle = peak_rss(gateway.process.pid)

        def post(_: int) -> int:
            return httpx.post(gateway.http + "/v1/detect",
                              files={"image": ("big.png", png, "image/png")},
                              data={"model": TEST_MODEL, "sla_ms": "60000"},
                              timeout=120).status_code

        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            codes = list(pool.map(post, range(2 * CONCURRENCY)))
        peak = peak_rss(gateway.process.pid)
    finally:
        gateway.stop()
    assert codes == [200] * (2 * CONCURRENCY)
    image = 3 * WIDTH * HEIGHT
    print(f"peak {peak / memory.MIB:.0f} MiB (idle {idle / memory.MIB:.0f}), "
          f"bound {bound.describe()}")
    # The flood was real (more than one image decoded at a time, at full size)...
    assert peak - idle > 1.5 * image, (idle, peak)
    # ...and bounded: what the slots allow, far from six images at once.
    assert peak < bound.total, (peak, bound.describe())
    assert peak - idle < (SLOTS + 1) * memory.IMAGE_COPIES * image, (idle, peak)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_bound_counts_every_worker(workers):
    one = memory.bound(Settings(workers=1, image_slots=1))
    many = memory.bound(Settings(workers=workers, image_slots=1))
    assert many.images == workers * one.images and many.base == workers * one.base
    assert many.bodies == one.bodies  # the concurrency bound is the gateway's


def test_beyond_the_concurrency_bound_requests_are_refused_and_probes_answer(triton, tmp_path):
    png = large_png()
    gateway = GatewayProcess.start(triton.endpoint, tmp_path / "gateway.log",
                                   max_concurrency="2", image_slots="1", models=TEST_MODEL)
    try:
        def post(_: int) -> httpx.Response:
            return httpx.post(gateway.http + "/v1/detect",
                              files={"image": ("big.png", png, "image/png")},
                              data={"model": TEST_MODEL, "sla_ms": "60000"}, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = pool.map(post, range(6))
            probes = [httpx.get(gateway.http + path, timeout=5).status_code
                      for path in ("/healthz", "/metrics")]
            answers = list(answers)
        refused = [a for a in answers if a.status_code == 503]
        assert probes == [200, 200]
        assert refused and all(a.json()["error"]["code"] == "overloaded" and
                               a.headers["retry-after"] == "1" for a in refused)
        assert all(a.status_code in (200, 503) for a in answers)
        assert sum(a.status_code == 200 for a in answers) >= 2
        # The gateway serves on after the flood.
        assert post(0).status_code == 200
    finally:
        gateway.stop()


def test_a_batch_counts_the_images_its_size_can_hold():
    from tierdet.frontends.http_api import request_units

    settings = Settings(max_image_bytes=1000, batch_max_images=16)
    units = request_units(settings)
    per_image = settings.max_body_bytes(1)

    def scope(path: str, length: int | None) -> dict:
        headers = [] if length is None else [(b"content-length", str(length).encode())]
        return {"path": path, "headers": headers}

    assert units(scope("/v1/detect", 10**9)) == 1  # its body limit refuses the rest
    assert units(scope("/v1/detect/batch", 10)) == 1
    assert units(scope("/v1/detect/batch", 3 * per_image)) == 3
    assert units(scope("/v1/detect/batch", 3 * per_image + 1)) == 4
    assert units(scope("/v1/detect/batch", None)) == 16  # undeclared: all it may hold
    assert units(scope("/v1/detect/batch", 10**9)) == 16


def test_the_allocator_is_trimmed_once_the_gateway_is_idle_and_not_while_busy():
    async def run() -> None:
        trim = memory.IdleTrim(after_s=0.05)
        trim.begin()
        trim.begin()
        trim.end()  # one request still in flight: nothing scheduled
        assert trim._timer is None
        trim.end()
        for _ in range(3000):  # idle: trimmed after after_s (polled, 30 s at most)
            if trim.trims:
                break
            await asyncio.sleep(0.01)
        assert trim.trims == 1
        slow = memory.IdleTrim(after_s=3600)
        slow.begin()
        slow.end()
        assert slow._timer is not None
        slow.begin()  # a request before the idle time is up: the trim is called off
        assert slow._timer is None
        slow.end()
        slow._timer.cancel()

    asyncio.run(run())


ARENAS_PROBE = """
import ctypes, sys, threading
from tierdet.serving import memory
if sys.argv[1] == "capped":
    assert memory.limit_arenas()
keep, ready = [], threading.Barrier(9)
def work():
    keep.append(bytearray(4096))  # from malloc, in this thread's arena
    ready.wait()  # all alive at once: an ended thread's arena is reused
    ready.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
ready.wait()
ctypes.CDLL(None).malloc_stats()  # to stderr, one "Arena N:" per arena
ready.wait()
"""


@pytest.mark.parametrize("mode", ["capped", "default"])
def test_a_gateway_process_allocates_from_at_most_two_arenas(mode):
    """Eight threads allocating at once: with glibc's default each gets an
    arena of its own (up to 8 per core), with the gateway's cap they share two."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = subprocess.run([sys.executable, "-c", ARENAS_PROBE, mode], capture_output=True,
                         text=True, timeout=60, check=True, env=env)
    arenas = run.stderr.count("Arena ")
    if mode == "capped":
        assert arenas == memory.ARENAS, run.stderr
    else:  # the control: without the cap the probe sees one arena per thread
        assert arenas > memory.ARENAS, run.stderr

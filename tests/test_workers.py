"""Several gateway workers behind one pair of ports (TIERDET_WORKERS=2), on the
real stack: both serve, one scrape counts every worker's requests, an API
key's rate holds for the gateway as a whole, a worker that dies is replaced
without losing what it counted, and a stop ends every worker.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import TEST_MODEL, encode, photos
from prometheus_client.parser import text_string_to_metric_families
from tierdet.devstack.stack import GatewayProcess
from tierdet.proto import detection_pb2 as pb
from tierdet.proto import detection_pb2_grpc as pb_grpc
from tierdet.serving.security import hash_key
from waiting import wait_until

JPEG = encode(photos()["astronaut"])
OPEN, LIMITED = "open-key", "limited-key"
LIMITED_BURST = 4  # and a rate so low that no token comes back during the test


@pytest.fixture(scope="module")
def workers(triton, tmp_path_factory):
    folder = tmp_path_factory.mktemp("workers")
    keys = folder / "keys.yaml"
    keys.write_text(
        f"keys:\n  - {{name: open, sha256: {hash_key(OPEN)}}}\n"
        f"  - {{name: limited, sha256: {hash_key(LIMITED)}, rate_per_s: 0.001, "
        f"burst: {LIMITED_BURST}}}\n")
    gw = GatewayProcess.start(triton.endpoint, folder / "gateway.log", workers="2",
                              api_keys_file=str(keys), models=TEST_MODEL)
    yield gw
    gw.stop()


def children(pid: int) -> set[int]:
    """The live processes whose parent is ``pid``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def detect(gateway: GatewayProcess, key: str = OPEN) -> httpx.Response:
    """One request on a connection of its own (the kernel picks the worker)."""
    # Pinned, with a budget no answer misses: these tests are about serving, and a
    # worker just started measures the model before its first routing.
    return httpx.post(gateway.http + "/v1/detect", headers={"X-API-Key": key},
                      files={"image": ("a.jpg", JPEG, "image/jpeg")},
                      data={"model": TEST_MODEL, "sla_ms": "60000"}, timeout=30)


def counted(gateway: GatewayProcess, protocol: str, outcome: str = "ok") -> float:
    text = httpx.get(gateway.http + "/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "tierdet_requests" for sample in family.samples
               if sample.name == "tierdet_requests_total"
               and sample.labels["protocol"] == protocol
               and sample.labels["outcome"] == outcome)


def regions_by_worker(triton_url: str, pids: set[int]) -> dict[int, int]:
    import tritonclient.grpc as triton_grpc

    with triton_grpc.InferenceServerClient(triton_url) as client:
        names = client.get_system_shared_memory_status(as_json=True).get("regions", {})
    return {pid: sum(name.startswith(f"tierdet_{pid}_") for name in names) for pid in pids}


def test_two_workers_serve_and_any_scrape_counts_them_all(workers, triton):
    pids = children(workers.process.pid)
    assert len(pids) == 2
    before = counted(workers, "http")
    answers = [detect(workers) for _ in range(24)]
    assert [a.status_code for a in answers] == [200] * 24
    # Each worker letterboxes into shared-memory regions of its own (named by its
    # pid): both have some, so both served.
    assert all(n > 0 for n in regions_by_worker(triton.grpc_url, pids).values())
    for _ in range(4):  # scrapes land on either worker; each sees all 24
        assert counted(workers, "http") == before + 24


def test_grpc_calls_are_spread_and_counted(workers):
    before = counted(workers, "grpc")
    for _ in range(8):
        with grpc.insecure_channel(workers.grpc) as channel:
            reply = pb_grpc.DetectorStub(channel).Detect(
                pb.DetectRequest(image=JPEG, model=TEST_MODEL), timeout=30,
                metadata=[("x-api-key", OPEN)])
        assert reply.model == TEST_MODEL
    assert counted(workers, "grpc") == before + 8


def test_a_keys_rate_holds_for_the_gateway_not_for_each_worker(workers):
    codes = [detect(workers, LIMITED).status_code for _ in range(3 * LIMITED_BURST)]
    # Two workers with a bucket each would let through up to twice the burst.
    assert codes.count(200) == LIMITED_BURST
    assert codes.count(429) == 2 * LIMITED_BURST


def test_a_dead_worker_is_replaced_and_its_counts_are_kept(workers):
    before = counted(workers, "http")
    victim = min(children(workers.process.pid))
    os.kill(victim, signal.SIGKILL)
    replaced(workers, victim)
    # The newcomer serves as soon as it listens; the survivor serves meanwhile.
    codes = [detect(workers).status_code for _ in range(12)]
    assert codes == [200] * 12
    assert counted(workers, "http") == before + 12  # the dead worker's counts stay


def replaced(gateway: GatewayProcess, victim: int) -> set[int]:
    """Wait until the supervisor has a new worker in ``victim``'s place."""
    def new_one() -> set[int] | None:
        pids = children(gateway.process.pid)
        return pids if len(pids) == 2 and victim not in pids else None
    return wait_until(new_one, f"a worker in place of {victim}")


def served(gateway: GatewayProcess, triton_url: str) -> set[int]:
    """Send requests until each of the two workers has answered one (each names the
    shared-memory regions it letterboxes into by its pid); the workers' pids."""
    def both() -> set[int] | None:
        pids = children(gateway.process.pid)
        assert detect(gateway).status_code == 200
        regions = regions_by_worker(triton_url, pids)
        return pids if len(pids) == 2 and all(regions.values()) else None
    return wait_until(both, "both workers to serve a request")


@pytest.mark.parametrize("age_s", [(1.0, 5.0, 30.0)], ids=["1s-5s-30s"])
def test_a_worker_that_served_is_replaced_whenever_it_dies(triton, tmp_path, age_s):
    """Any death of a worker that has served is a crash to recover from, however
    soon after the gateway's start: only a worker that never served is a failed
    start. One worker is killed at each age (or as soon after it as it has served)."""
    import psutil

    gateway = GatewayProcess.start(triton.endpoint, tmp_path / "gateway.log", workers="2",
                                   models=TEST_MODEL)
    try:
        began = psutil.Process(gateway.process.pid).create_time()
        killed_at = []
        for age in age_s:
            victim = min(served(gateway, triton.grpc_url))
            # The moment under test is a worker's age, so here the clock is the point.
            time.sleep(max(0.0, began + age - time.time()))
            killed_at.append(round(time.time() - began, 1))
            os.kill(victim, signal.SIGKILL)
            replaced(gateway, victim)
            assert gateway.process.poll() is None, f"the gateway stopped (kills at {killed_at} s)"
            assert [detect(gateway).status_code for _ in range(4)] == [200] * 4
    finally:
        gateway.stop()


def test_a_port_taken_by_another_gateway_stops_the_start(workers, triton, tmp_path):
    # gRPC sets SO_REUSEPORT by default: without turning it off a second gateway
    # would start on the first one's gRPC port and take half its connections.
    taken = workers.grpc.rsplit(":", 1)[1]
    for count in ("1", "2"):
        log = tmp_path / f"second-{count}.log"
        with pytest.raises(RuntimeError, match="exited"):
            GatewayProcess.start(triton.endpoint, log, grpc_port=taken, workers=count,
                                 timeout_s=30)
        assert re.search(r"in use|Address already in use|Failed to bind", log.read_text())


def test_a_stop_ends_every_worker(workers):
    pids = children(workers.process.pid)
    assert workers.stop() == 0
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]

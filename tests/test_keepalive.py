"""gRPC keep-alive between the gateway and Triton, against a real tritonserver
with gRPC's default server ping policy (--grpc-http2-min-recv-ping-interval-
without-data 300 s, --grpc-http2-max-ping-strikes 2): a client that pings more
often while no data flows is cut off with GOAWAY "too_many_pings".

Time is scaled down: the gateway pings every 100 ms (production: 10 s), so a
clash with that policy would show within seconds. The control shows that on this
Triton a client pinging its idle channel is cut off within seconds, and that the
log line looked for is where the check looks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import TEST_MODEL, encode, photos
from tierdet.devstack.stack import GatewayProcess
from tierdet.registry.specs import SPECS
from tierdet.serving.triton import channel_args
from waiting import wait_until

JPEG = encode(photos()["chelsea"])
CUT_OFF = "too_many_pings"
KEEPALIVE_PING = "Finish keepalive ping"  # gRPC core's http_keepalive trace: a ping acked
GRPC_LOGS = {"GRPC_VERBOSITY": "debug", "GRPC_TRACE": "http_keepalive"}


PROBE = """
import asyncio, json, sys
import numpy as np
import tritonclient.grpc.aio as aio
from tritonclient.grpc import InferInput

async def main(url, args, model, size):
    client = aio.InferenceServerClient(url, channel_args=[tuple(a) for a in args])
    pixels = InferInput("images", [1, size, size, 3], "UINT8")
    pixels.set_data_from_numpy(np.zeros((1, size, size, 3), np.uint8))
    # Calls open for several keep-alive intervals (eight at once queue at the
    # one model instance, however fast it runs): keep-alive pings go out.
    for _ in range(2):
        await asyncio.gather(*(client.infer(model, [pixels]) for _ in range(8)))
    await asyncio.sleep(8)  # then an idle channel
    await client.infer(model, [pixels])
    await client.close()

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
"""


def _probe(url: str, args: list[tuple[str, int]], calls_must_succeed: bool = True) -> str:
    """What gRPC core logged for a client with channel ``args``: calls, idle, a call."""
    size = str(SPECS[TEST_MODEL].input_size)
    run = subprocess.run([sys.executable, "-c", PROBE, url, json.dumps(args), TEST_MODEL, size],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, **GRPC_LOGS})
    if calls_must_succeed:
        assert run.returncode == 0, run.stderr[-2000:]
    return run.stderr


def test_a_client_that_pings_its_idle_channel_is_cut_off(triton):
    """The control. Where the cut-off lands depends on the host's pace: while the
    channel idles (the next call reconnects), or while calls wait in Triton's queue
    with no data flowing back (that call fails UNAVAILABLE): either is the cut-off."""
    idle_pinger = [("grpc.keepalive_time_ms", 100), ("grpc.keepalive_timeout_ms", 2000),
                   ("grpc.keepalive_permit_without_calls", 1),
                   ("grpc.http2.max_pings_without_data", 0)]
    assert CUT_OFF in _probe(triton.grpc_url, idle_pinger, calls_must_succeed=False)


def test_the_gateways_channel_options_are_never_cut_off(triton):
    """The options alone, without the model watcher's once-a-second data."""
    log = _probe(triton.grpc_url, channel_args(keepalive_ms=100))
    assert KEEPALIVE_PING in log, "no keep-alive ping was sent"
    assert CUT_OFF not in log


@pytest.fixture(scope="module")
def pinging_gateway(triton, tmp_path_factory, monkeypatch_module):
    for name, value in GRPC_LOGS.items():
        monkeypatch_module.setenv(name, value)
    gw = GatewayProcess.start(triton.endpoint, tmp_path_factory.mktemp("ka") / "gateway.log",
                              triton_keepalive_ms="100")
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _detect(gw: GatewayProcess) -> int:
    return httpx.post(gw.http + "/v1/detect", files={"image": ("a.jpg", JPEG)}, timeout=60,
                      data={"model": TEST_MODEL, "sla_ms": "60000"}).status_code


def test_the_gateway_keeps_its_channel_through_calls_and_idle_time(pinging_gateway):
    """End to end: the gateway process, its watcher reading Triton every second."""
    gw = pinging_gateway

    def pinged() -> bool:
        # Eight calls at once queue at the one model instance, however fast it
        # runs: calls stay open for keep-alive intervals, so pings go out.
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda _: _detect(gw), range(8))) == [200] * 8
        return KEEPALIVE_PING in gw.log.read_text()

    wait_until(pinged, "the gateway's first keep-alive ping")
    time.sleep(8)  # then an idle channel, as long as the control's
    assert _detect(gw) == 200
    assert CUT_OFF not in gw.log.read_text()

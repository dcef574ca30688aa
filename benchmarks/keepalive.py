"""Is the gateway's gRPC channel to Triton ever cut off by Triton's ping policy?

A tritonserver (the wheel's) with gRPC's default server ping policy
(--grpc-http2-min-recv-ping-interval-without-data 300 s, max ping strikes 2),
at production timings: the real gateway answers a request, sits idle for
``--hold-s`` (default 11 minutes), answers another; beside it, a bare client
that pings its idle channel every 10 s (``grpc.keepalive_permit_without_calls``,
what a naive "notice a dead Triton on idle channels" would set) does the same.
Prints, for each, both answers and whether gRPC core logged a GOAWAY
"too_many_pings". Both run at once, so one hold covers both.

    python benchmarks/keepalive.py --hold-s 660

``tests/test_keepalive.py`` checks the same in seconds with 100 ms pings.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tierdet.build.models import default_home, ensure_built
from tierdet.build.weights import WeightsSource
from tierdet.devstack.stack import GatewayProcess, start_triton

MODEL = "efficientdet-d0"
GRPC_LOGS = {"GRPC_VERBOSITY": "debug", "GRPC_TRACE": "http_keepalive"}
IDLE_PINGER = """
import asyncio, sys, time
import tritonclient.grpc.aio as aio

async def main(url, hold):
    client = aio.InferenceServerClient(url, channel_args=[
        ("grpc.keepalive_time_ms", 10000), ("grpc.keepalive_timeout_ms", 2000),
        ("grpc.keepalive_permit_without_calls", 1)])
    print("first", await client.is_server_live(), flush=True)
    await asyncio.sleep(hold)
    start = time.perf_counter()
    live = await client.is_server_live()
    print("after", live, round((time.perf_counter() - start) * 1e3), "ms", flush=True)
    await client.close()

asyncio.run(main(sys.argv[1], float(sys.argv[2])))
"""


def _cut_off(log: str) -> list[str]:
    return [line[:160] for line in log.splitlines() if "too_many_pings" in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hold-s", type=float, default=660.0)
    parser.add_argument("--home", type=Path, default=default_home())
    args = parser.parse_args()
    (model,) = ensure_built([MODEL], WeightsSource.parse("random:0"), args.home, progress=False)
    work = Path(tempfile.mkdtemp(prefix="tierdet-keepalive-"))
    triton = start_triton([model], args.home, work / "triton", threads=2)
    os.environ.update(GRPC_LOGS)
    gateway = GatewayProcess.start(triton.endpoint, work / "gateway.log")
    pinger_log = (work / "pinger.log").open("w")
    pinger = subprocess.Popen([sys.executable, "-c", IDLE_PINGER, triton.grpc_url,
                               str(args.hold_s)], stdout=subprocess.PIPE, stderr=pinger_log,
                              text=True)
    try:
        photo = _photo()
        print("gateway first:", _detect(gateway, photo), flush=True)
        time.sleep(args.hold_s)
        print(f"gateway after {args.hold_s:.0f} s idle:", _detect(gateway, photo), flush=True)
        out, _ = pinger.communicate(timeout=120)
        print("idle pinger:", out.replace("\n", " | "))
    finally:
        gateway.stop()
        triton.stop()
        pinger_log.close()
    print("gateway cut off:", _cut_off((work / "gateway.log").read_text()) or "never")
    print("idle pinger cut off:", _cut_off((work / "pinger.log").read_text()) or "never")


def _photo() -> bytes:
    import cv2
    import skimage.data

    ok, buf = cv2.imencode(".jpg", skimage.data.chelsea()[..., ::-1])
    assert ok
    return buf.tobytes()


def _detect(gateway: GatewayProcess, photo: bytes) -> tuple[int, int]:
    start = time.perf_counter()
    r = httpx.post(gateway.http + "/v1/detect", files={"image": ("a.jpg", photo)},
                   data={"model": MODEL, "sla_ms": "60000"}, timeout=60)
    return r.status_code, round((time.perf_counter() - start) * 1e3)


if __name__ == "__main__":
    main()

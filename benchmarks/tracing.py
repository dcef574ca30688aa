"""What tracing costs (issue 17): the gateway with tracing off, on (every span
exported over OTLP to a receiver in this process), and a revision from before
request ids and tracing (``--baseline``), side by side in one run against
Triton's instant model (benchmarks/instant/model.py), so the figures are the
gateway's own.

Per side, rounds interleaved: the p50 of sequential requests (one keep-alive
connection, 720p JPEG) and a closed loop with ``hey`` (c=8) for images/s and
the gateway's CPU per request.

    python benchmarks/tracing.py --baseline c5505a3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import httpx
from native_tools import require
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from scale_up import (
    BUDGET_MS,
    MODEL,
    baseline_checkout,
    gateway,
    hey,
    multipart,
    p50_ms,
    photos,
    triton_serving,
    with_cpu,
)
from tierdet.build.models import default_home, ensure_built
from tierdet.build.weights import WeightsSource
from tierdet.devstack.stack import free_port


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP receiver that counts what it gets."""

    def __init__(self) -> None:
        self.spans = 0
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 (gRPC naming)
        with self.lock:
            self.spans += sum(len(s.spans) for r in request.resource_spans
                              for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", type=Path, default=default_home())
    p.add_argument("--baseline", help="a git revision from before tracing")
    p.add_argument("--sequential", type=int, default=200)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    require("hey")
    (built,) = ensure_built([MODEL], WeightsSource.parse("random:0"), args.home,
                            progress=False)
    jpeg = photos()["720p"]
    sink = Sink()
    receiver = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, receiver)
    port = receiver.add_insecure_port(f"127.0.0.1:{free_port()}")
    receiver.start()
    tracing_on = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                  "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="tierdet-tracing-") as tmp, \
            baseline_checkout(args.baseline, Path(tmp)) as baseline:
        work = Path(tmp)
        body, content_type = multipart(jpeg, sla_ms=BUDGET_MS)
        (work / "body.http").write_bytes(body)
        triton = triton_serving(built, work / "instant", instant=True)
        try:
            with contextlib.ExitStack() as stack:
                sides = {"off": stack.enter_context(gateway(triton, work / "off.log"))}
                with environment(**tracing_on):
                    sides["on"] = stack.enter_context(gateway(triton, work / "on.log"))
                if baseline is not None:
                    sides["before"] = stack.enter_context(
                        gateway(triton, work / "before.log", baseline))
                for _ in range(args.rounds):
                    for side, gw in sides.items():
                        with httpx.Client(base_url=gw.http, timeout=60) as http:
                            def post() -> object:
                                r = http.post("/v1/detect", data={"sla_ms": BUDGET_MS},
                                              files={"image": ("a.jpg", jpeg, "image/jpeg")})
                                r.raise_for_status()
                                return r
                            seq = p50_ms(post, args.sequential)
                        load = with_cpu(gw.process.pid, lambda gw=gw: hey(
                            gw.http + "/v1/detect", work / "body.http", content_type, 8,
                            args.seconds))
                        row = results.setdefault(side, {"seq": [], "rps": [], "cpu": []})
                        row["seq"].append(seq)
                        row["rps"].append(load.rps)
                        row["cpu"].append(load.cpu_ms or 0.0)
        finally:
            triton.stop()
    receiver.stop(0)
    print(f"\n## Tracing cost: {MODEL}'s config on the instant model, 720p JPEG over HTTP, "
          f"{args.rounds} rounds interleaved (medians)\n")
    print("| gateway | p50 sequential ms | images/s (hey c=8) | CPU ms / request |")
    print("|---|---|---|---|")
    med = {side: {k: statistics.median(v) for k, v in row.items()}
           for side, row in results.items()}
    for side, row in med.items():
        print(f"| {side} | {row['seq']:.2f} | {row['rps']:.0f} | {row['cpu']:.2f} |")
    reference = "before" if "before" in med else "off"
    for side in (s for s in med if s != reference):
        print(f"{side} vs {reference}: p50 {med[side]['seq'] / med[reference]['seq']:.3f}x, "
              f"images/s {med[side]['rps'] / med[reference]['rps']:.3f}x, CPU per request "
              f"{med[side]['cpu'] / med[reference]['cpu']:.3f}x")
    print(f"spans received with tracing on: {sink.spans}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

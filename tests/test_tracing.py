"""OpenTelemetry traces on a real gateway, received by a real OTLP receiver (the
collector's gRPC TraceService, from opentelemetry-proto) on loopback: a
request's spans continue the caller's trace with the right parents, carry
what the router did, and the trace id comes back."""

from __future__ import annotations

import http.server
import json
import threading
import time
from concurrent import futures
from typing import ClassVar

import grpc
import httpx
import pytest
from conftest import TEST_MODEL, encode, photos
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from tierdet.build.models import assemble
from tierdet.devstack.stack import GatewayProcess, free_port
from tierdet.devstack.triton import LocalTriton
from tierdet.proto import detection_pb2 as pb
from tierdet.proto import detection_pb2_grpc as pb_grpc
from tierdet.serving import tracing
from waiting import wait_until

JPEG = encode(photos()["coffee"])
TRACE, PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
STAGES = {"decode", "route", "preprocess", "triton", "postprocess"}


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 (gRPC naming)
        with self.lock:
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    self.spans.extend(scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str, count: int, timeout_s: float = 10.0) -> list:
        """The spans of ``trace_id`` once ``count`` have arrived (export is batched)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                spans = [s for s in self.spans if s.trace_id.hex() == trace_id]
            if len(spans) >= count or time.monotonic() > deadline:
                return spans
            time.sleep(0.05)


class TritonReceiver(http.server.BaseHTTPRequestHandler):
    """OTLP over HTTP with JSON bodies: what tritonserver's exporter sends."""

    protocol_version = "HTTP/1.1"  # the exporter keeps its connection: HTTP/1.0 drops spans
    spans: ClassVar[list[dict]] = []  # every handler instance adds to the one list

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        for resource in body.get("resourceSpans", ()):
            for scope in resource.get("scopeSpans", ()):
                self.spans.extend(scope.get("spans", ()))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(scope="module")
def triton_traced(home, built_d0, tmp_path_factory):
    """A tritonserver that traces every request (OpenTelemetry mode) to a receiver."""
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), TritonReceiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    work = tmp_path_factory.mktemp("triton-traced")
    url = f"http://127.0.0.1:{receiver.server_address[1]}/v1/traces"
    server = LocalTriton(
        assemble([built_d0], home, "cpu-local", intra_op_threads=2), work,
        http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        models=[TEST_MODEL], log_path=work / "triton.log", extra_args=[
            "--trace-config", "mode=opentelemetry", "--trace-config", "rate=1",
            "--trace-config", "level=TIMESTAMPS", "--trace-config", f"opentelemetry,url={url}",
            "--trace-config", "opentelemetry,bsp_schedule_delay=100"])
    server.start()
    server.wait_ready(120)
    yield server
    server.stop()
    receiver.shutdown()


@pytest.fixture(scope="module")
def traced(triton_traced, tmp_path_factory):
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    server.start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        env.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # ms: export soon, tests wait less
        env.setenv("OTEL_SERVICE_NAME", "tierdet-test")
        gw = GatewayProcess.start(triton_traced.endpoint,
                                  tmp_path_factory.mktemp("traced") / "gateway.log")
    yield gw, receiver
    gw.stop()
    server.stop(0)


def by_name(spans) -> dict:
    return {s.name: s for s in spans}


def check_tree(spans, server_name: str, parent: str | None) -> None:
    named = by_name(spans)
    server, detect = named[server_name], named["detect"]
    assert (server.parent_span_id.hex() or None) == parent
    assert named["admission"].parent_span_id == server.span_id
    assert detect.parent_span_id == server.span_id
    for stage in STAGES:
        assert named[stage].parent_span_id == detect.span_id, stage
    attributes = {a.key: a.value for a in detect.attributes}
    assert attributes["tierdet.model"].string_value == TEST_MODEL
    assert attributes["tierdet.endpoint"].string_value
    assert attributes["tierdet.code"].string_value == "ok"
    # 60 s asked; a gRPC call's 30 s deadline is the tighter budget.
    assert 29_000 < attributes["tierdet.budget_ms"].double_value <= 60_000
    assert attributes["tierdet.predicted_ms"].double_value > 0


def test_an_http_request_continues_the_callers_trace(traced):
    gw, receiver = traced
    r = httpx.post(gw.http + "/v1/detect", timeout=30,
                   headers={"traceparent": f"00-{TRACE}-{PARENT}-01"},
                   files={"image": ("a.jpg", JPEG, "image/jpeg")},
                   data={"model": TEST_MODEL, "sla_ms": "60000"})
    assert r.status_code == 200 and r.headers["x-trace-id"] == TRACE
    spans = receiver.of_trace(TRACE, len(STAGES) + 3)
    check_tree(spans, "POST /v1/detect", PARENT)


@pytest.mark.triton_trace
def test_triton_continues_the_trace_under_the_gateways_call(traced):
    # The wheel's Triton 2.51 continued 10 of 12 such traces on one machine
    # (tritonclient's own sync calls: 10 of 10) and none of 3 in a CI run, so this
    # is not part of the default run: `pytest -m triton_trace`. The link is
    # checked on each trace it continued, and at least one of three must be.
    gw, receiver = traced
    calls = {}
    for n in range(3):
        trace = f"6cf92f3577b34da6a3ce929d0e0e47{n:02d}"
        r = httpx.post(gw.http + "/v1/detect", timeout=30,
                       headers={"traceparent": f"00-{trace}-{PARENT}-01"},
                       files={"image": ("a.jpg", JPEG, "image/jpeg")},
                       data={"model": TEST_MODEL, "sla_ms": "60000"})
        assert r.status_code == 200
        calls[trace] = by_name(receiver.of_trace(trace, len(STAGES) + 3))["triton"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        requests = {s["traceId"]: s for s in TritonReceiver.spans
                    if s["name"] == "InferRequest" and s["traceId"] in calls}
        if len(requests) == len(calls):
            break
        time.sleep(0.1)
    assert requests, "Triton continued none of the gateway's traces"
    for trace, request in requests.items():
        assert request["parentSpanId"] == calls[trace].span_id.hex()
        names = {s["name"] for s in TritonReceiver.spans if s["traceId"] == trace}
        assert names >= {TEST_MODEL, "compute"}


def test_a_grpc_call_continues_the_callers_trace(traced):
    gw, receiver = traced
    trace = "0af7651916cd43dd8448eb211c80319c"
    with grpc.insecure_channel(gw.grpc) as channel:
        _, call = pb_grpc.DetectorStub(channel).Detect.with_call(
            pb.DetectRequest(image=JPEG, model=TEST_MODEL, sla_ms=60000), timeout=30,
            metadata=[("traceparent", f"00-{trace}-b7ad6b7169203331-01")])
    assert dict(call.trailing_metadata())["x-trace-id"] == trace
    check_tree(receiver.of_trace(trace, len(STAGES) + 3), "Detector/Detect",
               "b7ad6b7169203331")


def test_without_a_traceparent_a_request_starts_its_own_trace(traced):
    gw, receiver = traced
    r = httpx.post(gw.http + "/v1/detect", timeout=30, headers={"x-request-id": "own-trace"},
                   files={"image": ("a.jpg", JPEG, "image/jpeg")},
                   data={"model": TEST_MODEL, "sla_ms": "60000"})
    assert r.status_code == 200 and "x-trace-id" not in r.headers
    def mine() -> list:
        with receiver.lock:
            return [s for s in receiver.spans if any(
                a.key == "tierdet.request_id" and a.value.string_value == "own-trace"
                for a in s.attributes)]

    (server,) = wait_until(mine, "the span of the call that sent only a request id")
    assert server.parent_span_id == b"" and server.trace_id.hex() != TRACE


def test_a_refused_call_is_a_span_with_its_code(traced):
    gw, receiver = traced
    trace = "5bf92f3577b34da6a3ce929d0e0e4737"
    r = httpx.post(gw.http + "/v1/detect", timeout=30,
                   headers={"traceparent": f"00-{trace}-{PARENT}-01"},
                   files={"image": ("a.jpg", b"junk", "image/jpeg")},
                   data={"model": TEST_MODEL, "sla_ms": "60000"})
    assert r.status_code == 415 and r.headers["x-trace-id"] == trace
    spans = by_name(receiver.of_trace(trace, 3))
    attributes = {a.key: a.value for a in spans["detect"].attributes}
    assert attributes["tierdet.code"].string_value == "unsupported_media_type"


def test_with_tracing_off_the_trace_id_still_comes_back(client):
    r = client.get("/v1/models", headers={"traceparent": f"00-{TRACE}-{PARENT}-01"})
    assert r.headers["x-trace-id"] == TRACE
    assert "x-trace-id" not in client.get(
        "/v1/models", headers={"traceparent": "00-zz-not-a-traceparent-01"}).headers


def test_tracing_is_on_only_when_an_endpoint_is_configured():
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
                               "OTEL_SDK_DISABLED": "true"})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
                               "OTEL_TRACES_EXPORTER": "none"})
    assert tracing.trace_id(f"00-{TRACE}-{PARENT}-01") == TRACE
    assert tracing.trace_id(f"00-{'0' * 32}-{PARENT}-01") is None


def _protocol_of(span) -> str:
    return {a.key: a.value for a in span.attributes}["tierdet.protocol"].string_value


def test_open_inference_protocol_calls_are_traced_and_labelled(traced):
    """tritonclient's REST and gRPC calls continue the caller's trace like /v1's,
    their server spans labelled with the protocol."""
    import numpy as np
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    gw, receiver = traced
    for module, address, trace, server_name, protocol in (
            (thttp, gw.http.removeprefix("http://"), "7af7651916cd43dd8448eb211c803101",
             f"POST /v2/models/{TEST_MODEL}/infer", "v2-http"),
            (tgrpc, gw.grpc, "7af7651916cd43dd8448eb211c803102",
             "GRPCInferenceService/ModelInfer", "v2-grpc")):
        tensor = module.InferInput("IMAGE", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([JPEG], dtype=np.object_))
        with module.InferenceServerClient(address) as client:
            client.infer(TEST_MODEL, [tensor], parameters={"sla_ms": 60000},
                         headers={"traceparent": f"00-{trace}-{PARENT}-01"})
        spans = receiver.of_trace(trace, len(STAGES) + 3)
        check_tree(spans, server_name, PARENT)
        assert _protocol_of(by_name(spans)[server_name]) == protocol

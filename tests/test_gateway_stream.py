"""gRPC DetectStream on the real stack: order, per-frame errors and budgets, back-pressure.

On the busy gateway: streams load it concurrently (see conftest)."""

from __future__ import annotations

import re
import time

import grpc
import httpx
import pytest
from conftest import TEST_MODEL, encode, photos
from tierdet.proto import detection_pb2 as pb
from tierdet.proto import detection_pb2_grpc as pb_grpc
from tierdet.serving.settings import Settings
from waiting import wait_until


@pytest.fixture(scope="module")
def stub(busy_gateway):
    with grpc.insecure_channel(busy_gateway.grpc) as channel:
        yield pb_grpc.DetectorStub(channel)


def stream_metrics(client: httpx.Client) -> tuple[float, float, float]:
    """(frames held, streams open, gRPC detect requests answered so far)."""
    text = client.get("/metrics").text

    def gauge(name: str) -> float:
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    answered = sum(float(v) for v in re.findall(
        r'^tierdet_requests_total\{[^}]*protocol="grpc"[^}]*\} (\S+)$', text, re.M))
    return gauge("tierdet_stream_frames_held"), gauge("tierdet_streams_open"), answered


def _frame(frame_id: int, image: bytes, **options) -> pb.DetectFrame:
    return pb.DetectFrame(frame_id=frame_id, request=pb.DetectRequest(image=image, **options))


def test_one_answer_per_frame_in_order_with_errors_inside_the_stream(stub):
    astronaut, coffee = encode(photos()["astronaut"]), encode(photos()["coffee"])
    frames = [
        _frame(100, astronaut, score_threshold=0.05, max_detections=10, tier="accurate"),
        _frame(101, b"not an image"),
        _frame(102, coffee, sla_ms=0.001),  # no model answers in 1 us: shed, this frame only
        _frame(103, coffee, tier="no-such-tier"),
        _frame(104, astronaut, score_threshold=2.0),
        _frame(105, coffee, tier="accurate", score_threshold=0.05),
        pb.DetectFrame(frame_id=106),  # no request at all
        _frame(107, astronaut, score_threshold=0.05, max_detections=10, tier="accurate"),
    ]
    replies = list(stub.DetectStream(iter(frames), timeout=60))

    assert [r.frame_id for r in replies] == [f.frame_id for f in frames]
    outcome = {r.frame_id: r.WhichOneof("outcome") for r in replies}
    codes = {r.frame_id: r.error.code for r in replies if r.HasField("error")}
    assert codes == {101: "unsupported_media_type", 102: "sla_unattainable",
                     103: "unknown_tier", 104: "invalid_option", 106: "empty_image"}
    assert outcome[100] == outcome[105] == outcome[107] == "response"
    shed = replies[2].error
    assert shed.retry_after_s >= 1 and "0 ms" in shed.message
    assert replies[5].response.routing.tier == "accurate"  # per-frame tier applied
    assert replies[5].response.routing.budget_ms == 3000

    # A frame gets the same answer as the unary call with the same options.
    unary = stub.Detect(pb.DetectRequest(image=astronaut, score_threshold=0.05,
                                         max_detections=10, tier="accurate"), timeout=30)
    for reply in (replies[0], replies[7]):
        got = reply.response
        assert got.model == unary.model == TEST_MODEL
        assert [(d.class_id, round(d.score, 4)) for d in got.detections] == [
            (d.class_id, round(d.score, 4)) for d in unary.detections]


def test_an_empty_stream_ends_cleanly(stub):
    assert list(stub.DetectStream(iter([]), timeout=10)) == []


def test_a_slow_consumer_holds_the_server_at_the_bound(busy_gateway, busy_client):
    """The consumer reads one answer, then stops reading. The server must stop
    at TIERDET_STREAM_MAX_INFLIGHT frames held, stop working, and stop reading,
    so the sender stalls; when reading resumes every frame is answered in order."""
    bound = Settings.from_env().stream_max_inflight
    count = 80  # well past what transport windows absorb (23 here, 40 seen once under load)
    image = encode(photos()["astronaut"], ".png")  # ~0.5 MB: transport windows fill fast
    sent: list[int] = []

    def frames():
        for i in range(count):
            sent.append(i)
            yield _frame(i, image, score_threshold=0.0, max_detections=100, tier="accurate")

    held0, open0, answered0 = stream_metrics(busy_client)
    assert held0 == 0
    # A consumer that buffers little: without BDP probing and with a 1 KiB
    # read-ahead, a few unread answers fill its receive window, so the
    # server's writes block as they would for a slow reader on a slow link.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    with grpc.insecure_channel(busy_gateway.grpc, options=options) as channel:
        call = pb_grpc.DetectorStub(channel).DetectStream(frames(), timeout=120)
        assert next(call).frame_id == 0

        samples: list[tuple[float, float, float]] = []
        deadline = time.monotonic() + 120
        # Until the server holds the bound and its work stops moving (a frame still
        # being worked on, however slowly on a busy host, is not a stop).
        while time.monotonic() < deadline:
            samples.append(stream_metrics(busy_client))
            if (len(samples) >= 6 and samples[-1][0] == bound
                    and len({s[2] for s in samples[-6:]}) == 1):
                break
            time.sleep(0.2)
        stalled_sent = len(sent)
        time.sleep(0.5)

        held, streams, answered = samples[-1]
        print(f'stalled: sent {stalled_sent}/{count}, answered {answered - answered0}')
        assert max(s[0] for s in samples) <= bound
        assert held == bound and streams == open0 + 1
        # The server stopped working (the loop waited for that) on the frames it
        # holds plus the few answers the client's window took, far from the end...
        assert bound < answered - answered0 <= count // 2
        # ...and stopped reading: the sender is stuck short of the end.
        assert len(sent) == stalled_sent < count

        rest = list(call)
    assert [r.frame_id for r in rest] == list(range(1, count))
    errors = [r.error.code for r in rest if r.HasField("error")]
    assert errors == []
    wait_until(lambda: stream_metrics(busy_client)[:2] == (0, open0),
               "the stream's held frames and the stream itself to be released")

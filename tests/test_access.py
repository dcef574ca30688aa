"""Request ids and the access log on a real gateway: ids echoed or made, on
every answer (errors too, HTTP and gRPC); one JSON line per image and per
call that reached none, for every outcome, with the key's name and never the
key or the image."""

from __future__ import annotations

import base64
import json
import logging
import re

import grpc
import httpx
import pytest
from conftest import TEST_MODEL, encode, photos
from tierdet.devstack.stack import GatewayProcess
from tierdet.proto import detection_pb2 as pb
from tierdet.proto import detection_pb2_grpc as pb_grpc
from tierdet.serving import access
from tierdet.serving.security import hash_key
from waiting import wait_until

JPEG = encode(photos()["coffee"])
OPEN, LIMITED = "open-5c1e9d0b7a", "limited-8e2f4a6c13"
GENERATED = re.compile(r"[0-9a-f]{32}")
PINNED = {"model": TEST_MODEL, "sla_ms": "60000"}  # no budget to miss: these are about lines


@pytest.fixture(scope="module")
def logged(triton, tmp_path_factory):
    work = tmp_path_factory.mktemp("access")
    keys = work / "keys.yaml"
    keys.write_text(f"keys:\n  - {{name: open, sha256: {hash_key(OPEN)}}}\n"
                    f"  - {{name: limited, sha256: {hash_key(LIMITED)}, rate_per_s: 0.001, "
                    f"burst: 1}}\n")
    log = work / "access.jsonl"
    gw = GatewayProcess.start(triton.endpoint, work / "gateway.log", api_keys_file=str(keys),
                              access_log=str(log))
    yield gw, log
    gw.stop()


def post(gw: GatewayProcess, path: str = "/v1/detect", key: str | None = OPEN,
         rid: str | None = None, headers: dict | None = None, **kwargs) -> httpx.Response:
    headers = {**({"x-api-key": key} if key else {}), **({"x-request-id": rid} if rid else {}),
               **(headers or {})}
    kwargs.setdefault("files", {"image": ("a.jpg", JPEG, "image/jpeg")})
    return httpx.post(gw.http + path, headers=headers, timeout=30, **kwargs)


def lines_of(log, rid: str, count: int = 1) -> list[dict]:
    """The lines of call ``rid``, once ``count`` are there (a call's line is
    written after its answer has gone)."""
    def lines() -> list[dict]:
        found = [line for line in map(json.loads, log.read_text().splitlines())
                 if line["request_id"] == rid]
        return found if len(found) >= count else []

    return wait_until(lines, f"{count} access log line(s) of {rid}")


def test_a_given_id_comes_back_and_a_missing_or_insane_one_is_replaced(logged):
    gw, _ = logged
    assert post(gw, rid="client-42.a:b").headers["x-request-id"] == "client-42.a:b"
    for given in (None, "x" * 129, "a b", "id\u00e9"):
        headers = {"x-api-key": OPEN, **({"x-request-id": given} if given else {})}
        r = httpx.get(gw.http + "/v1/models",
                      headers={k: v.encode() if k == "x-request-id" else v
                               for k, v in headers.items()})
        assert GENERATED.fullmatch(r.headers["x-request-id"]), given


@pytest.mark.parametrize("case", ["unauthenticated", "unreadable_image",
                                  "unsupported_media_type", "not_found"])
def test_errors_carry_the_id_too(logged, case):
    gw, _ = logged
    r = {"unauthenticated": lambda: post(gw, key=None, rid=case),
         "unreadable_image": lambda: post(gw, rid=case,
                                          files={"image": ("a.jpg", b"junk", "image/jpeg")}),
         "unsupported_media_type": lambda: post(gw, rid=case, files=None, content=b"x",
                                                headers={"content-type": "text/plain"}),
         "not_found": lambda: post(gw, "/v1/nowhere", rid=case)}[case]()
    assert r.status_code >= 400 and r.headers["x-request-id"] == case


def test_grpc_returns_the_id_in_trailing_metadata_on_answers_and_errors(logged):
    gw, log = logged
    with grpc.insecure_channel(gw.grpc) as channel:
        stub = pb_grpc.DetectorStub(channel)
        _, call = stub.Detect.with_call(pb.DetectRequest(image=JPEG, model=TEST_MODEL),
                                        metadata=[("x-api-key", OPEN),
                                                  ("x-request-id", "grpc-ok")], timeout=30)
        assert dict(call.trailing_metadata())["x-request-id"] == "grpc-ok"
        with pytest.raises(grpc.RpcError) as info:
            stub.Detect(pb.DetectRequest(image=b"junk", model=TEST_MODEL, sla_ms=60000),
                        timeout=30,
                        metadata=[("x-api-key", OPEN), ("x-request-id", "grpc-bad")])
        trailing = dict(info.value.trailing_metadata())
        assert trailing["x-request-id"] == "grpc-bad"
        assert trailing["tierdet-error-code"] == "unsupported_media_type"
        with pytest.raises(grpc.RpcError) as info:
            stub.ListModels(pb.ListModelsRequest(), timeout=30)  # no key
        assert GENERATED.fullmatch(dict(info.value.trailing_metadata())["x-request-id"])
    (ok,) = lines_of(log, "grpc-ok")
    assert ok["protocol"] == "grpc" and ok["status"] == "OK" and ok["model"] == TEST_MODEL
    (bad,) = lines_of(log, "grpc-bad")
    assert bad["code"] == "unsupported_media_type" and bad["status"] == "INVALID_ARGUMENT"


def test_an_answered_image_is_one_line_with_where_it_went(logged):
    gw, log = logged
    r = post(gw, rid="line-ok", data={"tier": "accurate"})
    assert r.status_code == 200
    (line,) = lines_of(log, "line-ok")
    assert line["code"] == "ok" and line["status"] == 200 and line["key"] == "open"
    assert line["method"] == "POST /v1/detect" and line["tier"] == "accurate"
    assert line["model"] == r.json()["model"] and line["endpoint"]
    assert (line["width"], line["height"]) == (r.json()["width"], r.json()["height"])
    assert line["image_bytes"] == len(JPEG) and line["latency_ms"] > 0
    assert line["budget_ms"] == r.json()["routing"]["budget_ms"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])


@pytest.mark.parametrize(("rid", "sent", "code", "status"), [
    ("shed", {"params": {"sla_ms": "0.001"}}, "sla_unattainable", 503),
    ("bad", {"files": {"image": ("a.jpg", JPEG[:1000], "image/jpeg")},
             "data": PINNED}, "unreadable_image", 400),
    ("nokey", {"key": None}, "unauthenticated", 401),
    ("badjson", {"files": None, "content": b"{", "headers": {"content-type":
                                                             "application/json"}},
     "invalid_json", 400),
])
def test_every_outcome_is_a_line_with_its_code(logged, rid, sent, code, status):
    gw, log = logged
    sent = dict(sent)
    key = sent.pop("key", OPEN)
    extra = sent.pop("headers", {})
    r = httpx.post(gw.http + "/v1/detect", timeout=30, headers={
        **({"x-api-key": key} if key else {}), "x-request-id": rid, **extra},
        **({"files": {"image": ("a.jpg", JPEG, "image/jpeg")}} | sent))
    assert r.status_code == status
    (line,) = lines_of(log, rid)
    assert (line["code"], line["status"]) == (code, status)


def test_a_rate_limited_key_is_logged_by_name(logged):
    gw, log = logged
    codes = [post(gw, key=LIMITED, rid=f"rate-{i}", data=PINNED).status_code
             for i in range(2)]
    assert codes == [200, 429]
    (line,) = lines_of(log, "rate-1")
    assert line["code"] == "rate_limited" and line["key"] == "limited"


def test_a_batch_is_a_line_per_image_with_its_index(logged):
    gw, log = logged
    good = base64.b64encode(JPEG).decode()
    r = post(gw, "/v1/detect/batch", rid="batch", files=None,
             json={"images": [good, "!!not base64!!", good], "model": TEST_MODEL,
                   "sla_ms": 60000})
    assert r.status_code == 200
    lines = sorted(lines_of(log, "batch", 3), key=lambda x: x["item"])
    assert [(x["item"], x["code"]) for x in lines] == [
        (0, "ok"), (1, "invalid_base64"), (2, "ok")]


def test_a_stream_is_a_line_per_frame_with_its_id(logged):
    gw, log = logged
    # Pinned, with a budget no answer misses: the point is the lines, not routing.
    pinned = {"model": TEST_MODEL, "sla_ms": 60000}
    frames = [pb.DetectFrame(frame_id=7, request=pb.DetectRequest(image=JPEG, **pinned)),
              pb.DetectFrame(frame_id=8, request=pb.DetectRequest(image=b"junk", **pinned)),
              pb.DetectFrame(frame_id=9, request=pb.DetectRequest(image=JPEG, **pinned,
                                                                  score_threshold=2.0))]
    with grpc.insecure_channel(gw.grpc) as channel:
        replies = list(pb_grpc.DetectorStub(channel).DetectStream(
            iter(frames), timeout=60, metadata=[("x-api-key", OPEN), ("x-request-id", "stream")]))
    assert len(replies) == 3
    lines = sorted(lines_of(log, "stream", 3), key=lambda x: x["item"])
    assert [(x["item"], x["code"]) for x in lines] == [
        (7, "ok"), (8, "unsupported_media_type"), (9, "invalid_option")]


def test_the_log_holds_no_key_and_no_image(logged):
    gw, log = logged
    post(gw, rid="secret-check")
    text = log.read_text()
    assert OPEN not in text and LIMITED not in text
    assert base64.b64encode(JPEG[:48]).decode() not in text
    assert all(len(line) < 1000 for line in text.splitlines())


def test_log_lines_written_during_a_call_name_its_id(caplog):
    factory = logging.getLogRecordFactory()
    access.tag_log_records()
    try:
        with caplog.at_level(logging.INFO):
            with access.call("abc-123", "http", "POST /v1/detect"):
                logging.getLogger("tierdet.test").info("inside")
            logging.getLogger("tierdet.test").info("outside")
    finally:
        logging.setLogRecordFactory(factory)
    assert [r.getMessage() for r in caplog.records] == ["inside [request abc-123]", "outside"]

"""Issue 27's attacks on a real gateway and Triton, each answered as designed while
the gateway keeps serving: grants that hold whatever a request names, rates in
images, no slot held without work, metric labels from validated values only,
details for the admin only, safe headers, failed keys throttled per address,
and Triton's control plane closed to everyone but the gateway."""

from __future__ import annotations

import base64
import json
import socket
import threading

import grpc
import httpx
import pytest
from conftest import TEST_MODEL, encode, photos
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tierdet.devstack.stack import GatewayProcess
from tierdet.proto import detection_pb2 as pb
from tierdet.proto import detection_pb2_grpc as pb_grpc
from tierdet.serving.security import hash_key
from tierdet.serving.triton import API_KEY_HEADER, GRPC_KEY_HEADER

JPEG = encode(photos()["coffee"])
RT, OPEN, BATCH, STREAM = "rt-5e1f0c9a", "open-a74b2d10", "batch-0c3e9f71", "stream-9d2a41c6"
ADMIN = "admin-3b8e6f2d0a"
# A realtime key asking, in every way the API offers, for an answer outside its tier.
ESCAPES: list[dict[str, str]] = [{}, {"model": TEST_MODEL}, {"sla_ms": "600000"},
                                 {"tier": "balanced"}, {"classes": "person"}]
DENIED = {"forbidden", "model_not_ready"}  # its tier's model is not served here


@pytest.fixture(scope="module")
def hardened(triton, tmp_path_factory):
    work = tmp_path_factory.mktemp("hardened")
    (work / "tiers.yaml").write_text(
        "default: balanced\ntiers:\n"
        "  realtime: {budget_ms: 150, models: [damoyolo-ns], priority: 1}\n"
        f"  balanced: {{budget_ms: 60000, models: [{TEST_MODEL}], degrade: true}}\n")
    (work / "keys.yaml").write_text(
        "keys:\n"
        f"  - {{name: rt, sha256: {hash_key(RT)}, tiers: [realtime]}}\n"
        f"  - {{name: open, sha256: {hash_key(OPEN)}}}\n"
        f"  - {{name: batch, sha256: {hash_key(BATCH)}, rate_per_s: 0.001, burst: 3}}\n"
        f"  - {{name: stream, sha256: {hash_key(STREAM)}, rate_per_s: 0.001, burst: 3}}\n")
    gw = GatewayProcess.start(
        triton.endpoint, work / "gateway.log", api_keys_file=str(work / "keys.yaml"),
        tiers_file=str(work / "tiers.yaml"), admin_key_sha256=hash_key(ADMIN),
        header_timeout_s="1", body_timeout_s="2", stream_idle_s="1", max_concurrency="3",
        failed_key_limit="0")
    yield gw
    gw.stop()


def _post(gw, key: str, path: str = "/v1/detect", headers: dict[str, str] | None = None,
          **kwargs) -> httpx.Response:
    return httpx.post(gw.http + path, headers={"x-api-key": key, **(headers or {})},
                      timeout=60, **kwargs)


def _serving(gw) -> bool:
    return (httpx.get(gw.http + "/healthz", timeout=10).status_code == 200
            and _post(gw, OPEN, files={"image": ("a.jpg", JPEG)}).status_code == 200)


# -- grants ------------------------------------------------------------------------


def test_a_realtime_key_gets_no_answer_outside_its_tier_over_http(hardened):
    for fields in ESCAPES:
        r = _post(hardened, RT, files={"image": ("a.jpg", JPEG)}, data=fields)
        assert r.status_code in (403, 503), (fields, r.text)
        assert r.json()["error"]["code"] in DENIED, fields
        batch = _post(hardened, RT, "/v1/detect/batch", data=fields,
                      files=[("images", ("a.jpg", JPEG)), ("images", ("b.jpg", JPEG))])
        if batch.status_code == 200:
            assert all(item["error"]["code"] in DENIED for item in batch.json()["results"])
        else:
            assert batch.json()["error"]["code"] == "forbidden", fields
    # The same request with an unconfined key is answered, by the balanced tier.
    r = _post(hardened, OPEN, files={"image": ("a.jpg", JPEG)})
    assert r.status_code == 200 and r.json()["routing"]["tier"] == "balanced"


def _message(fields: dict[str, str]) -> pb.DetectRequest:
    options = {k: int(v) if k == "sla_ms" else v for k, v in fields.items()}
    if "classes" in options:
        options["classes"] = [options["classes"]]
    return pb.DetectRequest(image=JPEG, **options)


def test_a_realtime_key_gets_no_answer_outside_its_tier_over_grpc(hardened):
    metadata = [("x-api-key", RT)]
    with grpc.insecure_channel(hardened.grpc) as channel:
        stub = pb_grpc.DetectorStub(channel)
        for fields in ESCAPES:
            with pytest.raises(grpc.RpcError) as info:
                stub.Detect(_message(fields), timeout=60, metadata=metadata)
            assert dict(info.value.trailing_metadata())["tierdet-error-code"] in DENIED
        frames = [pb.DetectFrame(frame_id=i, request=_message(f)) for i, f in enumerate(ESCAPES)]
        results = list(stub.DetectStream(iter(frames), timeout=60, metadata=metadata))
        assert len(results) == len(ESCAPES)
        assert all(r.HasField("error") and r.error.code in DENIED for r in results)


# -- rates in images -----------------------------------------------------------------


def test_every_batch_image_takes_a_token(hardened):
    r = _post(hardened, BATCH, "/v1/detect/batch",
              files=[("images", (f"{i}.jpg", JPEG)) for i in range(5)])
    assert r.status_code == 200
    codes = [item["error"]["code"] if item["error"] else "ok" for item in r.json()["results"]]
    assert sorted(codes) == ["ok"] * 3 + ["rate_limited"] * 2  # a burst of 3


def test_every_stream_frame_takes_a_token(hardened):
    with grpc.insecure_channel(hardened.grpc) as channel:
        frames = [pb.DetectFrame(frame_id=i, request=pb.DetectRequest(image=JPEG))
                  for i in range(5)]
        results = list(pb_grpc.DetectorStub(channel).DetectStream(
            iter(frames), timeout=60, metadata=[("x-api-key", STREAM)]))
    codes = [r.error.code if r.HasField("error") else "ok" for r in results]
    assert sorted(codes) == ["ok"] * 3 + ["rate_limited"] * 2


# -- nobody holds a slot without working ----------------------------------------------


def _connect(gw) -> socket.socket:
    host, port = gw.http.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)  # a deadline, not a wait
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    reply = b""
    while chunk := sock.recv(4096):
        reply += chunk
    return reply


def test_a_request_head_that_never_ends_is_cut(hardened):
    idle, trickle = _connect(hardened), _connect(hardened)
    trickle.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nX-Api-Key: ")
    assert _read_until_closed(idle) == b""  # closed by the server, nothing said
    assert _read_until_closed(trickle) == b""
    assert _serving(hardened)


def test_a_body_that_trickles_is_answered_408_and_frees_its_slot(hardened):
    socks = []
    for _ in range(3):  # every slot of TIERDET_MAX_CONCURRENCY=3
        sock = _connect(hardened)
        sock.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     b"X-Api-Key: " + OPEN.encode() + b"\r\nContent-Length: 100000\r\n\r\n"
                     + JPEG[:100])
        socks.append(sock)
    for sock in socks:
        reply = _read_until_closed(sock)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b'"request_timeout"' in reply
    assert _serving(hardened)


def test_an_idle_stream_is_ended(hardened):
    sent = threading.Event()
    release = threading.Event()

    def frames():
        yield pb.DetectFrame(frame_id=1, request=pb.DetectRequest(image=JPEG))
        sent.set()
        release.wait(60)  # then nothing: the gateway must not wait for it forever

    with grpc.insecure_channel(hardened.grpc) as channel:
        call = pb_grpc.DetectorStub(channel).DetectStream(
            frames(), timeout=60, metadata=[("x-api-key", OPEN)])
        try:
            first = next(call)
            with pytest.raises(grpc.RpcError) as info:
                next(call)
        finally:
            release.set()
    assert first.frame_id == 1 and not first.HasField("error")
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert dict(info.value.trailing_metadata())["tierdet-error-code"] == "request_timeout"


def test_keyless_health_watches_take_no_detect_slot(hardened):
    with grpc.insecure_channel(hardened.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watches = [health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
                   for _ in range(6)]  # twice TIERDET_MAX_CONCURRENCY
        try:
            for watch in watches:  # each is open: it has sent its first status
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            reply = pb_grpc.DetectorStub(channel).Detect(
                pb.DetectRequest(image=JPEG), timeout=60, metadata=[("x-api-key", OPEN)])
            assert reply.model == TEST_MODEL
        finally:
            for watch in watches:
                watch.cancel()


# -- labels, details, headers, bodies -----------------------------------------------------


def test_invented_tiers_add_no_metric_series(hardened):
    for n in range(20):
        r = _post(hardened, OPEN, files={"image": ("a.jpg", JPEG)}, data={"tier": f"attacker-{n}"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_tier"
    text = httpx.get(hardened.http + "/metrics", timeout=10).text
    assert "attacker" not in text and 'tier="invalid"' in text


def test_triton_addresses_and_server_paths_are_for_the_admin_only(hardened, triton):
    address = triton.grpc_url
    public = httpx.get(hardened.http + "/metrics", timeout=10).text
    admin = httpx.get(hardened.http + "/metrics", headers={"x-admin-key": ADMIN}, timeout=10).text
    wrong = httpx.get(hardened.http + "/metrics", headers={"x-admin-key": OPEN}, timeout=10).text
    assert address in admin and f'endpoint="{address}"' in admin
    assert address not in public and address not in wrong
    assert 'tierdet_triton_endpoint_up{endpoint="triton-' in public  # a stable alias
    models = httpx.get(hardened.http + "/v1/models", headers={"x-api-key": OPEN}, timeout=10)
    for info in models.json()["models"]:
        assert "/" not in info["weights"] and "/" not in info["reason"]


def test_api_answers_carry_safe_headers_and_no_banner(hardened):
    answers = [httpx.get(hardened.http + "/v1/models", headers={"x-api-key": OPEN}),
               httpx.get(hardened.http + "/v1/models"),  # 401
               httpx.get(hardened.http + "/nowhere"),  # 404
               httpx.get(hardened.http + "/healthz")]
    for r in answers:
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-store"
        assert "server" not in r.headers
    assert [r.status_code for r in answers] == [200, 401, 404, 200]


def test_the_interactive_docs_are_off_and_the_openapi_document_stays(hardened):
    assert httpx.get(hardened.http + "/docs").status_code == 404
    assert httpx.get(hardened.http + "/redoc").status_code == 404
    assert httpx.get(hardened.http + "/openapi.json").json()["info"]["title"] == "tierdet"


def test_deep_json_is_a_400_without_a_traceback(hardened):
    for depth in (1_000, 100_000):
        body = b'{"image": ' + b"[" * depth + b"]" * depth + b"}"
        r = _post(hardened, OPEN, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", depth
    r = _post(hardened, OPEN, json={"image": base64.b64encode(JPEG).decode()})
    assert r.status_code == 200
    log = hardened.log.read_text()
    assert "RecursionError" not in log and "Traceback" not in log


def test_failed_keys_are_throttled_per_address(triton, tmp_path):
    (tmp_path / "keys.yaml").write_text(f"keys:\n  - {{name: open, sha256: {hash_key(OPEN)}}}\n")
    gw = GatewayProcess.start(triton.endpoint, tmp_path / "gateway.log",
                              api_keys_file=str(tmp_path / "keys.yaml"), failed_key_limit="3")
    try:
        codes = [_post(gw, f"guess-{n}", files={"image": ("a.jpg", JPEG)}).status_code
                 for n in range(4)]
        assert codes == [401, 401, 401, 429]
        r = _post(gw, OPEN, files={"image": ("a.jpg", JPEG)})  # the right key, same address
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "rate_limited"
        with grpc.insecure_channel(gw.grpc) as channel, \
                pytest.raises(grpc.RpcError) as info:
            pb_grpc.DetectorStub(channel).Detect(
                pb.DetectRequest(image=JPEG), timeout=60, metadata=[("x-api-key", OPEN)])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # one address, one count
        assert dict(info.value.trailing_metadata())["tierdet-error-code"] == "rate_limited"
    finally:
        gw.stop()


# -- Triton's control plane ------------------------------------------------------------


def test_tritons_control_plane_refuses_calls_without_the_key(triton, gateway):
    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException

    key = triton.server.api_key
    assert key
    for method, path in (("POST", f"/v2/repository/models/{TEST_MODEL}/unload"),
                         ("POST", f"/v2/repository/models/{TEST_MODEL}/load"),
                         ("POST", "/v2/repository/index"),
                         ("GET", f"/v2/models/{TEST_MODEL}/stats"),
                         ("GET", "/v2/systemsharedmemory/status")):
        r = httpx.request(method, triton.http_url + path, timeout=10)
        assert r.status_code == 403, (path, r.status_code)
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    try:
        for call in (lambda h: client.unload_model(TEST_MODEL, headers=h),
                     lambda h: client.get_inference_statistics(TEST_MODEL, headers=h),
                     lambda h: client.get_system_shared_memory_status(headers=h)):
            with pytest.raises(InferenceServerException) as info:
                call(None)
            assert "restricted" in (info.value.message() or "")
        # With the key (what the gateway sends) the same read calls are answered.
        stats = client.get_inference_statistics(TEST_MODEL, headers={GRPC_KEY_HEADER: key},
                                                as_json=True)
        assert stats["model_stats"][0]["name"] == TEST_MODEL
    finally:
        client.close()
    r = httpx.post(triton.http_url + "/v2/repository/index", timeout=10,
                   headers={API_KEY_HEADER: key})
    assert r.status_code == 200
    assert triton.server.model_ready(TEST_MODEL)  # nothing was unloaded


def test_the_gateway_still_uses_tritons_restricted_apis(triton, gateway):
    # Readiness reads the repository index, detection stages pixels in shared memory,
    # and the batch-size metrics come from the statistics API: all restricted.
    assert httpx.get(gateway.http + "/readyz", timeout=10).status_code == 200
    r = httpx.post(gateway.http + "/v1/detect", files={"image": ("a.jpg", JPEG)}, timeout=60)
    assert r.status_code == 200
    status = httpx.get(triton.http_url + "/v2/systemsharedmemory/status", timeout=10,
                       headers={API_KEY_HEADER: triton.server.api_key})
    assert status.status_code == 200 and json.loads(status.text), status.text
    models = httpx.get(gateway.http + "/v1/models", timeout=10).json()["models"]
    assert {m["name"]: m["ready"] for m in models}[TEST_MODEL]


def test_a_gateway_with_a_wrong_triton_key_says_so(triton, caplog):
    import asyncio

    from tierdet.serving.triton import TritonClient
    from tritonclient.utils import InferenceServerException

    async def read(key: str | None) -> None:
        client = TritonClient(triton.grpc_url, shared_memory=False, api_key=key)
        try:
            for _ in range(2):  # said once, however often it is refused
                with pytest.raises(InferenceServerException):
                    await client.repository_models()
        finally:
            await client.close()

    for key, why in (("wrong-key", "is wrong"), (None, "is not set")):
        caplog.clear()
        asyncio.run(read(key))
        said = [r.getMessage() for r in caplog.records if "restricted APIs" in r.getMessage()]
        assert len(said) == 1 and why in said[0], said

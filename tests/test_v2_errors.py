"""Every refusal on the Open Inference Protocol: the v1 bad-input corpus's v2
twin (tests/corpus.py's BAD_REQUESTS, case by case), the protocol's
own bad inputs, and each error class (auth, rate, shed), through tritonclient
over REST and gRPC: the protocol's error status and body, tierdet's stable
code leading the message, and the same gRPC status as Detector."""

from __future__ import annotations

import json

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from conftest import TEST_MODEL, encode, photos
from corpus import BAD_REQUESTS, JPEG, png_header_only
from tierdet.contract.errors import ErrorCode
from tierdet.devstack.stack import GatewayProcess
from tierdet.serving.security import hash_key
from tritonclient.utils import InferenceServerException

OPEN, BOB, SLOW = "open-5c1d9e0a7b", "bob-24d0c8e6f1", "slow-93be4a01cc"
SLOW_OK = {"sla_ms": 60000}


def _address(url: str) -> str:
    return url.split("://", 1)[1]


def _bytes_input(module, images: list[bytes], binary: bool = True, name: str = "IMAGE"):
    tensor = module.InferInput(name, [len(images)], "BYTES")
    if module is thttp:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=binary)
    else:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def _float_input(module):
    tensor = module.InferInput("IMAGE", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3), np.float32))
    return tensor


# (case, v1 twin, model, inputs(module), parameters, outputs, code); the inputs
# are made per transport by the real client's own InferInput.
Case = tuple
CASES: list[Case] = [
    ("empty file", "empty file", TEST_MODEL, lambda m: [_bytes_input(m, [b""])], {}, None,
     "empty_image"),
    ("truncated jpeg", "truncated jpeg", TEST_MODEL,
     lambda m: [_bytes_input(m, [JPEG[:200]])], {}, None, "unreadable_image"),
    ("header then garbage", "header then garbage", TEST_MODEL,
     lambda m: [_bytes_input(m, [JPEG[:20] + b"\x00" * 5000])], {}, None, "unreadable_image"),
    ("not an image", "not an image", TEST_MODEL,
     lambda m: [_bytes_input(m, [b"hello world"])], {}, None, "unsupported_media_type"),
    ("pixels as FP32", "wrong content type", TEST_MODEL, lambda m: [_float_input(m)], {},
     None, "invalid_option"),
    ("too many bytes", "too many bytes", TEST_MODEL,
     lambda m: [_bytes_input(m, [b"\xff\xd8\xff" + b"\x00" * (9 * 1024 * 1024)])], {}, None,
     "image_too_large"),
    ("bomb header", "bomb header", TEST_MODEL,
     lambda m: [_bytes_input(m, [png_header_only(50_000, 50_000)])], {}, None,
     "too_many_pixels"),
    ("threshold above 1", "threshold above 1", TEST_MODEL,
     lambda m: [_bytes_input(m, [JPEG])], {"score_threshold": 2.0}, None, "invalid_option"),
    ("zero detections", "zero detections", TEST_MODEL,
     lambda m: [_bytes_input(m, [JPEG])], {"max_detections": 0}, None, "invalid_option"),
    ("threshold not a number", "threshold not a number", TEST_MODEL,
     lambda m: [_bytes_input(m, [JPEG])], {"score_threshold": "high"}, None, "invalid_option"),
    ("unknown model", "unknown model", "yolo-9000", lambda m: [_bytes_input(m, [JPEG])], {},
     None, "unknown_model"),
    ("path as model", "path as model", "auto", lambda m: [_bytes_input(m, [JPEG])],
     {"model": "../../etc/passwd"}, None, "invalid_option"),
    ("no IMAGE input", "no image field", TEST_MODEL,
     lambda m: [_bytes_input(m, [JPEG], name="PICTURE")], {}, None, "empty_image"),
    ("unknown parameter", "unknown json field", TEST_MODEL,
     lambda m: [_bytes_input(m, [JPEG])], {"colour": "red"}, None, "invalid_option"),
    ("tier as a parameter", "option in query and form", "auto",
     lambda m: [_bytes_input(m, [JPEG])], {"tier": "accurate"}, None, "invalid_option"),
    # The protocol's own bad inputs.
    ("unknown class", None, TEST_MODEL, lambda m: [_bytes_input(m, [JPEG])],
     {"classes": "unicorn"}, None, "invalid_option"),
    ("bad tile", None, TEST_MODEL, lambda m: [_bytes_input(m, [JPEG])], {"tile": "always"},
     None, "invalid_option"),
    ("two inputs", None, TEST_MODEL,
     lambda m: [_bytes_input(m, [JPEG]), _bytes_input(m, [JPEG])], {}, None,
     "invalid_option"),
    ("seventeen images", None, TEST_MODEL, lambda m: [_bytes_input(m, [JPEG] * 17)], {},
     None, "invalid_option"),
    ("unknown output", None, TEST_MODEL, lambda m: [_bytes_input(m, [JPEG])], {},
     ["MASKS"], "invalid_option"),
    ("unattainable budget", None, TEST_MODEL, lambda m: [_bytes_input(m, [JPEG])],
     {"sla_ms": 0.001}, None, "sla_unattainable"),
]
V1_CASES = {c[0] for c in BAD_REQUESTS}


def test_the_twins_name_real_v1_cases():
    twins = {case[1] for case in CASES if case[1] is not None}
    assert twins <= V1_CASES
    # v1 cases without a v2 twin: JSON and multipart framing a v2 client never
    # sends (the raw-body tests below cover malformed JSON).
    assert V1_CASES - twins == {"malformed json", "json array", "bad base64",
                                "option in query and json"}


def _outputs(module, names):
    return None if names is None else [module.InferRequestedOutput(n) for n in names]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rest_refusals(gateway, case):
    _, _, model, inputs, parameters, outputs, code = case
    with thttp.InferenceServerClient(_address(gateway.http), network_timeout=60) as c, \
            pytest.raises(InferenceServerException) as caught:
        c.infer(model, inputs(thttp), parameters=parameters or None,
                outputs=_outputs(thttp, outputs))
    assert caught.value.status() == str(ErrorCode(code).kind.http_status), caught.value
    assert caught.value.message().startswith(f"{code}: "), caught.value.message()
    assert "Traceback" not in caught.value.message()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_grpc_refusals(gateway, case):
    name, _, model, inputs, parameters, outputs, code = case
    with tgrpc.InferenceServerClient(gateway.grpc) as c, \
            pytest.raises(InferenceServerException) as caught:
        c.infer(model, inputs(tgrpc), parameters=parameters or None,
                outputs=_outputs(tgrpc, outputs), client_timeout=60)
    kind = ErrorCode(code).kind
    assert caught.value.status() == f"StatusCode.{kind.grpc_status}", caught.value
    if name == "too many bytes":  # gRPC's own message bound refuses it first
        return
    assert caught.value.message().startswith(f"{code}: "), caught.value.message()


def test_bad_base64_in_json(gateway):
    """The JSON form of a BYTES element is base64 text (an image is not UTF-8)."""
    with thttp.InferenceServerClient(_address(gateway.http)) as c, \
            pytest.raises(InferenceServerException) as caught:
        c.infer(TEST_MODEL, [_bytes_input(thttp, [b"@@@"], binary=False)])
    assert caught.value.status() == "400"
    assert caught.value.message().startswith("invalid_base64: ")


# Declares two images, brings one (binary_data_size says 8 bytes: one element).
HEAD = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [2],
                               "parameters": {"binary_data_size": 8}}]}).encode()


@pytest.mark.parametrize("body,headers,status,code", [
    (b"{not json", {}, 400, "invalid_json"),
    (b"[1, 2]", {}, 400, "invalid_json"),
    (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400, "invalid_json"),
    (json.dumps({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                             "data": ["x"]}], "colour": "red"}).encode(), {}, 422,
     "invalid_option"),
    (b'{"inputs": []}', {"Inference-Header-Content-Length": "999"}, 422, "invalid_option"),
    (HEAD + b"\x04\x00\x00\x00abcd", {"Inference-Header-Content-Length": str(len(HEAD))},
     422, "invalid_option"),
], ids=["malformed json", "json array", "nested too deep", "unknown field", "header past the end",
        "fewer images than the shape"])
def test_framing_no_client_would_send(client, body, headers, status, code):
    """Malformed bodies: no real client makes these, so they are written by hand."""
    r = client.post(f"/v2/models/{TEST_MODEL}/infer", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"].startswith(f"{code}: ")


def test_an_unknown_v2_route_is_the_protocols_404(client):
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"].startswith("not_found: ")


def test_still_serving_after_the_corpus(gateway):
    for case in CASES:
        with thttp.InferenceServerClient(_address(gateway.http)) as c, \
                pytest.raises(InferenceServerException):
            c.infer(case[2], case[3](thttp), parameters=case[4] or None,
                    outputs=_outputs(thttp, case[5]))
    with thttp.InferenceServerClient(_address(gateway.http), network_timeout=60) as c:
        result = c.infer(TEST_MODEL, [_bytes_input(thttp, [encode(photos()["coffee"])])],
                         parameters=SLOW_OK)
    assert result.as_numpy("DETECTIONS").shape[2] == 6


# -- keys, grants, rates, and the access log -------------------------------------


@pytest.fixture(scope="module")
def keyed(triton, tmp_path_factory):
    work = tmp_path_factory.mktemp("v2-keys")
    keys = work / "keys.yaml"
    keys.write_text(
        f"keys:\n"
        f"  - {{name: open, sha256: {hash_key(OPEN)}}}\n"
        f"  - {{name: bob, sha256: {hash_key(BOB)}, tiers: [accurate]}}\n"
        f"  - {{name: slow, sha256: {hash_key(SLOW)}, rate_per_s: 0.01, burst: 1}}\n")
    gw = GatewayProcess.start(triton.endpoint, work / "gateway.log", api_keys_file=str(keys),
                              access_log=str(work / "access.jsonl"))
    yield gw, work / "access.jsonl"
    gw.stop()


def _rest_infer(gw, model: str, key: str | None, parameters: dict = SLOW_OK):
    headers = {"authorization": f"Bearer {key}"} if key else None
    with thttp.InferenceServerClient(_address(gw.http), network_timeout=60) as c:
        return c.infer(model, [_bytes_input(thttp, [JPEG])], parameters=parameters,
                       headers=headers)


def _grpc_infer(gw, model: str, key: str | None, parameters: dict = SLOW_OK):
    headers = {"x-api-key": key} if key else None
    with tgrpc.InferenceServerClient(gw.grpc) as c:
        return c.infer(model, [_bytes_input(tgrpc, [JPEG])], parameters=parameters,
                       headers=headers, client_timeout=60)


@pytest.mark.parametrize("model,key,code", [
    (TEST_MODEL, None, "unauthenticated"), (TEST_MODEL, "guess", "unauthenticated"),
    ("auto", BOB, "forbidden"), ("realtime", BOB, "forbidden"),
])
def test_keys_and_grants(keyed, model, key, code):
    gw, _ = keyed
    kind = ErrorCode(code).kind
    for infer, status in ((_rest_infer, str(kind.http_status)),
                          (_grpc_infer, f"StatusCode.{kind.grpc_status}")):
        with pytest.raises(InferenceServerException) as caught:
            infer(gw, model, key)
        assert caught.value.status() == status
        assert caught.value.message().startswith(f"{code}: ")


def test_a_granted_key_is_answered_and_health_needs_none(keyed):
    gw, _ = keyed
    within = {"sla_ms": 3000}  # a grant caps the budget at its tier's (accurate: 3000 ms)
    assert _rest_infer(gw, "accurate", BOB, within).as_numpy("COUNTS").shape == (1,)
    assert _grpc_infer(gw, "accurate", BOB, within).as_numpy("COUNTS").shape == (1,)
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert httpx.get(gw.http + path).status_code == 200
    with thttp.InferenceServerClient(_address(gw.http)) as c, \
            pytest.raises(InferenceServerException) as caught:
        c.get_model_metadata("auto")
    assert caught.value.message().startswith("unauthenticated: ")


def test_rate_limited(keyed):
    gw, _ = keyed
    _rest_infer(gw, TEST_MODEL, SLOW)  # the bucket's one token
    with pytest.raises(InferenceServerException) as caught:
        _rest_infer(gw, TEST_MODEL, SLOW)
    assert caught.value.status() == "429"
    assert caught.value.message().startswith("rate_limited: ")
    with pytest.raises(InferenceServerException) as caught:
        _grpc_infer(gw, TEST_MODEL, SLOW)
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"


def test_the_access_log_labels_the_protocol(keyed):
    gw, log = keyed
    _rest_infer(gw, TEST_MODEL, OPEN)
    _grpc_infer(gw, TEST_MODEL, OPEN)
    with pytest.raises(InferenceServerException):
        _grpc_infer(gw, TEST_MODEL, "guess")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    ok = {(line["protocol"], line["status"]) for line in lines
          if line["key"] == "open" and line["code"] == "ok"}
    assert {("v2-http", 200), ("v2-grpc", "OK")} <= ok
    assert any(line["protocol"] == "v2-grpc" and line["code"] == "unauthenticated"
               and line["method"] == "ModelInfer" for line in lines)
    assert any(line["method"] == f"POST /v2/models/{TEST_MODEL}/infer" for line in lines)


def test_the_grpc_refusal_carries_the_code_as_detector_does(gateway):
    """tierdet-error-code in the trailing metadata (tritonclient does not show
    it, so its generated stub is called directly)."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="yolo-9000")
    request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(len(JPEG).to_bytes(4, "little") + JPEG)
    with grpc.insecure_channel(gateway.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("tierdet-error-code", "unknown_model") in caught.value.trailing_metadata()
    assert any(k == "x-request-id" for k, _ in caught.value.trailing_metadata())

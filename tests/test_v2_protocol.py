"""The Open Inference Protocol (KServe v2) on the real gateway, spoken by its own
clients: tritonclient (HTTP, gRPC, gRPC asyncio) and the kserve SDK (REST and
gRPC). No hand-written v2 request stands in for a client that exists."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
from conftest import TEST_MODEL, encode, photos
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tierdet.contract.options import OPTION_NAMES
from tritonclient.utils import InferenceServerException

PHOTO = photos()["coffee"]
JPEG = encode(PHOTO)
SLOW_OK = {"sla_ms": 60000}  # these tests are not about routing: a generous budget
OUTPUTS = ("DETECTIONS", "COUNTS", "CLASS_NAMES")


def _address(url: str) -> str:
    return url.split("://", 1)[1]


@pytest.fixture(scope="module")
def rest(gateway):
    with thttp.InferenceServerClient(_address(gateway.http), network_timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(gateway):
    with tgrpc.InferenceServerClient(gateway.grpc) as c:
        yield c


def http_image(images: list[bytes]) -> thttp.InferInput:
    tensor = thttp.InferInput("IMAGE", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))  # binary by default
    return tensor


def grpc_image(images: list[bytes], module=tgrpc) -> tgrpc.InferInput:
    tensor = module.InferInput("IMAGE", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def rows(result, index: int = 0) -> np.ndarray:
    """Image ``index``'s detections: its first COUNTS[index] rows."""
    return result.as_numpy("DETECTIONS")[index][:result.as_numpy("COUNTS")[index]]


# -- server and model metadata, readiness -------------------------------------------


def test_server_live_ready_and_metadata(rest, grpc_client):
    assert rest.is_server_live() and rest.is_server_ready()
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    meta = rest.get_server_metadata()
    assert meta["name"] == "tierdet" and "binary_tensor_data" in meta["extensions"]
    assert grpc_client.get_server_metadata(as_json=True)["name"] == "tierdet"


@pytest.mark.parametrize("name,platform", [("auto", "tierdet-routed"),
                                           ("accurate", "tierdet-routed"),
                                           (TEST_MODEL, "tierdet-pinned")])
def test_model_metadata_and_readiness(rest, grpc_client, name, platform):
    for meta in (rest.get_model_metadata(name),
                 grpc_client.get_model_metadata(name, as_json=True)):
        assert meta["name"] == name and meta["platform"] == platform
        assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [("IMAGE", "BYTES")]
        assert [t["name"] for t in meta["outputs"]] == list(OUTPUTS)
    assert rest.is_model_ready(name) and grpc_client.is_model_ready(name)
    assert rest.is_model_ready(name, "1") and grpc_client.is_model_ready(name, "1")


def test_an_unknown_model_is_not_ready_and_has_no_metadata(rest, grpc_client):
    assert not rest.is_model_ready("yolo-9000")
    with pytest.raises(InferenceServerException, match="unknown_model"):
        rest.get_model_metadata("yolo-9000")
    with pytest.raises(InferenceServerException, match="unknown_model") as caught:
        grpc_client.get_model_metadata("yolo-9000")
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="unknown_model"):
        rest.get_model_metadata(TEST_MODEL, model_version="7")


def test_reflection_and_health_list_the_service(gateway):
    with grpc.insecure_channel(gateway.grpc) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for s in answer.list_services_response.service}
        assert "inference.GRPCInferenceService" in names
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING


# -- inference: pinned, auto, a tier, a batch ---------------------------------------


def _v1(client, **options) -> dict:
    r = client.post("/v1/detect", files={"image": ("a.jpg", JPEG, "image/jpeg")},
                    data={k: str(v) for k, v in options.items()})
    assert r.status_code == 200, r.text
    return r.json()


def _same_boxes(v2_rows: np.ndarray, v1: dict) -> None:
    want = np.array([[d["x1"], d["y1"], d["x2"], d["y2"], d["score"], d["class_id"]]
                     for d in v1["detections"]], dtype=np.float32).reshape(-1, 6)
    assert v2_rows.shape == want.shape
    np.testing.assert_allclose(v2_rows, want, rtol=1e-5, atol=1e-3)


def test_pinned_model_gives_the_boxes_of_v1_detect(rest, grpc_client, client):
    options = {**SLOW_OK, "score_threshold": 0.05}
    v1 = _v1(client, model=TEST_MODEL, **options)
    assert v1["detections"]
    http = rest.infer(TEST_MODEL, [http_image([JPEG])], parameters=options)
    over_grpc = grpc_client.infer(TEST_MODEL, [grpc_image([JPEG])], parameters=options)
    for result in (http, over_grpc):
        _same_boxes(rows(result), v1)
        names = result.as_numpy("CLASS_NAMES")[0][:result.as_numpy("COUNTS")[0]]
        assert [n.decode() for n in names] == [d["class_name"] for d in v1["detections"]]
    facts = http.get_response()["parameters"]
    assert facts["model"] == TEST_MODEL and facts["tier"] == "" and not facts["degraded"]
    assert facts["actual_ms"] > 0 and facts["budget_ms"] == 60000


def test_auto_and_a_tier_are_routed(rest, grpc_client):
    auto = rest.infer("auto", [http_image([JPEG])], parameters=SLOW_OK)
    assert auto.get_response()["parameters"]["model"] == TEST_MODEL
    tier = grpc_client.infer("accurate", [grpc_image([JPEG])])
    facts = tier.get_response(as_json=True)["parameters"]
    assert facts["tier"]["string_param"] == "accurate"
    assert facts["model"]["string_param"] == TEST_MODEL
    assert tier.as_numpy("DETECTIONS").shape[2] == 6


def test_a_batch_of_three_is_answered_image_by_image(rest, grpc_client):
    images = [encode(photos()[n]) for n in ("coffee", "astronaut", "chelsea")]
    singles = [rows(rest.infer(TEST_MODEL, [http_image([i])], parameters=SLOW_OK))
               for i in images]
    for client, tensor in ((rest, http_image(images)), (grpc_client, grpc_image(images))):
        result = client.infer(TEST_MODEL, [tensor], parameters=SLOW_OK)
        assert result.as_numpy("COUNTS").shape == (3,)
        assert result.as_numpy("CLASS_NAMES").shape[0] == 3
        for i, single in enumerate(singles):
            np.testing.assert_allclose(rows(result, i), single, rtol=1e-5, atol=1e-3)
    facts = rest.infer(TEST_MODEL, [http_image(images)],
                       parameters=SLOW_OK).get_response()["parameters"]
    assert facts["model"] == ",".join([TEST_MODEL] * 3)


def test_every_option_is_a_parameter(rest, grpc_client, client):
    """The parameters are DetectOptions' (but tier and model, which the model name
    says), and each one acts as it does on /v1/detect."""
    from tierdet.frontends.v2_tensors import PARAMETERS

    assert set(PARAMETERS) == set(OPTION_NAMES) - {"tier", "model"}
    options = {"sla_ms": 60000, "score_threshold": 0.01, "max_detections": 3,
               "classes": "cup,dining table,bowl,spoon,person", "tile": "off"}
    assert set(options) == set(PARAMETERS)
    v1 = _v1(client, model=TEST_MODEL, **options)
    for result in (rest.infer(TEST_MODEL, [http_image([JPEG])], parameters=options),
                   grpc_client.infer(TEST_MODEL, [grpc_image([JPEG])], parameters=options)):
        _same_boxes(rows(result), v1)
        assert result.as_numpy("COUNTS")[0] <= 3
    tiled = rest.infer(TEST_MODEL, [http_image([encode(photos()["astronaut"])])],
                       parameters={"sla_ms": 60000, "tile": "auto"})
    assert tiled.get_response()["parameters"]["tiles"] >= 0


def test_raw_pixels_give_the_boxes_of_the_same_image_encoded(rest, grpc_client, client):
    """UINT8 [H, W, 3] against /v1/detect given the same pixels losslessly (PNG)."""
    pixels = photos()["chelsea"]
    png = encode(pixels, ".png")
    r = client.post("/v1/detect", files={"image": ("a.png", png, "image/png")},
                    data={"model": TEST_MODEL, "sla_ms": "60000", "score_threshold": "0.05"})
    assert r.status_code == 200, r.text
    options = {**SLOW_OK, "score_threshold": 0.05}
    for module, c in ((thttp, rest), (tgrpc, grpc_client)):
        tensor = module.InferInput("IMAGE", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels)
        _same_boxes(rows(c.infer(TEST_MODEL, [tensor], parameters=options)), r.json())
    two = thttp.InferInput("IMAGE", [2, *pixels.shape], "UINT8")
    two.set_data_from_numpy(np.stack([pixels, pixels]))
    result = rest.infer(TEST_MODEL, [two], parameters=options)
    np.testing.assert_allclose(rows(result, 1), rows(result, 0), rtol=1e-6)


def test_json_outputs_equal_binary_outputs(rest):
    binary = rest.infer(TEST_MODEL, [http_image([JPEG])], parameters=SLOW_OK)
    as_json = rest.infer(TEST_MODEL, [http_image([JPEG])], parameters=SLOW_OK, outputs=[
        thttp.InferRequestedOutput(name, binary_data=False) for name in OUTPUTS])
    assert "data" in as_json.get_response()["outputs"][0]
    np.testing.assert_allclose(rows(as_json), rows(binary), rtol=1e-6)
    only = rest.infer(TEST_MODEL, [http_image([JPEG])], parameters=SLOW_OK,
                      outputs=[thttp.InferRequestedOutput("COUNTS")])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["COUNTS"]


def test_the_asyncio_client_and_the_stream(gateway):
    async def run() -> None:
        async with tgrpc_aio.InferenceServerClient(gateway.grpc) as c:
            assert await c.is_model_ready("auto")
            result = await c.infer(TEST_MODEL, [grpc_image([JPEG], tgrpc_aio)],
                                   parameters=SLOW_OK)
            assert result.as_numpy("COUNTS")[0] == len(rows(result))

            async def requests():
                for model in (TEST_MODEL, "yolo-9000", TEST_MODEL):
                    yield {"model_name": model, "inputs": [grpc_image([JPEG], tgrpc_aio)],
                           "parameters": SLOW_OK}

            answers = [a async for a in c.stream_infer(requests())]
            assert [error is None for _, error in answers] == [True, False, True]
            assert "unknown_model" in str(answers[1][1])
            np.testing.assert_allclose(rows(answers[2][0]), rows(result), rtol=1e-6)

    asyncio.run(run())


def test_the_kserve_sdk_clients(gateway):
    """REST and gRPC, in a process of their own (see v2_kserve_client.py)."""
    script = Path(__file__).with_name("v2_kserve_client.py")
    done = subprocess.run([sys.executable, str(script), gateway.http, gateway.grpc,
                           TEST_MODEL], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kserve clients: ok" in done.stdout


# -- the protocol is labelled, and described --------------------------------------


def test_metrics_label_the_protocol(rest, grpc_client, client):
    rest.infer(TEST_MODEL, [http_image([JPEG])], parameters=SLOW_OK)
    grpc_client.infer(TEST_MODEL, [grpc_image([JPEG])], parameters=SLOW_OK)
    text = client.get("/metrics").text
    for protocol in ("v2-http", "v2-grpc"):
        assert (f'tierdet_requests_total{{model="{TEST_MODEL}",outcome="ok",'
                f'protocol="{protocol}",tier="none"}}') in text


def test_openapi_describes_the_v2_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{name}",
                 "/v2/models/{name}/ready", "/v2/models/{name}/infer",
                 "/v2/models/{name}/versions/{version}/infer"):
        assert path in paths, path
    infer = paths["/v2/models/{name}/infer"]["post"]
    assert {"application/json", "application/octet-stream"} <= set(
        infer["requestBody"]["content"])
    assert json.dumps(infer).count("sla_ms") >= 1


def test_the_docs_tritonclient_example_runs_as_written(gateway, tmp_path):
    """docs/api/v2.md's example in a fresh interpreter; only the address changes."""
    text = (Path(__file__).parents[1] / "docs" / "api" / "v2.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, re.S)
    assert block.count("localhost:8080") == 1
    (tmp_path / "photo.jpg").write_bytes(encode(photos()["astronaut"]))
    run = subprocess.run([sys.executable, "-c",
                          block.replace("localhost:8080", _address(gateway.http))],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "True tierdet-routed"
    assert f"'model': '{TEST_MODEL}'" in lines[-1]
    assert re.fullmatch(r".+ \d\.\d\d at \(\d+, \d+\)-\(\d+, \d+\)", lines[1]), lines

"""The kserve SDK's REST and gRPC clients against a gateway: run as its own
process by tests/test_v2_protocol.py, because kserve's copy of
grpc_predict_v2.proto and tritonclient's grpc_service.proto define the same
``inference.*`` messages and cannot share one process's descriptor pool.

Usage: python v2_kserve_client.py HTTP_URL GRPC_ADDRESS MODEL; exits 0 when
every check holds (an AssertionError, with its traceback, otherwise).
"""

from __future__ import annotations

import asyncio
import sys

import cv2
import grpc
import httpx
import numpy as np
import skimage.data
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

HTTP, GRPC, MODEL = sys.argv[1:4]
JPEG = cv2.imencode(".jpg", skimage.data.coffee()[..., ::-1])[1].tobytes()
OPTIONS = {"sla_ms": 60000, "max_detections": 2}


def request(model: str, images: int = 1) -> InferRequest:
    tensor = InferInput(name="IMAGE", shape=[images], datatype="BYTES")
    tensor.set_data_from_numpy(np.array([JPEG] * images, dtype=np.object_), binary_data=True)
    return InferRequest(model_name=model, infer_inputs=[tensor], parameters=OPTIONS)


def counts(answer) -> np.ndarray:
    return {o.name: o for o in answer.outputs}["COUNTS"].as_numpy()


async def rest_checks() -> None:
    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    try:
        assert await rest.is_server_live(HTTP)
        assert await rest.is_server_ready(HTTP)
        assert await rest.is_model_ready(HTTP, "auto")
        assert not await rest.is_model_ready(HTTP, "yolo-9000")
        answer = await rest.infer(HTTP, request(MODEL), model_name=MODEL)
        assert 1 <= counts(answer)[0] <= 2, counts(answer)
        assert answer.parameters["model"] == MODEL, answer.parameters
        batch = await rest.infer(HTTP, request("accurate", 3), model_name="accurate")
        assert counts(batch).tolist() == [counts(answer)[0]] * 3
        try:
            await rest.infer(HTTP, request("yolo-9000"), model_name="yolo-9000")
        except httpx.HTTPStatusError as exc:
            assert exc.response.status_code == 422 and "unknown_model" in str(exc), exc
        else:
            raise AssertionError("an unknown model was answered")
    finally:
        await rest.close()


async def grpc_checks() -> None:
    async with InferenceGRPCClient(GRPC, timeout=60) as client:
        assert await client.is_server_live() and await client.is_server_ready()
        assert await client.is_model_ready("accurate")
        answer = await client.infer(request("auto"))
        # Over gRPC the SDK hands back the InferParameter messages themselves.
        assert answer.parameters["model"].string_param == MODEL, answer.parameters
        assert answer.parameters["tier"].string_param == "balanced", answer.parameters
        assert 1 <= counts(answer)[0] <= 2
        boxes = {o.name: o for o in answer.outputs}["DETECTIONS"].as_numpy()
        assert boxes.shape[0] == 1 and boxes.shape[2] == 6
        try:
            await client.infer(request("yolo-9000"))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
            assert exc.details().startswith("unknown_model:"), exc.details()
        else:
            raise AssertionError("an unknown model was answered")


asyncio.run(rest_checks())
asyncio.run(grpc_checks())
print("kserve clients: ok")

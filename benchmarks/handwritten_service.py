"""The detection service a user writes by hand: FastAPI + ONNX Runtime in one process.

What tierdet is measured against in benchmarks/scale_up.py: the same ONNX
file tierdet serves, decoded with OpenCV, letterboxed, run in FastAPI's thread
pool. Written as a user would (about 40 lines), without tierdet's code.

    TIERDET_BENCH_ONNX=model.onnx uvicorn handwritten_service:app --port 9000
"""

import os
from typing import Annotated

import cv2
import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, HTTPException, UploadFile
from starlette.concurrency import run_in_threadpool

SIZE = 512
session = ort.InferenceSession(os.environ["TIERDET_BENCH_ONNX"],
                               providers=["CPUExecutionProvider"])
INPUT = session.get_inputs()[0].name
app = FastAPI()


def detect_sync(data: bytes) -> list[dict]:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise HTTPException(400, "not an image")
    h, w = image.shape[:2]
    scale = SIZE / max(h, w)
    resized = cv2.resize(image, (round(w * scale), round(h * scale)))
    canvas = np.zeros((SIZE, SIZE, 3), np.uint8)
    canvas[:resized.shape[0], :resized.shape[1]] = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)
    rows = session.run(None, {INPUT: canvas[None]})[0][0]
    return [{"box": [float(v) / scale for v in row[:4]], "score": float(row[4]),
             "class": int(row[5])} for row in rows if row[4] >= 0.25]


@app.post("/detect")
async def detect(image: Annotated[UploadFile, File()]) -> dict:
    data = await image.read()
    return {"detections": await run_in_threadpool(detect_sync, data)}

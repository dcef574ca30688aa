"""Triton python-backend model that answers at once: the "instant" model.

benchmarks/scale_up.py serves it under a zoo model's name and config, in
place of the ONNX runner, so what is measured through the gateway is
everything but the network: HTTP/gRPC, decode, resize, routing, the Triton
call, mapping and JSON. Each image gets the same few rows, so the gateway's
box mapping and rendering still run.

With a ``device.json`` beside this file (``{"base_ms": B, "per_image_ms": P}``)
each execution instead takes B + P x (images in the batch) of wall time
without using the CPU: an emulated accelerator with a known service time,
one batch at a time (benchmarks/scale_out.py, where two of them are two
independent devices on a 2-core machine). The file is read again whenever it
changes, so a run can change the device's speed half-way (a GPU clocking
down, a neighbour taking the device).
"""

import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils

ROWS = 10  # detections per image, as a real photograph might give


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        k = config["output"][0]["dims"][0]
        self.rows = np.zeros((1, k, 6), np.float32)
        for i in range(ROWS):
            self.rows[0, i] = (10 + 20 * i, 10, 60 + 20 * i, 90, 0.9 - 0.05 * i, i % 10)
        self.device_path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                        "device.json")
        self.device = None
        self.device_stamp = None
        self._read_device()

    def _read_device(self):
        try:
            stamp = os.stat(self.device_path).st_mtime_ns
        except FileNotFoundError:
            return
        if stamp != self.device_stamp:
            with open(self.device_path) as f:
                self.device = json.load(f)
            self.device_stamp = stamp

    def execute(self, requests):
        responses = []
        images = 0
        for request in requests:
            batch = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().shape[0]
            images += batch
            out = np.repeat(self.rows, batch, axis=0)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(self.output_name, out)]))
        self._read_device()
        if self.device is not None:
            time.sleep((self.device["base_ms"] + self.device["per_image_ms"] * images) / 1e3)
        return responses

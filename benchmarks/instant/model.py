"""Triton python-backend model that answers at once: the "instant" model.

benchmarks/scale_up.py serves it under a zoo model's name and config, in
place of the ONNX runner, so what is measured through the gateway is
everything but the network: HTTP/gRPC, decode, resize, routing, the Triton
call, mapping and JSON. Each image gets the same few rows, so the gateway's
box mapping and rendering still run.
"""

import json

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

    def execute(self, requests):
        responses = []
        for request in requests:
            batch = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().shape[0]
            out = np.repeat(self.rows, batch, axis=0)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(self.output_name, out)]))
        return responses

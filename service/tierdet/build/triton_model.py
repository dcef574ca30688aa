"""Triton python-backend model: runs one exported ONNX file with ONNX Runtime.

Used by the ``cpu-local`` target (the pip-installed tritonserver has the
python backend but no onnxruntime backend). Copied into each model's
version folder as ``model.py`` when a repository is assembled. It runs
inside Triton's python stub, so it imports only numpy and onnxruntime.
"""

import json
import os
import time

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        # Tensor names come from the config tierdet rendered (tierdet.registry.tensors).
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"],
                            params.get("onnx_file", "model.onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        # Waiting threads sleep instead of spinning (ONNX Runtime's default): the
        # local stack serves several models on the CPU the gateway decodes on, and
        # an idle model's spinning threads took the core the next request needed.
        # One model alone runs ~18% slower this way; routed under load, fewer
        # answers come late (docs/performance.md, "Spinning threads").
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        # Fault injection for tests only (a slow model): never set in production.
        self.delay_s = float(params.get("test_delay_ms", "0")) / 1e3

    def execute(self, requests):
        # Triton's dynamic batcher hands over several requests at once: run
        # them as one ONNX batch and split the result back per request.
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy()
                  for r in requests]
        if self.delay_s:
            time.sleep(self.delay_s)
        try:
            out = self.session.run([self.output_name],
                                   {self.input_name: np.concatenate(arrays)})[0]
        except Exception as exc:  # one bad batch must not kill the model
            error = pb_utils.TritonError(f"onnxruntime failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for array in arrays:
            stop = start + array.shape[0]
            tensor = pb_utils.Tensor(self.output_name, np.ascontiguousarray(out[start:stop]))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            start = stop
        return responses

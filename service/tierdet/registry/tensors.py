"""Names that tie the exported graph, Triton's configs and the gateway together.

The exporter writes them into every ONNX file, ``tierdet.build.repository``
into every config.pbtxt; the python-backend model and the engine builder read
them back from the config they are given, so no other file spells them.
"""

from __future__ import annotations

INPUT_NAME = "images"  # uint8 [B, S, S, 3] RGB pixels
OUTPUT_NAME = "detections"  # float32 [B, K, 6]: x1, y1, x2, y2, score, class slot
# Outputs of a raw export (network only, no NMS): for parity tests and debugging.
RAW_OUTPUT_NAMES = ("boxes", "scores")
# Config parameters carrying a build's provenance (weights, digests, measured AP),
# and the ONNX metadata key naming the spec a file was built from.
PROVENANCE_PREFIX = "tierdet."
MODEL_METADATA_KEY = "tierdet.model"

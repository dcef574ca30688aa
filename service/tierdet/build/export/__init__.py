"""Model export (build-time only: needs the ``build`` extra with torch).

This file imports nothing: ``tierdet.build.models`` reads ``EXPORT_FORMAT``
without torch.
"""

# The version of the graphs this exporter writes, recorded in every build
# record (``HOME/onnx/<model>.json``, key ``export_format``). Bump it whenever
# the exported graph changes: a build recorded under another format (or none)
# is exported again by ``ensure_built`` and the model builder, and the engine
# cache retries TensorRT builds that failed under an older one.
#   1: the first graphs (no version recorded).
#   2: the TensorRT-clean graphs: the uint8 input cast first, NMS with an
#      explicit score threshold, per-class NMS without coordinate offsets,
#      no ScatterND ``reduction`` attribute, candidates clipped to the input
#      frame (tierdet.build.trt_compat checks every rule).
#   3: a single-label card (``multi_label: false``) ranks each box by its best
#      class (N candidates) instead of every (box, class) pair with the
#      others zeroed (N x C); a card's front skips an identity normalisation;
#      the zoo's top-k of (anchor, class) pairs runs in two steps (the same
#      pairs, a fraction of the work).
EXPORT_FORMAT = 3

"""Turning specs and weights into what Triton serves.

``weights`` fetches (sha256-verified), reads or makes weights; ``export``
(torch, the ``build`` extra) writes one ONNX graph per model with
normalisation, decode, top-k and NMS inside; ``damoyolo`` is tierdet's own
DAMO-YOLO network; ``models`` runs the build and keeps its results under
``TIERDET_HOME``; ``repository`` renders Triton's configs per target;
``engines`` builds TensorRT plans on the GPU host (standalone: stdlib only);
``triton_model`` is the python-backend model the local Triton runs.

May import: ``tierdet.registry`` (and torch, onnx, effdet inside ``export``
and ``damoyolo`` only). Never the gateway's packages.
"""

"""Making data, training small models and measuring accuracy (COCO AP).

``datasets`` reads COCO splits and draws the synthetic shapes set; ``train``
trains the smallest model of each family on the CPU; ``evaluation`` measures
AP through a running gateway and on the bare ONNX file; ``stack_eval`` does
both against a stack it starts itself.

May import: ``tierdet.registry``, ``tierdet.build``, ``tierdet.devstack`` and
``tierdet.serving.imaging`` (the same preprocessing as the gateway),
``tierdet.serving.triton`` and ``serving.backend`` (Triton's queue, read as the
gateway reads it), ``serving.apscore`` (COCO AP: the gateway's shadow scoring
measures with the same code); numpy, OpenCV, httpx, ONNX Runtime, pycocotools, torch and
effdet.
"""

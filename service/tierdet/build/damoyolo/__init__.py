"""DAMO-YOLO (tinyvision/damo-yolo) re-implemented for inference and export."""

from .config import BackboneConfig, DamoYoloConfig, HeadConfig, NasStage, NeckConfig
from .head import num_anchors
from .model import (
    OFFICIAL_NAMES,
    VARIANTS,
    DamoYolo,
    build_damoyolo,
    count_parameters,
    load_official_state_dict,
    variant_for_official_name,
)

__all__ = [
    "OFFICIAL_NAMES",
    "VARIANTS",
    "BackboneConfig",
    "DamoYolo",
    "DamoYoloConfig",
    "HeadConfig",
    "NasStage",
    "NeckConfig",
    "build_damoyolo",
    "count_parameters",
    "load_official_state_dict",
    "num_anchors",
    "variant_for_official_name",
]

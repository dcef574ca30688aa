"""The Open Inference Protocol's (KServe v2) tensors and parameters <-> the contract.

Transport-free and serving-free: the REST (``v2_http``) and gRPC (``v2_grpc``)
front ends both read requests into ``V2Request`` and write ``V2Output`` s with
this module, so a tensor or a parameter cannot be read two ways.

- input ``IMAGE``: BYTES, shape ``[N]`` (or ``[N, 1]``): N encoded images; or
  UINT8 ``[H, W, 3]`` (or ``[N, H, W, 3]``): raw RGB pixels;
- outputs ``DETECTIONS`` FP32 ``[N, K, 6]`` (x1, y1, x2, y2, score, class id;
  K the most detections of any image, shorter rows padded with zeros and
  class id -1), ``COUNTS`` INT32 ``[N]``, ``CLASS_NAMES`` BYTES ``[N, K]``;
- request parameters: the options of ``DetectOptions`` but the two the model
  name already says (``tier``, ``model``), derived from it;
- response parameters: the routing facts of each image.

Binary forms are the protocol's: little-endian, row-major; a BYTES element is
its 4-byte little-endian length and its bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from tierdet.contract.errors import ApiError, ErrorCode, first_problem
from tierdet.contract.images import Pixels
from tierdet.contract.options import LIST_OPTIONS, OPTION_NAMES, DetectOptions
from tierdet.contract.results import DetectResult

INPUT = "IMAGE"
DETECTIONS, COUNTS, CLASS_NAMES = "DETECTIONS", "COUNTS", "CLASS_NAMES"
OUTPUTS: dict[str, str] = {DETECTIONS: "FP32", COUNTS: "INT32", CLASS_NAMES: "BYTES"}
VERSION = "1"
# The options a v2 model name already carries: "auto" and the tiers name a tier,
# any other model name pins that model.
NAMED_BY_MODEL = frozenset({"tier", "model"})
PARAMETERS: tuple[str, ...] = tuple(n for n in OPTION_NAMES if n not in NAMED_BY_MODEL)
# Parameters that steer the protocol itself, not detection: the binary data
# extension's (REST) and those Triton's clients may send with any request.
PROTOCOL_PARAMETERS = frozenset({"binary_data_output", "binary_data_size", "binary_data",
                                 "priority", "timeout", "sequence_id", "sequence_start",
                                 "sequence_end", "headers"})
_PACK = {"FP32": "f", "INT32": "i"}


@dataclass(frozen=True)
class Target:
    """What a v2 model name asks for: the router's choice within a tier
    (``auto``: the default tier), or one pinned model."""

    name: str
    tier: str | None = None
    model: str | None = None
    routed: bool = True


@dataclass(frozen=True)
class V2Output:
    name: str
    datatype: str
    shape: tuple[int, ...]
    values: list[Any]  # flat, row-major: floats, ints or bytes

    def raw(self) -> bytes:
        """The binary form (the binary data extension, gRPC's raw contents)."""
        if self.datatype == "BYTES":
            return serialize_bytes(self.values)
        return struct.pack(f"<{len(self.values)}{_PACK[self.datatype]}", *self.values)

    def json_data(self) -> list[Any]:
        if self.datatype == "BYTES":
            return [v.decode("utf-8", "replace") for v in self.values]
        return self.values


def bad_request(message: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_OPTION, message)


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def deserialize_bytes(raw: bytes) -> list[bytes]:
    """BYTES elements from their binary form; a length past the end is refused."""
    items, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise bad_request(f"{INPUT}: truncated BYTES element length at byte {at}")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise bad_request(f"{INPUT}: a BYTES element of {size} bytes runs past the end "
                              "of the tensor")
        items.append(raw[at:at + size])
        at += size
    return items


@dataclass(frozen=True)
class ImageInput:
    """What an ``IMAGE`` input declares: N encoded images (BYTES), or N images of
    ``height`` x ``width`` RGB pixels (UINT8)."""

    count: int
    pixels: tuple[int, int] | None = None  # (height, width) for UINT8

    def images(self, raw: bytes) -> list[bytes | Pixels]:
        """The images from the tensor's binary form."""
        if self.pixels is None:
            return check_images(list(deserialize_bytes(raw)), self.count)
        height, width = self.pixels
        size = height * width * 3
        if len(raw) != self.count * size:
            raise bad_request(f"{INPUT}: {len(raw)} bytes are not {self.count} x {height} x "
                              f"{width} x 3 pixels")
        return [Pixels(raw[i * size:(i + 1) * size], width, height)
                for i in range(self.count)]

    def from_values(self, values: list[Any]) -> bytes:
        """A UINT8 tensor's binary form from its values as numbers (JSON, gRPC)."""
        try:
            return bytes(values)
        except (TypeError, ValueError):
            raise bad_request(f"{INPUT}: UINT8 values must be integers 0..255") from None


def check_input(name: str, datatype: str, shape: Sequence[int], max_images: int
                ) -> ImageInput:
    """What the input declares, after checking it is ``IMAGE`` with a shape and
    datatype it may have."""
    if name != INPUT:  # as /v1/detect without its 'image' field: no image was sent
        raise ApiError(ErrorCode.EMPTY_IMAGE, f"no input {INPUT} (got {name!r}): send the "
                       f"images as {INPUT}")
    dims = list(shape)
    if datatype == "BYTES":
        if not (len(dims) == 1 or (len(dims) == 2 and dims[1] == 1)):
            raise bad_request(f"{INPUT}: shape {dims}: expected [N] (or [N, 1]) encoded "
                              "images")
        spec = ImageInput(dims[0])
    elif datatype == "UINT8":
        if len(dims) not in (3, 4) or dims[-1] != 3 or min(dims) < 1:
            raise bad_request(f"{INPUT}: shape {dims}: expected [H, W, 3] (or [N, H, W, 3]) "
                              "RGB pixels")
        spec = ImageInput(dims[0] if len(dims) == 4 else 1, (dims[-3], dims[-2]))
    else:
        raise bad_request(f"{INPUT}: datatype {datatype} is not accepted: send BYTES "
                          "(encoded JPEG, PNG or WebP images) or UINT8 RGB pixels")
    if spec.count < 1:
        raise ApiError(ErrorCode.EMPTY_IMAGE, f"{INPUT}: shape {dims} holds no image")
    if spec.count > max_images:
        raise bad_request(f"{INPUT}: {spec.count} images; at most {max_images} are accepted")
    return spec


def check_images(images: list[bytes | Pixels], declared: int) -> list[bytes | Pixels]:
    if len(images) != declared:
        raise bad_request(f"{INPUT}: shape declares {declared} images, the data holds "
                          f"{len(images)}")
    return images


def options_from_parameters(parameters: Mapping[str, Any], target: Target) -> DetectOptions:
    """``DetectOptions`` from a request's parameters (values as the protocol types
    them: bool, int, float, str; a list option also as comma-separated text)."""
    given = {k: v for k, v in parameters.items() if k not in PROTOCOL_PARAMETERS}
    for name in NAMED_BY_MODEL & given.keys():
        raise bad_request(f"parameter {name!r}: the model name says it (use the tier's "
                          "or the model's name, or 'auto')")
    values: dict[str, Any] = {}
    for name, value in given.items():
        if name in LIST_OPTIONS and isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        values[name] = value
    try:
        return DetectOptions(**values, tier=target.tier, model=target.model)
    except ValidationError as exc:
        raise bad_request(first_problem(exc.errors(), "parameters")) from None


def requested_outputs(names: Sequence[str]) -> list[str]:
    """The outputs asked for, in the order asked (all, when none is named)."""
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise bad_request(f"unknown output(s) {', '.join(map(repr, unknown))}; outputs: "
                          f"{', '.join(OUTPUTS)}")
    return list(names) or list(OUTPUTS)


def outputs(results: Sequence[DetectResult], names: Sequence[str]) -> list[V2Output]:
    """The output tensors of ``results`` (one per image, in request order)."""
    k = max((len(r.detections) for r in results), default=0)
    boxes: list[float] = []
    labels: list[bytes] = []
    for r in results:
        for d in r.detections:
            boxes += [d.x1, d.y1, d.x2, d.y2, d.score, float(d.class_id)]
            labels.append(d.class_name.encode())
        pad = k - len(r.detections)
        boxes += [0.0, 0.0, 0.0, 0.0, 0.0, -1.0] * pad
        labels += [b""] * pad
    n = len(results)
    made = {DETECTIONS: V2Output(DETECTIONS, "FP32", (n, k, 6), boxes),
            COUNTS: V2Output(COUNTS, "INT32", (n,), [len(r.detections) for r in results]),
            CLASS_NAMES: V2Output(CLASS_NAMES, "BYTES", (n, k), labels)}
    return [made[name] for name in names]


def routing_parameters(results: Sequence[DetectResult]) -> dict[str, bool | int | float | str]:
    """The routing facts: typed values for one image; for a batch each key holds
    the images' values comma-separated, in request order."""
    facts: list[dict[str, bool | int | float | str]] = [
        {"model": r.model, "tier": r.routing.tier or "",
         "budget_ms": round(r.routing.budget_ms, 3),
         "predicted_ms": round(r.routing.predicted_ms, 3),
         "actual_ms": round(r.routing.actual_ms, 3), "degraded": r.routing.degraded,
         "tiles": r.routing.tiles} for r in results]
    if len(facts) == 1:
        return facts[0]
    return {key: ",".join(str(f[key]).lower() if isinstance(f[key], bool) else str(f[key])
                          for f in facts) for key in facts[0]}


def model_metadata(target: Target, platform: str) -> dict[str, Any]:
    """The v2 model metadata (JSON form; the gRPC front end fills its message from it)."""
    return {
        "name": target.name, "versions": [VERSION], "platform": platform,
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": DETECTIONS, "datatype": "FP32", "shape": [-1, -1, 6]},
                    {"name": COUNTS, "datatype": "INT32", "shape": [-1]},
                    {"name": CLASS_NAMES, "datatype": "BYTES", "shape": [-1, -1]}],
    }

"""The v2 translation (frontends/v2_tensors.py) on its own: the BYTES wire form,
parameters -> DetectOptions, and the padded output tensors. The oracle is the
protocol's layout, written out here, and tritonclient's own (de)serializer."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.contract.images import Pixels
from tierdet.contract.results import Detection, DetectResult, Routing, Timing
from tierdet.frontends import v2_tensors
from tierdet.frontends.v2_tensors import Target
from tierdet.serving import decoding
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

AUTO = Target("auto", tier="balanced")


def test_bytes_round_trip_matches_tritonclient():
    items = [b"", b"\xff\xd8jpeg", b"x" * 300]
    ours = v2_tensors.serialize_bytes(items)
    assert ours == serialize_byte_tensor(np.array(items, dtype=np.object_)).item()
    assert v2_tensors.deserialize_bytes(ours) == items
    assert list(deserialize_bytes_tensor(ours)) == items


@pytest.mark.parametrize("raw", [b"\x01\x00", struct.pack("<I", 10) + b"short"])
def test_truncated_bytes_are_refused(raw):
    with pytest.raises(ApiError) as caught:
        v2_tensors.deserialize_bytes(raw)
    assert caught.value.code is ErrorCode.INVALID_OPTION


def test_parameters_become_options():
    options = v2_tensors.options_from_parameters(
        {"sla_ms": 250, "classes": "person, car", "max_detections": 5, "tile": "auto",
         "binary_data_output": True}, AUTO)
    assert options.tier == "balanced" and options.model is None
    assert options.sla_ms == 250.0 and options.classes == ("person", "car")
    assert options.max_detections == 5 and options.tile == "auto"
    pinned = v2_tensors.options_from_parameters({"classes": ["dog", 1]},
                                                Target("d0", model="d0", routed=False))
    assert pinned.model == "d0" and pinned.classes == ("dog", "1")


@pytest.mark.parametrize("parameters,field", [
    ({"tier": "accurate"}, "tier"), ({"model": "x"}, "model"),
    ({"score_threshold": 2}, "score_threshold"), ({"colour": "red"}, "colour"),
])
def test_bad_parameters_name_the_field(parameters, field):
    with pytest.raises(ApiError) as caught:
        v2_tensors.options_from_parameters(parameters, AUTO)
    assert caught.value.code is ErrorCode.INVALID_OPTION and field in caught.value.message


def _result(n: int, model: str = "m") -> DetectResult:
    dets = tuple(Detection(i, 2 * i, i + 10, 2 * i + 10, 0.5, 1 + i, f"c{i}") for i in range(n))
    return DetectResult(model, 640, 480, dets, Timing(1, 1, 1, 1, 4),
                        Routing("balanced", 500.0, 20.0, 4.0, False))


def test_outputs_pad_to_the_longest_image():
    out = {o.name: o for o in v2_tensors.outputs([_result(2), _result(0), _result(1)],
                                                 list(v2_tensors.OUTPUTS))}
    boxes = np.frombuffer(out["DETECTIONS"].raw(), "<f4").reshape(out["DETECTIONS"].shape)
    assert boxes.shape == (3, 2, 6)
    np.testing.assert_array_equal(boxes[0, 1], [1, 2, 11, 12, 0.5, 2])
    np.testing.assert_array_equal(boxes[1], [[0, 0, 0, 0, 0, -1]] * 2)
    assert np.frombuffer(out["COUNTS"].raw(), "<i4").tolist() == [2, 0, 1]
    names = deserialize_bytes_tensor(out["CLASS_NAMES"].raw())
    assert list(names) == [b"c0", b"c1", b"", b"", b"c0", b""]
    assert out["CLASS_NAMES"].json_data() == ["c0", "c1", "", "", "c0", ""]


def test_routing_parameters_typed_for_one_listed_for_a_batch():
    one = v2_tensors.routing_parameters([_result(1)])
    assert one["model"] == "m" and one["budget_ms"] == 500.0 and one["degraded"] is False
    batch = v2_tensors.routing_parameters([_result(1, "a"), _result(1, "b")])
    assert batch["model"] == "a,b" and batch["degraded"] == "false,false"


@pytest.mark.parametrize("name,datatype,shape,code", [
    ("PICTURE", "BYTES", [1], ErrorCode.EMPTY_IMAGE),
    ("IMAGE", "FP32", [1, 4, 4, 3], ErrorCode.INVALID_OPTION),
    ("IMAGE", "UINT8", [4, 4, 1], ErrorCode.INVALID_OPTION),
    ("IMAGE", "UINT8", [2, 0, 4, 3], ErrorCode.INVALID_OPTION),
    ("IMAGE", "BYTES", [2, 2], ErrorCode.INVALID_OPTION),
    ("IMAGE", "BYTES", [0], ErrorCode.EMPTY_IMAGE),
    ("IMAGE", "BYTES", [17], ErrorCode.INVALID_OPTION),
])
def test_the_input_is_checked(name, datatype, shape, code):
    with pytest.raises(ApiError) as caught:
        v2_tensors.check_input(name, datatype, shape, 16)
    assert caught.value.code is code
    assert v2_tensors.check_input("IMAGE", "BYTES", [3, 1], 16).count == 3


def test_uint8_pixels_are_split_image_by_image():
    spec = v2_tensors.check_input("IMAGE", "UINT8", [2, 2, 3, 3], 16)
    assert (spec.count, spec.pixels) == (2, (2, 3))
    raw = bytes(range(36))
    first, second = spec.images(raw)
    assert (first.width, first.height, first.data) == (3, 2, raw[:18])
    assert second.data == raw[18:]
    with pytest.raises(ApiError, match="not 2 x 2 x 3 x 3 pixels"):
        spec.images(raw[:-1])
    single = v2_tensors.check_input("IMAGE", "UINT8", [2, 3, 3], 16)
    assert single.images(single.from_values(list(range(18))))[0].data == raw[:18]
    with pytest.raises(ApiError, match=r"integers 0\.\.255"):
        single.from_values([256] * 18)


@pytest.mark.parametrize("pixels,code", [
    (Pixels(b"", 0, 0), ErrorCode.EMPTY_IMAGE),
    (Pixels(b"\x00" * 300, 10, 10), ErrorCode.IMAGE_TOO_LARGE),
    (Pixels(b"\x00" * 75, 5, 5), ErrorCode.TOO_MANY_PIXELS),
    (Pixels(b"\x00" * 10, 2, 2), ErrorCode.UNREADABLE_IMAGE),
])
def test_raw_pixels_meet_the_limits_of_an_encoded_image(pixels, code):
    with pytest.raises(ApiError) as caught:
        decoding.from_pixels(pixels, max_bytes=200, max_pixels=20)
    assert caught.value.code is code


def test_raw_pixels_are_the_image_as_sent():
    image = decoding.from_pixels(Pixels(bytes(range(12)), 2, 2), 200, 20)
    assert (image.width, image.height, image.step) == (2, 2, 1)
    assert image.pixels[1, 0].tolist() == [6, 7, 8]

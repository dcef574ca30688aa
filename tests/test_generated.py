"""Generated files match their sources, and the one definitions agree with the proto."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO
from tierdet.artifacts import generate
from tierdet.contract import wire
from tierdet.contract.options import LIST_OPTIONS, OPTION_NAMES, DetectOptions
from tierdet.contract.results import (
    Detection,
    DetectResult,
    ModelInfo,
    ModelsInfo,
    Routing,
    TierInfo,
    Timing,
)
from tierdet.proto import detection_pb2 as pb


@pytest.mark.parametrize("family", list(generate.SOURCES))
def test_generated_files_match_their_sources(family):
    drift = generate.drift(generate.SOURCES[family]())
    assert not drift, f"{family} drifted; run `tierdet generate`: {drift}"


def test_the_generate_command_checks_everything():
    result = subprocess.run([sys.executable, "-m", "tierdet.cli", "generate", "--check"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every generated file matches" in result.stdout


def test_drift_is_reported_not_ignored():
    pages = generate.SOURCES["README and docs tables"]()
    assert {"README.md", "docs/api/options.md"} <= {str(p.relative_to(REPO)) for p in pages}
    for path, text in pages.items():
        assert generate.drift({path: text + "edited by hand\n"}) == [str(path.relative_to(REPO))]


def test_the_proto_carries_every_option_under_its_name():
    fields = pb.DetectRequest.DESCRIPTOR.fields_by_name
    assert set(fields) == {"image", *OPTION_NAMES}, "protos/detection.proto disagrees with " \
        "tierdet.contract.options.DetectOptions"
    for name in OPTION_NAMES:
        field = fields[name]
        if name in LIST_OPTIONS:
            assert field.is_repeated, name
        else:  # an unset option must be told apart from a zero
            assert field.has_presence or field.type == field.TYPE_STRING, name


@pytest.mark.parametrize("options", [
    DetectOptions(),
    DetectOptions(tier="realtime", sla_ms=120.5, model="efficientdet-d0", score_threshold=0.0,
                  max_detections=1, classes=("person", "3")),
])
def test_options_round_trip_through_every_wire_form(options):
    message = wire.options_to_message(options, b"jpeg")
    assert message.image == b"jpeg"
    assert DetectOptions(**wire.options_from_message(message)) == options
    fields = wire.options_to_fields(options)
    assert DetectOptions(**wire.options_from_fields(fields)) == options


def test_the_proto_mirrors_the_result_types():
    def names(message, dataclass_type) -> tuple[set[str], set[str]]:
        return (set(message.DESCRIPTOR.fields_by_name),
                {f for f in dataclass_type.__dataclass_fields__})

    for message, kind in ((pb.DetectResponse, DetectResult), (pb.ListModelsResponse, ModelsInfo)):
        proto_fields, dc_fields = names(message, kind)
        assert proto_fields == dc_fields, (message.DESCRIPTOR.name, proto_fields ^ dc_fields)


def test_results_round_trip_through_protobuf():
    result = DetectResult("m", 640, 480,
                          (Detection(1.0, 2.0, 30.0, 40.0, 0.75, 18, "dog"),),
                          Timing(1.0, 2.0, 3.0, 4.0, 10.0), Routing(None, 500.0, 9.0, 10.0, False))
    assert wire.from_message(DetectResult, wire.to_message(result, pb.DetectResponse())) == result
    info = ModelsInfo("balanced", (TierInfo("balanced", 500.0, ("a", "b"), True, True),),
                      (ModelInfo("a", "efficientdet", 512, "letterbox", None, 3.9, True,
                                 "READY", "", "random", 30.0, 0.0, "coco", {"set": 0.5}),))
    assert wire.from_message(ModelsInfo, wire.to_message(info, pb.ListModelsResponse())) == info

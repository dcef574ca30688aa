"""The spec registry drives the committed Triton configs; drift fails here."""

import re

import pytest
from tierdet.build.repository import COMMITTED_ROOT, TARGETS, render_config
from tierdet.registry.labels import COCO80, COCO90
from tierdet.registry.specs import SPECS, ZOO
from tierdet.registry.trained import trained_specs


def test_the_registry_is_the_zoo_and_the_trained_models():
    assert {**ZOO, **trained_specs()} == SPECS
    assert not set(ZOO) & set(trained_specs())
    for spec in trained_specs().values():
        assert spec.official_weights is None and spec.labels.num_classes == 6


def test_every_spec_is_complete():
    for name, spec in SPECS.items():
        assert name == spec.name
        assert spec.input_size % 128 == 0 or spec.input_size == 416
    for spec in ZOO.values():
        assert spec.published_ap is not None and 0 < spec.published_ap < 100
        assert spec.labels.num_classes in (80, 90)
        if spec.official_weights:
            assert spec.official_weights.url.startswith("https://")
            # A full digest, a published prefix (weaker), or none: see specs.OfficialWeights.
            assert re.fullmatch(r"|[0-9a-f]{8,64}", spec.official_weights.sha256)


def test_the_zoo_is_complete_and_agrees_with_the_architectures():
    from tierdet.build.damoyolo import VARIANTS
    from tierdet.registry.specs import Family

    assert [s.name for s in ZOO.values()] == (
        [f"efficientdet-d{i}" for i in range(8)]
        + [f"damoyolo-{v}" for v in ("ns", "nm", "nl", "t", "s", "m", "l")])
    for spec in ZOO.values():
        if spec.family is Family.DAMOYOLO:
            assert spec.input_size == VARIANTS[spec.arch].input_size
            assert spec.labels is COCO80 and spec.preprocessing.resize == "stretch"
            assert spec.nms_iou == (0.65 if spec.arch.startswith("n") else 0.7)
        else:
            assert spec.labels is COCO90 and spec.preprocessing.resize == "letterbox"
            assert spec.nms_iou == 0.5  # effdet's batched_nms threshold


def test_effdet_sizes_match_effdet_configs():
    effdet = pytest.importorskip("effdet")
    for spec in ZOO.values():  # the trained D0 runs at 256: anchors follow its size
        if spec.arch.startswith("tf_efficientdet"):
            size = tuple(effdet.get_efficientdet_config(spec.arch).image_size)
            assert size == (spec.input_size, spec.input_size), spec.name


def test_label_sets_agree_on_coco_category_ids():
    # Both families report the same category id for the same class name.
    assert COCO90.lookup(0) == (1, "person") == COCO80.lookup(0)
    assert COCO90.lookup(89) == (90, "toothbrush") == COCO80.lookup(79)
    assert COCO90.lookup(11) is None  # slot 11 is COCO id 12, unused
    assert sum(c is not None for c in COCO90.category_ids) == 80


def test_every_config_batches_dynamically():
    for target in TARGETS:
        for spec in SPECS.values():
            text = (COMMITTED_ROOT / target / spec.name / "config.pbtxt").read_text()
            assert "dynamic_batching {" in text
            assert int(re.search(r"max_batch_size: (\d+)", text).group(1)) >= 8
            # cpu-local leaves the queue policy out: see repository._queue_policy.
            assert ("timeout_action: REJECT" in text) == (target != "cpu-local")


def test_targets_pick_their_backend():
    spec = SPECS["efficientdet-d0"]
    assert 'backend: "python"' in render_config(spec, "cpu-local")
    assert 'backend: "onnxruntime"' in render_config(spec, "cpu")
    gpu = render_config(spec, "gpu")
    assert 'platform: "tensorrt_plan"' in gpu and "KIND_GPU" in gpu


def test_instance_counts_come_from_the_spec():
    """Two copies per model on a GPU, one on CPU (specs.Instances says why), in every
    committed config; a spec's own counts reach its configs."""
    from dataclasses import replace

    from tierdet.registry.specs import Instances

    expected = {"gpu": "kind: KIND_GPU count: 2", "cpu": "kind: KIND_CPU count: 1",
                "cpu-local": "kind: KIND_CPU count: 1"}
    for target in TARGETS:
        for spec in SPECS.values():
            text = (COMMITTED_ROOT / target / spec.name / "config.pbtxt").read_text()
            (group,) = re.findall(r"^instance_group \[ \{ (.*) \} \]$", text, re.MULTILINE)
            assert group == expected[target], (target, spec.name)
    spec = replace(SPECS["efficientdet-d7"], instances=Instances(gpu=1, cpu=3))
    assert "instance_group [ { kind: KIND_GPU count: 1 } ]" in render_config(spec, "gpu")
    for target in ("cpu", "cpu-local"):
        assert "instance_group [ { kind: KIND_CPU count: 3 } ]" in render_config(spec, target)
    with pytest.raises(ValueError, match="at least 1"):
        Instances(gpu=0)


def test_provenance_is_escaped_into_the_config():
    text = render_config(SPECS["efficientdet-d0"], "cpu-local",
                         provenance={"weights": 'file /tmp/a "b"\\c'})
    assert r'string_value: "file /tmp/a \"b\"\\c"' in text


def test_readme_model_zoo_table_agrees_with_the_registry():
    """The zoo table of the Performance page (made by benchmarks/model_zoo.py) lists
    every published model once, with the registry's input size and published AP."""
    page = (COMMITTED_ROOT.parent / "docs" / "performance.md").read_text()
    table = page.split("<!-- model-zoo:start -->", 1)[1].split("<!-- model-zoo:end -->")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert [r[0] for r in body] == list(ZOO)
    col = {name: header.index(name) for name in ("input", "published COCO AP")}
    for row in body:
        spec = ZOO[row[0]]
        assert int(row[col["input"]]) == spec.input_size
        assert float(row[col["published COCO AP"]]) == spec.published_ap

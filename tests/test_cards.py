"""Model cards: your own detectors, validated, built and served through the real stack.

Two cards: YOLOX-Nano's real COCO weights (an ONNX file from another exporter,
fixed batch 1, raw grid output) and a DAMO-YOLO-Ns fine-tuned on its own
classes (tierdet's shapes checkpoint). Both build with `tierdet build --card`
and serve beside a zoo model; YOLOX-Nano's AP on real COCO photographs is
measured through the gateway and on the bare ONNX, against YOLOX's reference.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml
from conftest import CARDS, REPO, TEST_MODEL
from tierdet import cli
from tierdet.registry.cards import CardError, load_card, register
from tierdet.training.evaluation import run_evaluation

YOLOX, SHAPES = CARDS
COCO = REPO.parent / "shared" / "data" / "coco-val2017-128"
REFERENCE_AP = 0.297  # ../shared/models/yolox-nano/README.md: this file on these 128 images


def _card(tmp_path: Path, **changes) -> Path:
    """The YOLOX card under a name of its own, with ``changes`` (dotted keys)."""
    raw = yaml.safe_load(YOLOX.read_text())
    raw["name"] = f"yolox-variant-{len(list(tmp_path.parent.iterdir()))}-{tmp_path.name[-12:]}"
    raw["name"] = "".join(c for c in raw["name"].lower() if c.isalnum() or c in "-._")
    raw["source"]["onnx"] = str(load_card(YOLOX).source.onnx)
    for key, value in changes.items():
        *path, last = key.split(".")
        node = raw
        for part in path:
            node = node[part]
        if value is None:
            del node[last]
        else:
            node[last] = value
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("changes,field", [
    ({"name": None}, "name"),
    ({"name": "Not A Name"}, "name"),
    ({"input.layout": "CHWN"}, "input.layout"),
    ({"output.strides": []}, "output"),
    ({"classes": "imagenet"}, "classes"),
    ({"licence": None}, "licence"),
    ({"colour": "red"}, "colour"),
    ({"source.sha256": "abc"}, "source"),
    ({"label_set": "shapes"}, "label_set"),  # coco80's classes are COCO's label set
])
def test_a_malformed_card_is_refused_naming_the_field(tmp_path, changes, field):
    with pytest.raises(CardError) as info:
        load_card(_card(tmp_path, **changes))
    assert str(tmp_path / "card.yaml") in str(info.value) and field in str(info.value)


@pytest.mark.parametrize("changes,says", [
    ({"input.size": 320}, "does not run on the input the card declares"),
    ({"input.layout": "NHWC"}, "does not run on the input the card declares"),
    ({"output.format": "boxes_scores"}, "boxes_scores expects"),
    ({"output.strides": [8, 16]}, "expects [B, 3380, 85]"),
    ({"classes": ["person", "car"]}, "expects [B, 3549, 7]"),
    ({"source.onnx": "/nonexistent/model.onnx"}, "no such file"),
    ({"source.sha256": "0" * 64}, "does not match"),
])
def test_a_card_that_does_not_fit_its_graph_fails_at_build_time(tmp_path, changes, says):
    """Found by running the graph once, not at the first request; one line, exit 2."""
    code = cli.main(["--home", str(tmp_path / "home"), "build", "--card",
                     str(_card(tmp_path, **changes))])
    assert code == 2
    with pytest.raises(CardError, match=".*" + says.replace("[", r"\[")):
        from tierdet.build.models import build_card

        build_card(_card(tmp_path, **changes), tmp_path / "home")


def test_cards_build_into_the_one_contract(cards_built):
    yolox, shapes = cards_built
    # The fixed-batch graph was made batchable: its Reshapes copy the batch.
    assert yolox.provenance["batching"] == "dynamic" and yolox.spec.batching.max_batch_size == 8
    assert yolox.provenance["weights_digest_check"] == "sha256"
    import onnx

    graph = onnx.load(str(yolox.onnx))
    assert [(o.domain, o.version) for o in graph.opset_import] == [("", 18)]
    assert shapes.spec.labels.num_classes == 6 and shapes.provenance["measured_ap"] == "0.8480"


def photo_with_people() -> tuple[bytes, dict]:
    """A real COCO photograph with a person in it and many other objects: of the
    photographs with a large person, the one with the most kinds of large objects."""
    import json
    from collections import defaultdict

    coco = json.loads((COCO / "instances.json").read_text())
    kinds: dict[int, set[int]] = defaultdict(set)
    for a in coco["annotations"]:
        if a["area"] > 3000:
            kinds[a["image_id"]].add(a["category_id"])
    people = {a["image_id"] for a in coco["annotations"]
              if a["category_id"] == 1 and a["area"] > 20_000}
    image = max((i for i in coco["images"] if i["id"] in people),
                key=lambda i: (len(kinds[i["id"]]), -i["id"]))
    return (COCO / "images" / image["file_name"]).read_bytes(), image


def test_card_models_serve_beside_the_zoo_and_find_a_person(card_stack):
    models = {m["name"]: m for m in httpx.get(card_stack.http + "/v1/models").json()["models"]}
    assert {"yolox-nano", "shapes-ns", TEST_MODEL} <= set(models)
    yolox = models["yolox-nano"]
    # Real, verified weights: ranked by their published AP; the random D0 ranks 0.
    assert yolox["published_coco_ap"] == yolox["routing_ap"] == 25.8
    assert models[TEST_MODEL]["routing_ap"] == 0.0
    assert models["shapes-ns"]["routing_ap"] == 84.8
    assert (models["yolox-nano"]["label_set"], models["shapes-ns"]["label_set"]) == (
        "coco", "shapes")
    data, info = photo_with_people()
    r = httpx.post(card_stack.http + "/v1/detect", files={"image": ("p.jpg", data)},
                   data={"model": "yolox-nano", "classes": "person"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (info["width"], info["height"])
    assert body["detections"] and body["detections"][0]["score"] > 0.5
    assert {d["class_id"] for d in body["detections"]} == {1}
    # With no model named, the router takes the real detector over random weights.
    r = httpx.post(card_stack.http + "/v1/detect", files={"image": ("p.jpg", data)},
                   data={"tier": "accurate", "classes": "person"}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "yolox-nano"


def test_the_router_never_ranks_a_shapes_ap_against_a_coco_one(card_stack, tmp_path):
    """shapes-ns's 84.8 is on its own six classes: a request any model could answer
    goes to the COCO models (YOLOX-Nano, 25.8), one for a shape to the shapes model."""
    from tierdet.training.datasets.synthetic import SynthConfig, generate

    data, _ = photo_with_people()
    r = httpx.post(card_stack.http + "/v1/detect", files={"image": ("p.jpg", data)},
                   data={"tier": "accurate"}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "yolox-nano", r.text
    shapes = generate(tmp_path / "shapes", {"val": 1}, SynthConfig(size=256), seed=3)
    image = sorted((shapes / "val").glob("*.jpg"))[0].read_bytes()
    r = httpx.post(card_stack.http + "/v1/detect", files={"image": ("s.jpg", image)},
                   data={"tier": "accurate", "classes": "circle,star"}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "shapes-ns", r.text


def test_a_fine_tuned_card_finds_its_own_classes(card_stack, tmp_path):
    from tierdet.training.datasets.synthetic import SynthConfig, generate

    data = generate(tmp_path / "shapes", {"val": 4}, SynthConfig(size=256), seed=7)
    path = sorted((data / "val").glob("*.jpg"))[0]
    r = httpx.post(card_stack.http + "/v1/detect", files={"image": ("s.jpg", path.read_bytes())},
                   data={"model": "shapes-ns", "score_threshold": "0.5"}, timeout=60)
    assert r.status_code == 200, r.text
    names = {d["class_name"] for d in r.json()["detections"]}
    assert names and names <= {"circle", "square", "triangle", "star", "ring", "cross"}


def test_yolox_nano_ap_on_real_coco_photographs(card_stack, cards_built):
    """Through the gateway and on the bare ONNX, both against the reference."""
    yolox = cards_built[0]
    register(YOLOX)
    gateway, bare = run_evaluation(COCO, url=card_stack.http, model="yolox-nano",
                                   onnx=yolox.onnx)
    print(f"\nYOLOX-Nano on {gateway.images} COCO val2017 photographs: gateway AP "
          f"{gateway.ap:.3f} (AP50 {gateway.ap50:.3f}, APs {gateway.ap_small:.3f}); bare ONNX "
          f"{bare.ap:.3f}; reference {REFERENCE_AP}")
    assert gateway.images == bare.images == 128 and gateway.missed == {}
    assert abs(gateway.ap - bare.ap) <= 0.002
    assert abs(bare.ap - REFERENCE_AP) <= 0.005


def test_eval_cli_takes_the_coco_folder_and_a_card(card_stack, cards_built, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--dataset", str(COCO), "--url", card_stack.http, "--model",
                     "yolox-nano", "--onnx", str(cards_built[0].onnx), "--card", str(YOLOX),
                     "--limit", "16", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "yolox-nano" in table and "gateway" in table and "onnx" in table and out.is_file()


def test_the_shipped_yolox_file_is_the_one_its_readme_and_licence_name():
    readme = (REPO / "weights" / "yolox-nano" / "README.md").read_text()
    card = load_card(YOLOX)
    assert card.source.sha256 and f"`{card.source.sha256}`" in readme.replace("\n", "")
    assert "Apache License" in (REPO / "weights" / "yolox-nano" / "LICENSE").read_text()
    assert card.licence.startswith("Apache-2.0")

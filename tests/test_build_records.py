"""Build records carry the export format; a build of another format is exported again.

A fixed exporter must reach volumes that already hold models: ``ensure_built``
(``tierdet up``, the tests' fixtures), ``ensure_cards`` and the model builder
(``docker/build-missing.sh``, ``tierdet build --keep-current``) keep a build
only while its record names the current ``EXPORT_FORMAT`` and the weights
asked for. Records from before a format change are written here as they were
(no ``export_format``, or an older one); the rebuilds are real exports.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import onnx
from conftest import CARDS, REPO, TEST_MODEL, TEST_WEIGHTS
from deploy_support import DOCKER, run_tool
from tierdet.build.export import EXPORT_FORMAT
from tierdet.build.models import BuiltModel, ensure_built, ensure_cards, load_built, stale
from tierdet.build.weights import WeightsSource
from tierdet.registry.cards import sha256_file
from tierdet.registry.tensors import MODEL_METADATA_KEY

SOURCE = WeightsSource.parse(TEST_WEIGHTS)
# The model the tests export for real: the format rule is the same for every model,
# and DAMO-YOLO-Ns exports in about 11 s of CPU where EfficientDet-D0 takes 27.
EXPORTED = "damoyolo-ns"
OLD_GRAPH = b"a graph the old exporter wrote"


def _record(home: Path, name: str, export_format: str | None = str(EXPORT_FORMAT),
            **fields: str) -> dict[str, str]:
    """A build record (and a stand-in for its ONNX) as an earlier build left them."""
    onnx_file = home / "onnx" / f"{name}.onnx"
    onnx_file.parent.mkdir(parents=True, exist_ok=True)
    onnx_file.write_bytes(OLD_GRAPH)
    record = {"weights": SOURCE.describe(), "weights_sha256": "",
              "built_with": "tierdet 0.0.9", "built_at": "2026-01-01T00:00:00+00:00",
              "onnx_sha256": sha256_file(onnx_file), **fields}
    if export_format is not None:
        record["export_format"] = export_format
    onnx_file.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _assert_exported_now(home: Path, name: str) -> dict[str, str]:
    """The model in ``home`` is a real export of the current format, its record on disk."""
    path = home / "onnx" / f"{name}.onnx"
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["export_format"] == str(EXPORT_FORMAT)
    assert path.read_bytes() != OLD_GRAPH
    assert record["onnx_sha256"] == sha256_file(path)
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False)
             .metadata_props}
    assert props[MODEL_METADATA_KEY] == name
    assert props["export_format"] == str(EXPORT_FORMAT)  # the graph carries its record too
    return record


def test_the_export_format_is_three():
    """Format 3: single-label cards rank boxes, not pairs (tierdet/build/export/__init__.py
    says what changed); a bump there is what makes every volume export its models again."""
    assert EXPORT_FORMAT == 3


def test_stale_says_why_a_build_cannot_be_kept(tmp_path):
    assert stale(None, SOURCE) == "not built"
    _record(tmp_path, TEST_MODEL)
    current = load_built(tmp_path, TEST_MODEL)
    assert isinstance(current, BuiltModel) and stale(current, SOURCE) is None
    assert "other weights" in stale(current, WeightsSource.parse("random:1"))
    for recorded, says in (("1", "export format 1"), (None, "export format none"),
                           (str(EXPORT_FORMAT + 1), f"export format {EXPORT_FORMAT + 1}")):
        _record(tmp_path, TEST_MODEL, export_format=recorded)
        why = stale(load_built(tmp_path, TEST_MODEL), SOURCE)
        assert why is not None and says in why and f"writes {EXPORT_FORMAT}" in why


def test_a_build_in_the_current_format_is_reused(tmp_path):
    record = _record(tmp_path, TEST_MODEL)
    (kept,) = ensure_built([TEST_MODEL], SOURCE, tmp_path, progress=False)
    assert kept.provenance == record
    assert (tmp_path / "onnx" / f"{TEST_MODEL}.onnx").read_bytes() == OLD_GRAPH


def test_a_build_in_an_older_format_is_exported_again(tmp_path):
    _record(tmp_path, EXPORTED, export_format="1")
    (rebuilt,) = ensure_built([EXPORTED], SOURCE, tmp_path, progress=False)
    assert rebuilt.provenance == _assert_exported_now(tmp_path, EXPORTED)
    # Now current: the next start keeps it.
    (kept,) = ensure_built([EXPORTED], SOURCE, tmp_path, progress=False)
    assert kept.provenance == rebuilt.provenance


def test_the_model_builder_keeps_current_builds_and_exports_old_ones(tmp_path):
    """docker/build-missing.sh with the real tierdet: a current, installed build is
    left alone (its TensorRT engines stay cached), a current one missing from the
    repository is installed without an export, one whose record predates the
    export format (none recorded) is exported."""
    home = tmp_path / "home"
    kept = _record(home, "damoyolo-s")
    config = home / "repository" / "cpu" / "damoyolo-s" / "config.pbtxt"
    config.parent.mkdir(parents=True)
    config.write_text("installed before\n")
    _record(home, TEST_MODEL)
    _record(home, EXPORTED, export_format=None)
    bin_dir = Path(sys.executable).parent  # the venv's tierdet, as in the image
    env = {**os.environ, "TIERDET_HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = run_tool(["sh", str(DOCKER / "build-missing.sh"), TEST_WEIGHTS, "cpu",
                       f"damoyolo-s,{TEST_MODEL},{EXPORTED}"], env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "damoyolo-s: already built, kept" in result.stdout
    assert f"{TEST_MODEL}: already built, installing it into the cpu repository" in result.stdout
    assert f"{EXPORTED}: built in export format none" in result.stdout

    assert json.loads((home / "onnx" / "damoyolo-s.json").read_text()) == kept
    assert config.read_text() == "installed before\n"
    installed = home / "repository" / "cpu" / TEST_MODEL
    assert (installed / "1" / "model.onnx").read_bytes() == OLD_GRAPH  # installed, not exported
    assert (home / "onnx" / f"{TEST_MODEL}.onnx").read_bytes() == OLD_GRAPH
    assert f'name: "{TEST_MODEL}"' in (installed / "config.pbtxt").read_text()
    record = _assert_exported_now(home, EXPORTED)
    exported = home / "repository" / "cpu" / EXPORTED
    assert sha256_file(exported / "1" / "model.onnx") == record["onnx_sha256"]
    assert (f'key: "tierdet.export_format" value {{ string_value: "{EXPORT_FORMAT}" }}'
            in (exported / "config.pbtxt").read_text())


def test_the_model_builder_keeps_a_current_card_and_installs_it(tmp_path):
    """A card whose file and graph are unchanged is not exported again (its plan stays
    cached); it is installed into the target's repository, with its gpu template."""
    from tierdet.build.repository import card_template
    from tierdet.registry.cards import register

    yolox = register(CARDS[0])[0]
    home = tmp_path / "home"
    record = _record(home, yolox.name, card_sha256=sha256_file(CARDS[0]),
                     weights_sha256=sha256_file(yolox.source.onnx))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "TIERDET_HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = run_tool(["sh", str(DOCKER / "build-missing.sh"), TEST_WEIGHTS, "cpu", "",
                       str(CARDS[0].relative_to(REPO))], env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((home / "onnx" / f"{yolox.name}.json").read_text()) == record
    installed = home / "repository" / "cpu" / yolox.name
    assert (installed / "1" / "model.onnx").read_bytes() == OLD_GRAPH
    assert card_template(home, yolox.name).is_file()


def test_a_card_built_in_an_older_format_is_built_again(tmp_path):
    from tierdet.registry.cards import register

    yolox = register(CARDS[0])[0]  # yolox-nano-320 of the card's two sizes
    source = {"card_sha256": sha256_file(CARDS[0]),
              "weights_sha256": sha256_file(yolox.source.onnx)}
    record = _record(tmp_path, yolox.name, **source)
    kept = ensure_cards([CARDS[0]], tmp_path)[0]
    assert kept.provenance == record

    _record(tmp_path, yolox.name, export_format="1", **source)
    rebuilt = ensure_cards([CARDS[0]], tmp_path)[0]
    assert rebuilt.provenance == _assert_exported_now(tmp_path, yolox.name)

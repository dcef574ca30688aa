"""The TensorRT engine step (service/tierdet/build/engines.py) with real stand-in executables.

No GPU here: the tests write a small ``trtexec`` and ``nvidia-smi`` that
behave like the real ones at the interface engines.py uses (the TensorRT
banner, the flags, the engine file, exit codes) and record each call. The
build runs as the containers run it: ``python3 -I -S engines.py`` (no
site-packages, so a non-stdlib import would fail), and through
``tierdet engines``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_support import ENGINES_PY, REPO, run_tool
from tierdet.build import engines
from tierdet.build.export import EXPORT_FORMAT
from tierdet.build.repository import render_config
from tierdet.registry.specs import get_spec

MODELS = ("efficientdet-d0", "damoyolo-s", "damoyolo-ns")

FAKE_TRTEXEC = '''#!{python}
"""Stand-in for TensorRT's trtexec: banner, flags, engine file, exit code."""
import json, os, sys, time
print("&&&& RUNNING TensorRT.trtexec [TensorRT v{version}] # trtexec " + " ".join(sys.argv[1:]))
if sys.argv[1:] == ["--help"]:
    print("=== Model Options ===")
    sys.exit(0)
args = dict(a[2:].split("=", 1) if "=" in a else (a[2:], True) for a in sys.argv[1:])
with open(os.environ["FAKE_TRTEXEC_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
model = os.path.basename(args["onnx"])[:-len(".onnx")]
if model in os.environ.get("FAKE_TRTEXEC_FAIL", "").split(","):
    print("[E] Error[4]: [network.cpp::validate] unsupported layer")
    print("&&&& FAILED TensorRT.trtexec")
    sys.exit(1)
started = time.time()
with open(args["onnx"], "rb") as f:
    onnx = f.read()
engine = b"PLAN" + onnx + repr(sorted(args.items())).encode()
with open(args["saveEngine"], "wb") as f:
    if os.environ.get("FAKE_TRTEXEC_PARTIAL"):  # half the engine, then a long build
        f.write(engine[:len(engine) // 2])
        f.flush()
    time.sleep(float(os.environ.get("FAKE_TRTEXEC_SLEEP", "0")))
    f.seek(0)
    f.write(engine)
if "timingCacheFile" in args:  # as trtexec: the file's timings plus this build's
    cache = args["timingCacheFile"]
    before = open(cache).read() if os.path.exists(cache) else ""
    with open(cache, "w") as f:
        f.write(before + "timed " + model + "\\n")
if os.environ.get("FAKE_TRTEXEC_TIMES"):
    with open(os.environ["FAKE_TRTEXEC_TIMES"], "a") as times:
        times.write(json.dumps([model, started, time.time()]) + "\\n")
print("&&&& PASSED TensorRT.trtexec")
'''

FAKE_NVIDIA_SMI = '''#!/bin/sh
# Stand-in for nvidia-smi --query-gpu=name --format=csv,noheader
[ "$1" = "--query-gpu=name" ] && [ "$2" = "--format=csv,noheader" ] || exit 64
[ -n "$FAKE_GPU_EXIT" ] && { echo "NVIDIA-SMI has failed" >&2; exit "$FAKE_GPU_EXIT"; }
printf '%s\\n' "${FAKE_GPUS:-NVIDIA H100 80GB HBM3}" | tr ';' '\\n'
'''


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "trtexec.log"
    monkeypatch.setenv("FAKE_TRTEXEC_LOG", str(log))
    monkeypatch.setenv("FAKE_TRTEXEC_TIMES", str(tmp_path / "trtexec.times"))
    for name in ("FAKE_TRTEXEC_FAIL", "FAKE_TRTEXEC_SLEEP", "FAKE_GPUS", "FAKE_GPU_EXIT",
                 "FAKE_TRTEXEC_PARTIAL"):
        monkeypatch.delenv(name, raising=False)
    return {
        "trtexec": _executable(bin_dir / "trtexec",
                               FAKE_TRTEXEC.format(python=sys.executable, version="100500")),
        "trtexec-8.6": _executable(bin_dir / "trtexec-8.6",
                                   FAKE_TRTEXEC.format(python=sys.executable, version="8601")),
        "nvidia-smi": _executable(bin_dir / "nvidia-smi", FAKE_NVIDIA_SMI),
        "log": log,
        "times": tmp_path / "trtexec.times",
    }


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A TIERDET_HOME as `tierdet build` leaves it: ONNX files plus provenance."""
    home = tmp_path / "home"
    (home / "onnx").mkdir(parents=True)
    for name in MODELS:
        onnx = home / "onnx" / f"{name}.onnx"
        onnx.write_bytes(f"onnx graph of {name}".encode())
        provenance = {"weights": "official", "weights_sha256": "ab" * 32,
                      "export_format": str(EXPORT_FORMAT),
                      "built_with": "tierdet test", "built_at": "2026-01-01T00:00:00+00:00",
                      "onnx_sha256": hashlib.sha256(onnx.read_bytes()).hexdigest()}
        onnx.with_suffix(".json").write_text(json.dumps(provenance))
    return home


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    """gpu configs as `tierdet repo generate` writes them into model_repository/gpu."""
    root = tmp_path / "templates"
    for name in MODELS:
        (root / name).mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(render_config(get_spec(name), "gpu"))
    return root


def _build_argv(home: Path, templates: Path, tools: dict[str, Path], *extra: str,
                trtexec: str = "trtexec", via: str = "script") -> list[str]:
    args = ["build", "--templates", str(templates), "--trtexec", str(tools[trtexec]),
            "--nvidia-smi", str(tools["nvidia-smi"]), *extra]
    if via == "script":  # as in the TensorRT container: stdlib only, no tierdet install
        return [sys.executable, "-I", "-S", str(ENGINES_PY), "--home", str(home), *args]
    return [sys.executable, "-m", "tierdet.cli", "--home", str(home), "engines", *args]


def _build(home: Path, templates: Path, tools: dict[str, Path], *extra: str,
           trtexec: str = "trtexec", via: str = "script") -> subprocess.CompletedProcess[str]:
    return run_tool(_build_argv(home, templates, tools, *extra, trtexec=trtexec, via=via),
                    cwd=REPO)


def _start_build(home: Path, templates: Path, tools: dict[str, Path], model: str,
                 repository: Path) -> subprocess.Popen[str]:
    """One Triton pod's init container: a build into the pod's own repository."""
    argv = _build_argv(home, templates, tools, "--models", model, "--repository",
                       str(repository))
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _finish(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return out


def _build_times(tools: dict[str, Path]) -> list[tuple[str, float, float]]:
    return [tuple(json.loads(line)) for line in tools["times"].read_text().splitlines()]


def _calls(tools: dict[str, Path]) -> list[list[str]]:
    log = tools["log"]
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return calls


def _built_models(calls: list[list[str]]) -> list[str]:
    return sorted(Path(next(a for a in c if a.startswith("--onnx="))[7:]).stem for c in calls)


def _report(home: Path) -> dict:
    (report,) = (home / "engines").glob("*/report.json")
    return json.loads(report.read_text())


def test_first_start_builds_fp16_engines_and_writes_the_gpu_repository(home, templates, tools):
    result = _build(home, templates, tools)
    assert result.returncode == 0, result.stdout + result.stderr

    calls = _calls(tools)
    assert _built_models(calls) == sorted(MODELS)
    d0 = next(c for c in calls if "efficientdet-d0.onnx" in " ".join(c))
    assert "--fp16" in d0
    # One profile, tuned for batch 1 (engines.Shapes says why), up to the config's max.
    assert "--minShapes=images:1x512x512x3" in d0
    assert "--optShapes=images:1x512x512x3" in d0
    assert "--maxShapes=images:8x512x512x3" in d0
    ns = next(c for c in calls if "damoyolo-ns.onnx" in " ".join(c))
    assert "--optShapes=images:1x416x416x3" in ns
    assert "--maxShapes=images:8x416x416x3" in ns

    key = "nvidia-h100-80gb-hbm3_trt10.5.0"
    # Each build times kernels into its own copy of the cache beside the plans,
    # which then replaces the shared one: the three builds' timings are all kept.
    cache = home / "engines" / key
    for call in calls:
        (timing,) = [a[len("--timingCacheFile="):] for a in call
                     if a.startswith("--timingCacheFile=")]
        assert Path(timing).parent == cache and Path(timing).name.startswith(".")
    timed = (cache / "timing.cache").read_text().splitlines()
    assert sorted(timed) == sorted(f"timed {m}" for m in MODELS)
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")
                  and not p.name.endswith(".lock")) == []
    repository = home / "repository" / "gpu"
    for name in MODELS:
        plan = repository / name / "1" / "model.plan"
        assert plan.read_bytes() == (home / "engines" / key / f"{name}.plan").read_bytes()
        assert plan.read_bytes().startswith(b"PLAN" + f"onnx graph of {name}".encode())
        # The config is exactly what tierdet's own renderer makes for the gpu
        # target, with the ONNX provenance plus the engine it was built into.
        provenance = json.loads((home / "onnx" / f"{name}.json").read_text())
        provenance["engine"] = "TensorRT 10.5.0 fp16 on NVIDIA H100 80GB HBM3, batch 1..8"
        expected = render_config(get_spec(name), "gpu", provenance=provenance)
        assert (repository / name / "config.pbtxt").read_text() == expected
    report = _report(home)
    assert report["key"] == key
    assert {m: r["status"] for m, r in report["models"].items()} == dict.fromkeys(MODELS, "built")


def test_a_matching_cache_skips_the_build(home, templates, tools):
    assert _build(home, templates, tools).returncode == 0
    _calls(tools)
    (home / "repository" / "gpu" / "damoyolo-s").rename(home / "lost")  # repository is rebuilt

    result = _build(home, templates, tools, via="cli")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _calls(tools) == []
    assert "damoyolo-s: cached" in result.stdout
    assert sorted(p.name for p in (home / "repository" / "gpu").iterdir()) == sorted(MODELS)
    assert {r["status"] for r in _report(home)["models"].values()} == {"cached"}


def test_a_new_gpu_model_or_tensorrt_version_rebuilds(home, templates, tools, monkeypatch):
    assert _build(home, templates, tools).returncode == 0
    _calls(tools)

    monkeypatch.setenv("FAKE_GPUS", "NVIDIA L4")
    assert _build(home, templates, tools).returncode == 0
    assert _built_models(_calls(tools)) == sorted(MODELS)

    result = _build(home, templates, tools, trtexec="trtexec-8.6")
    assert result.returncode == 0
    assert _built_models(_calls(tools)) == sorted(MODELS)
    keys = sorted(p.name for p in (home / "engines").iterdir())
    assert keys == ["nvidia-h100-80gb-hbm3_trt10.5.0", "nvidia-l4_trt10.5.0",
                    "nvidia-l4_trt8.6.1"]
    # Back on the first GPU and TensorRT: its cache still matches.
    monkeypatch.delenv("FAKE_GPUS")
    assert _build(home, templates, tools).returncode == 0
    assert _calls(tools) == []


def test_a_new_onnx_export_rebuilds_that_model_only(home, templates, tools):
    assert _build(home, templates, tools).returncode == 0
    _calls(tools)
    (home / "onnx" / "damoyolo-s.onnx").write_bytes(b"re-exported graph")

    assert _build(home, templates, tools).returncode == 0
    assert _built_models(_calls(tools)) == ["damoyolo-s"]
    plan = home / "repository" / "gpu" / "damoyolo-s" / "1" / "model.plan"
    assert plan.read_bytes().startswith(b"PLANre-exported graph")


def test_a_failing_model_is_reported_and_left_out_while_the_others_serve(
        home, templates, tools, monkeypatch):
    assert _build(home, templates, tools).returncode == 0  # all three served before
    _calls(tools)
    (home / "onnx" / "damoyolo-s.onnx").write_bytes(b"graph with an unsupported layer")
    monkeypatch.setenv("FAKE_TRTEXEC_FAIL", "damoyolo-s")

    result = _build(home, templates, tools)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LEFT OUT (failed to build): damoyolo-s" in result.stdout
    assert _built_models(_calls(tools)) == ["damoyolo-s"]  # the others came from the cache
    repository = home / "repository" / "gpu"
    # The stale damoyolo-s from the last run is gone with the rest of the old repository.
    assert sorted(p.name for p in repository.iterdir()) == ["damoyolo-ns", "efficientdet-d0"]
    failed = _report(home)["models"]["damoyolo-s"]
    assert failed["status"] == "failed"
    assert "trtexec exited 1" in failed["detail"]
    assert "unsupported layer" in failed["detail"]  # the log tail says why
    cache = next((home / "engines").iterdir())
    assert not (cache / "damoyolo-s.plan").exists()
    assert (cache / "damoyolo-s.log").is_file()

    # Restarts (new Triton pods) do not fail again on the same inputs...
    result = _build(home, templates, tools)
    assert result.returncode == 0 and _calls(tools) == []
    assert "not retried" in _report(home)["models"]["damoyolo-s"]["detail"]
    # ...unless asked to,
    assert _build(home, templates, tools, "--retry-failed").returncode == 0
    assert _built_models(_calls(tools)) == ["damoyolo-s"]
    # and a fixed export is built at once; only the model that changed.
    monkeypatch.delenv("FAKE_TRTEXEC_FAIL")
    (home / "onnx" / "damoyolo-s.onnx").write_bytes(b"graph without the layer")
    assert _build(home, templates, tools).returncode == 0
    assert _built_models(_calls(tools)) == ["damoyolo-s"]
    assert not (cache / "damoyolo-s.failed.json").exists()
    assert sorted(p.name for p in repository.iterdir()) == sorted(MODELS)


def _set_export_format(home: Path, model: str, export_format: str | None) -> None:
    """Rewrite ``model``'s build record as a build of ``export_format`` (None: a record
    from before formats were recorded); the ONNX bytes stay as they are."""
    record_path = home / "onnx" / f"{model}.json"
    record = json.loads(record_path.read_text())
    record.pop("export_format", None)
    if export_format is not None:
        record["export_format"] = export_format
    record_path.write_text(json.dumps(record))


@pytest.mark.parametrize("old_format", ["1", None], ids=["format-1", "no-format"])
def test_a_failure_under_an_older_export_format_is_forgotten(home, templates, tools,
                                                            monkeypatch, old_format):
    """A model that failed under format N is tried again once its ONNX is of format
    N+1, even where the bytes did not change; under the same format it is not."""
    _set_export_format(home, "damoyolo-s", old_format)
    monkeypatch.setenv("FAKE_TRTEXEC_FAIL", "damoyolo-s")
    assert _build(home, templates, tools, "--models", "damoyolo-s").returncode == 1
    cache = next((home / "engines").iterdir())
    stamp = json.loads((cache / "damoyolo-s.failed.json").read_text())["stamp"]
    assert stamp["export_format"] == (old_format or "")
    _calls(tools)

    _set_export_format(home, "damoyolo-s", str(EXPORT_FORMAT))  # the fixed exporter's
    monkeypatch.delenv("FAKE_TRTEXEC_FAIL")
    result = _build(home, templates, tools, "--models", "damoyolo-s")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (f"damoyolo-s: forgetting the failure under export format {old_format or 'none'}; "
            f"trying again under {EXPORT_FORMAT}") in result.stdout
    assert _built_models(_calls(tools)) == ["damoyolo-s"]
    assert not (cache / "damoyolo-s.failed.json").exists()
    assert json.loads((cache / "damoyolo-s.json").read_text())["stamp"]["export_format"] == (
        str(EXPORT_FORMAT))

    # A failure under the current format is remembered as before.
    (home / "onnx" / "damoyolo-s.onnx").write_bytes(b"still unsupported")
    monkeypatch.setenv("FAKE_TRTEXEC_FAIL", "damoyolo-s")
    assert _build(home, templates, tools, "--models", "damoyolo-s").returncode == 1
    _calls(tools)
    result = _build(home, templates, tools, "--models", "damoyolo-s")
    assert result.returncode == 1 and _calls(tools) == []
    assert "not retried" in _report(home)["models"]["damoyolo-s"]["detail"]


def test_a_failed_build_leaves_the_timing_cache_as_it_was(home, templates, tools, monkeypatch):
    assert _build(home, templates, tools, "--models", "efficientdet-d0").returncode == 0
    cache = next((home / "engines").iterdir())
    assert (cache / "timing.cache").read_text() == "timed efficientdet-d0\n"
    monkeypatch.setenv("FAKE_TRTEXEC_FAIL", "damoyolo-s")
    assert _build(home, templates, tools, "--models", "damoyolo-s").returncode == 1
    assert (cache / "timing.cache").read_text() == "timed efficientdet-d0\n"
    monkeypatch.delenv("FAKE_TRTEXEC_FAIL")
    assert _build(home, templates, tools, "--models", "damoyolo-s",
                  "--retry-failed").returncode == 0
    assert (cache / "timing.cache").read_text() == "timed efficientdet-d0\ntimed damoyolo-s\n"
    assert not list(cache.glob(".*timing.cache*"))


def test_models_without_onnx_or_template_are_reported(home, templates, tools):
    (templates / "damoyolo-ns" / "config.pbtxt").unlink()
    result = _build(home, templates, tools,
                    "--models", "efficientdet-d0,damoyolo-ns,efficientdet-d7")
    assert result.returncode == 0, result.stdout + result.stderr
    models = _report(home)["models"]
    assert models["efficientdet-d0"]["status"] == "built"
    assert "no gpu config template" in models["damoyolo-ns"]["detail"]
    assert "no built ONNX" in models["efficientdet-d7"]["detail"]
    assert sorted(p.name for p in (home / "repository" / "gpu").iterdir()) == ["efficientdet-d0"]


def test_nothing_built_is_an_error(home, templates, tools, monkeypatch):
    monkeypatch.setenv("FAKE_TRTEXEC_FAIL", ",".join(MODELS))
    result = _build(home, templates, tools)
    assert result.returncode == 1
    assert "repository" in result.stdout and "EMPTY" in result.stdout


def test_a_hung_trtexec_is_stopped_and_retried_next_time(home, templates, tools, monkeypatch):
    monkeypatch.setenv("FAKE_TRTEXEC_SLEEP", "30")
    result = _build(home, templates, tools, "--models", "damoyolo-ns", "--timeout-s", "1")
    assert result.returncode == 1
    assert "timed out after 1 s" in _report(home)["models"]["damoyolo-ns"]["detail"]
    _calls(tools)
    monkeypatch.setenv("FAKE_TRTEXEC_SLEEP", "0")  # e.g. the GPU was busy
    assert _build(home, templates, tools, "--models", "damoyolo-ns").returncode == 0
    assert _built_models(_calls(tools)) == ["damoyolo-ns"]


@pytest.mark.parametrize(("env", "message"), [
    ({"FAKE_GPU_EXIT": "9"}, "no GPU visible"),
    ({"FAKE_GPUS": "NVIDIA A100-SXM4-80GB;NVIDIA L4"}, "GPUs of different models"),
])
def test_no_gpu_or_mixed_gpus_stop_the_build(home, templates, tools, monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = _build(home, templates, tools)
    assert result.returncode == 2
    assert message in result.stdout
    assert _calls(tools) == []


def test_cache_key_names_the_gpu_and_tensorrt(tools):
    result = run_tool([sys.executable, "-I", "-S", str(ENGINES_PY), "key",
                       "--trtexec", str(tools["trtexec-8.6"]),
                       "--nvidia-smi", str(tools["nvidia-smi"])])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "nvidia-h100-80gb-hbm3_trt8.6.1"


@pytest.mark.parametrize(("banner", "version"), [
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v8203] # trtexec", "8.2.3"),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v8601] # trtexec", "8.6.1"),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec", "10.3.0"),
    ("&&&& RUNNING TensorRT.trtexec [TensorRT v101100] # trtexec", "10.11.0"),
])
def test_tensorrt_version_from_the_trtexec_banner(banner, version):
    assert engines.parse_tensorrt_banner(banner) == version


def test_shapes_come_from_the_generated_config():
    for name in MODELS:
        spec = get_spec(name)
        shapes = engines.shapes_from_config(render_config(spec, "gpu"))
        assert (shapes.size, shapes.max_batch) == (spec.input_size,
                                                   spec.batching.max_batch_size)
        size, top = spec.input_size, spec.batching.max_batch_size
        assert shapes.as_dict() == {"min": f"images:1x{size}x{size}x3",
                                    "opt": f"images:1x{size}x{size}x3",
                                    "max": f"images:{top}x{size}x{size}x3"}


def test_wait_for_the_model_builder(home, tmp_path):
    def wait(*extra: str) -> int:
        return run_tool([sys.executable, "-I", "-S", str(ENGINES_PY), "--home", str(home),
                         "wait", *extra]).returncode

    assert wait("--models", "efficientdet-d0,damoyolo-s") == 0
    assert wait("--models", "efficientdet-d0,efficientdet-d7", "--wait-s", "0.2") == 1
    repository = tmp_path / "cpu"
    assert wait("--models", "efficientdet-d0", "--repository", str(repository)) == 1
    (repository / "efficientdet-d0").mkdir(parents=True)
    (repository / "efficientdet-d0" / "config.pbtxt").write_text("name: \"efficientdet-d0\"\n")
    assert wait("--models", "efficientdet-d0", "--repository", str(repository)) == 0


def test_engines_py_imports_nothing_but_the_standard_library():
    # -I -S: no site-packages and no script folder on sys.path, as in the
    # TensorRT container where tierdet is not installed.
    code = (f"import runpy, sys; sys.argv = ['engines.py', '--help']\n"
            f"try:\n    runpy.run_path({str(ENGINES_PY)!r}, run_name='__main__')\n"
            f"except SystemExit as e:\n    assert e.code == 0\n"
            f"mods = sorted(m for m in sys.modules if m.split('.')[0] not in "
            f"sys.stdlib_module_names and m != '__main__')\n"
            f"print(mods)")
    result = run_tool([sys.executable, "-I", "-S", "-c", code], env={**os.environ})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_engines_py_names_provenance_as_the_registry_does():
    """engines.py runs without tierdet installed, so it keeps its own copy."""
    from tierdet.registry.tensors import PROVENANCE_PREFIX

    assert engines.PROVENANCE_PREFIX == PROVENANCE_PREFIX


# --- pods sharing the volume --------------------------------------------------------------


def test_builds_of_different_models_run_at_once(home, templates, tools, monkeypatch):
    """Two Triton pods starting together, each building a model the other does not:
    one lock per model, so neither waits for the other's (up to an hour) build."""
    monkeypatch.setenv("FAKE_TRTEXEC_SLEEP", "3")
    pods = [_start_build(home, templates, tools, model, home / f"pod-{i}" / "gpu")
            for i, model in enumerate(("efficientdet-d0", "damoyolo-s"))]
    for proc in pods:
        _finish(proc)
    (a, a_start, a_end), (b, b_start, b_end) = sorted(_build_times(tools))
    assert {a, b} == {"efficientdet-d0", "damoyolo-s"}
    assert max(a_start, b_start) < min(a_end, b_end), "the two builds did not overlap"
    for i, model in enumerate(("efficientdet-d0", "damoyolo-s")):
        assert [p.name for p in (home / f"pod-{i}" / "gpu").iterdir()] == [model]


def test_builds_of_the_same_model_take_turns_and_the_second_reuses_the_plan(
        home, templates, tools, monkeypatch):
    monkeypatch.setenv("FAKE_TRTEXEC_SLEEP", "2")
    pods = [_start_build(home, templates, tools, "damoyolo-ns", home / f"pod-{i}" / "gpu")
            for i in range(2)]
    outputs = [_finish(proc) for proc in pods]
    # One trtexec run: the pod that waited for the lock found the plan built.
    assert _built_models(_calls(tools)) == ["damoyolo-ns"]
    assert sorted("damoyolo-ns: built" in out for out in outputs) == [False, True]
    assert sum("damoyolo-ns: cached" in out for out in outputs) == 1
    plans = {(home / f"pod-{i}" / "gpu" / "damoyolo-ns" / "1" / "model.plan").read_bytes()
             for i in range(2)}
    (plan,) = plans
    assert plan.startswith(b"PLANonnx graph of damoyolo-ns")


def test_a_builder_killed_mid_build_leaves_no_half_written_plan(home, templates, tools,
                                                               monkeypatch):
    """An evicted pod (SIGKILL to the init container, trtexec with it) while trtexec
    has written half an engine: no reader sees a plan, the next start builds it."""
    import signal
    import time

    monkeypatch.setenv("FAKE_TRTEXEC_PARTIAL", "1")
    monkeypatch.setenv("FAKE_TRTEXEC_SLEEP", "60")
    cache = home / "engines" / "nvidia-h100-80gb-hbm3_trt10.5.0"
    cache.mkdir(parents=True)
    (cache / "timing.cache").write_text("timed earlier\n")
    proc = _start_build(home, templates, tools, "damoyolo-ns", home / "repository" / "gpu")
    deadline = time.monotonic() + 30
    while not [p for p in cache.glob(".damoyolo-ns.plan.*.tmp") if p.stat().st_size]:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)

    (partial,) = cache.glob(".damoyolo-ns.plan.*.tmp")  # hidden, under its own name
    assert not partial.read_bytes().endswith(b")]")
    assert not (cache / "damoyolo-ns.plan").exists()
    assert not (cache / "damoyolo-ns.json").exists()
    assert not (home / "repository" / "gpu").exists()  # never swapped in
    assert (cache / "timing.cache").read_text() == "timed earlier\n"
    (copy,) = cache.glob(".damoyolo-ns.timing.cache.*.tmp")  # the dead builder's own copy
    assert copy.read_text() == "timed earlier\n"

    monkeypatch.delenv("FAKE_TRTEXEC_PARTIAL")
    monkeypatch.setenv("FAKE_TRTEXEC_SLEEP", "0")
    result = _build(home, templates, tools, "--models", "damoyolo-ns")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "damoyolo-ns: built" in result.stdout
    plan = (home / "repository" / "gpu" / "damoyolo-ns" / "1" / "model.plan").read_bytes()
    assert plan == (cache / "damoyolo-ns.plan").read_bytes()
    assert plan.startswith(b"PLANonnx graph of damoyolo-ns") and plan.endswith(b")]")
    assert not list(cache.glob(".damoyolo-ns.plan.*"))  # the dead builder's file is gone
    assert not list(cache.glob(".damoyolo-ns.timing.cache.*"))
    assert (cache / "timing.cache").read_text() == "timed earlier\ntimed damoyolo-ns\n"
    assert (cache / "damoyolo-ns.plan").stat().st_mode & 0o777 == 0o644


def test_files_are_replaced_whole_under_unique_names(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    names = {engines.temporary_beside(target).name for _ in range(3)}
    assert len(names) == 3
    assert all(n.startswith(".report.json.") and n.endswith(".tmp") for n in names)
    engines.write_atomic(target, "new")
    assert target.read_text() == "new"
    engines.remove_leftovers(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


# --- model cards -------------------------------------------------------------------------


def test_a_cards_model_gets_its_plan_from_the_template_its_build_wrote(home, templates, tools):
    """The committed templates are the zoo's; `tierdet build --card` writes the card's
    under HOME, and `--cards` names the card files, found by their digest in the build
    records (engines.py cannot read YAML). A card not built yet is left out, alone."""
    from tierdet import cli
    from tierdet.build.repository import card_template
    from tierdet.registry.cards import expand, load_card

    card = REPO / "examples" / "cards" / "yolox-nano.yaml"
    names = [c.name for c in expand(load_card(card))]  # a model per input size
    name = names[-1]
    assert cli.main(["--home", str(home), "build", "--card", str(card), "--target", "cpu",
                     "--keep-current"]) == 0
    template = card_template(home, name)
    assert template == home.joinpath(*engines.CARD_TEMPLATES, name, "config.pbtxt")
    assert "max_batch_size: 8" in template.read_text()
    unbuilt = home / "other-card.yaml"
    unbuilt.write_text("name: other\n")
    result = _build(home, templates, tools, "--models", "efficientdet-d0", "--cards",
                    f"{card},{unbuilt}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _built_models(_calls(tools)) == sorted(["efficientdet-d0", *names])
    assert f"LEFT OUT: no model built from the card {unbuilt}" in result.stdout
    installed = home / "repository" / "gpu" / name / "config.pbtxt"
    assert installed.read_text().startswith(template.read_text())
    # Built again with the card unchanged, the ONNX is kept: its plan stays cached.
    before = (home / "onnx" / f"{name}.onnx").stat().st_mtime_ns
    assert cli.main(["--home", str(home), "build", "--card", str(card), "--target", "cpu",
                     "--keep-current"]) == 0
    assert (home / "onnx" / f"{name}.onnx").stat().st_mtime_ns == before
    result = _build(home, templates, tools, "--models", "efficientdet-d0", "--cards", str(card))
    assert result.returncode == 0 and f"{name}: cached" in result.stdout

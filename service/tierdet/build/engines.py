"""TensorRT engines for the ``gpu`` Triton repository, built on the GPU that runs them.

A TensorRT plan only runs on the GPU model and TensorRT version that built it,
so plans are built where Triton runs (compose's ``engine-builder`` service,
the Helm chart's init container) and cached in the model volume under
``HOME/engines/<gpu>_trt<version>/``. A cached plan is reused while its ONNX
file (sha256), its export format, shapes and precision are unchanged. A model
whose build fails is reported and left out of the repository, so the other
models still serve; the failure is remembered for the same inputs, so Triton
pods that scale out later do not spend minutes failing again (timeouts are
retried). A failure remembered under an older export format (the build
record's ``export_format``) is forgotten: a fixed exporter gets its retry.
trtexec's timing cache (the kernels it timed) is kept beside the plans, so a
build after the first skips the tactics already timed on this GPU.

Only the standard library is imported at module level: NVIDIA's TensorRT
container runs this file with its own python3 (``python3 engines.py build``),
where tierdet is not installed. ``tierdet engines ...`` runs the same code.

Layout (``HOME`` is ``TIERDET_HOME``, as written by ``tierdet build``):
  HOME/onnx/<model>.onnx, .json          built by ``tierdet build`` (+ provenance)
  HOME/engines/<key>/<model>.plan, .json  cached plans and what they were built from
  HOME/engines/<key>/<model>.log          trtexec's output; .failed.json: a remembered failure
  HOME/engines/<key>/timing.cache         trtexec's timing cache, shared by the models' builds
  HOME/engines/<key>/report.json          the last build's outcome per model
  HOME/engines/<key>/.<model>.lock        held while that model's plan is checked or built
  HOME/repository/gpu/<model>/            what tritonserver loads (rewritten each run)

Triton pods starting together share the volume: each model has its own lock
(pods building different models run at once; a second pod wanting the same
plan waits, then finds it cached), and every file is written under a unique
temporary name in its folder and renamed into place, so a builder killed
half-way (an evicted pod, a timeout) leaves no half-written plan, stamp,
report or timing cache under the name readers use. Each trtexec run works on
its own copy of the timing cache, renamed over the shared one once the build
succeeds: builds running at once never corrupt it (the last to finish wins,
and the other's new timings are timed again next time).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# tierdet.registry.tensors.PROVENANCE_PREFIX: this file runs without tierdet
# installed, so it carries its own copy (tests/test_deploy_engines.py keeps
# the two equal). Tensor names are read from the config templates instead.
PROVENANCE_PREFIX = "tierdet."
PRECISION = "fp16"
# Where NVIDIA's containers keep trtexec when it is not on PATH.
TRTEXEC_FALLBACKS = ("/usr/src/tensorrt/bin/trtexec", "/workspace/tensorrt/bin/trtexec")
LOG_TAIL_LINES = 20
TIMING_CACHE = "timing.cache"
# tierdet.build.repository.card_template: a card's gpu template, under HOME (the
# committed model_repository/gpu holds only the zoo's; a test keeps the two equal).
CARD_TEMPLATES = ("templates", "gpu")


class EngineError(RuntimeError):
    """The build cannot start at all (no GPU, no trtexec, bad templates)."""


@dataclass(frozen=True)
class Toolchain:
    """The GPU model and TensorRT version a plan is tied to."""

    gpu: str
    tensorrt: str

    @property
    def key(self) -> str:
        return f"{slug(self.gpu)}_trt{self.tensorrt}"


@dataclass(frozen=True)
class Shapes:
    """trtexec's optimisation profile for the NHWC uint8 input."""

    size: int
    max_batch: int
    input_name: str

    def spec(self, batch: int) -> str:
        return f"{self.input_name}:{batch}x{self.size}x{self.size}x3"

    def as_dict(self) -> dict[str, str]:
        # opt = 1: TensorRT times its kernels at the opt shape, and batch 1 is
        # where latency is tightest (the realtime tier, every request at low
        # load); larger batches come only under load, where the dynamic batcher
        # trades a little per-image speed for throughput, and still run in the
        # same plan up to max. One profile rather than one per tier's batch:
        # Triton binds an instance to a profile, not a batch to the profile
        # that fits it, and each profile costs build time and device memory.
        return {"min": self.spec(1), "opt": self.spec(1), "max": self.spec(self.max_batch)}


@dataclass
class Outcome:
    model: str
    status: str  # "built", "cached" or "failed"
    detail: str = ""


@dataclass
class Report:
    toolchain: Toolchain
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def installed(self) -> list[str]:
        return [o.model for o in self.outcomes if o.status != "failed"]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def as_dict(self) -> dict[str, object]:
        return {"gpu": self.toolchain.gpu, "tensorrt": self.toolchain.tensorrt,
                "key": self.toolchain.key,
                "models": {o.model: {"status": o.status, "detail": o.detail}
                           for o in self.outcomes}}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def log(message: str) -> None:
    print(f"[engines] {message}", flush=True)


# --- discovering the toolchain ------------------------------------------------------------


def _run(argv: Sequence[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineError(f"cannot run {argv[0]}: {exc}") from None


def discover_gpu(nvidia_smi: str = "nvidia-smi") -> str:
    """Name of the visible GPU; several different models cannot share one plan."""
    result = _run([nvidia_smi, "--query-gpu=name", "--format=csv,noheader"])
    names = sorted({line.strip() for line in result.stdout.splitlines() if line.strip()})
    if result.returncode != 0 or not names:
        raise EngineError(f"no GPU visible to {nvidia_smi} (exit {result.returncode}): "
                          f"{(result.stderr or result.stdout).strip()}")
    if len(names) > 1:
        raise EngineError(f"GPUs of different models are visible ({', '.join(names)}): a plan "
                          "runs on one model only; restrict with CUDA_VISIBLE_DEVICES")
    return names[0]


def parse_tensorrt_banner(text: str) -> str:
    """'[TensorRT v100500]' -> '10.5.0'; trtexec prints this banner on every run.

    TensorRT 10 encodes major*10000 + minor*100 + patch, earlier majors
    major*1000 + minor*100 + patch.
    """
    match = re.search(r"\[TensorRT v(\d+)\]", text)
    if not match:
        raise EngineError("trtexec printed no '[TensorRT vNNNN]' banner")
    n = int(match.group(1))
    major = n // 10000 if n >= 100000 else n // 1000
    rest = n - major * (10000 if n >= 100000 else 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def find_trtexec(explicit: str | None = None) -> str:
    candidates = [explicit] if explicit else [shutil.which("trtexec"), *TRTEXEC_FALLBACKS]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise EngineError(f"trtexec not found (looked at {', '.join(c for c in candidates if c)})")


def discover_tensorrt(trtexec: str) -> str:
    result = _run([trtexec, "--help"])
    return parse_tensorrt_banner(result.stdout + result.stderr)


# --- models and their templates -----------------------------------------------------------


def find_templates(start: Path | None = None) -> Path | None:
    """``model_repository/gpu`` beside this file or above it (checkout or image layout)."""
    here = (start or Path(__file__)).resolve()
    for folder in here.parents:
        candidate = folder / "model_repository" / "gpu"
        if candidate.is_dir():
            return candidate
    return None


def shapes_from_config(text: str) -> Shapes:
    """Input name, size and max batch, read from a generated ``config.pbtxt``."""
    batch = re.search(r"^max_batch_size:\s*(\d+)", text, re.MULTILINE)
    dims = re.search(r'input\s*\[\s*\{\s*name:\s*"([^"]+)"[^}]*?dims:\s*\[([^\]]*)\]', text)
    if not (batch and dims):
        raise ValueError("config has no max_batch_size or no input with dims")
    values = [int(v) for v in dims.group(2).replace(",", " ").split()]
    if len(values) != 3 or values[0] != values[1] or values[2] != 3:
        raise ValueError(f"expected NHWC [S, S, 3] input dims, got {values}")
    return Shapes(size=values[0], max_batch=max(1, int(batch.group(1))),
                  input_name=dims.group(1))


def provenance_params(provenance: dict[str, str]) -> str:
    """Parameter lines exactly as ``tierdet.build.repository.render_config`` writes them."""
    return "".join(
        f"parameters {{ key: {json.dumps(PROVENANCE_PREFIX + k)} value {{ string_value: "
        f"{json.dumps(v, ensure_ascii=False)} }} }}\n" for k, v in provenance.items())


def sha256_file(path: Path) -> str:
    """A copy of ``tierdet.registry.cards.sha256_file``: this module imports only the
    standard library (it runs where tierdet is not installed)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def built_models(home: Path) -> list[str]:
    """Models whose ONNX export finished (``tierdet build`` writes the .json last)."""
    onnx = home / "onnx"
    return sorted(p.stem for p in onnx.glob("*.json") if p.with_suffix(".onnx").is_file())


def missing_models(home: Path, models: Sequence[str],
                   repository: Path | None = None) -> list[str]:
    """``models`` not built yet, or (with ``repository``) not installed there yet.

    ``tierdet build`` writes a model's config.pbtxt after its model file, so a
    config means the repository entry is complete.
    """
    built = set(built_models(home))
    return [m for m in models if m not in built
            or (repository is not None and not (repository / m / "config.pbtxt").is_file())]


def wait_for_models(home: Path, models: Sequence[str], wait_s: float,
                    repository: Path | None = None, poll_s: float = 5.0) -> list[str]:
    """Wait up to ``wait_s`` for ``models`` to be built; returns those still missing."""
    deadline = time.monotonic() + wait_s
    while True:
        missing = missing_models(home, models, repository)
        if not missing or time.monotonic() >= deadline:
            return missing
        log(f"waiting for {', '.join(missing)} in {home}")
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def card_models(home: Path, cards: Sequence[Path], wait_s: float = 0.0,
                poll_s: float = 5.0) -> tuple[list[str], list[Path]]:
    """The models ``tierdet build --card`` made from these card files (one per input
    size the card declares), found by the
    card's sha256 in their build records (a card is YAML, which this file cannot
    read without tierdet), waiting up to ``wait_s`` for the model builder; and the
    cards no record names yet."""
    try:
        digests = {sha256_file(card): card for card in cards}
    except OSError as exc:
        raise EngineError(f"cannot read the card {exc.filename}: {exc.strerror}") from None
    deadline = time.monotonic() + wait_s
    while True:
        found: dict[str, list[str]] = {}
        for record in sorted((home / "onnx").glob("*.json")):
            try:
                digest = json.loads(record.read_text()).get("card_sha256")
            except (OSError, ValueError, AttributeError):
                continue
            if digest in digests and record.with_suffix(".onnx").is_file():
                found.setdefault(digest, []).append(record.stem)
        missing = [card for digest, card in digests.items() if digest not in found]
        if not missing or time.monotonic() >= deadline:
            return [m for d in digests if d in found for m in found[d]], missing
        log(f"waiting for the models of {', '.join(map(str, missing))} in {home}")
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


# --- building -----------------------------------------------------------------------------


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the exclusive lock ``path`` (created if missing) across Triton pods
    sharing the volume; the kernel releases it when the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def model_lock(cache: Path, model: str) -> Path:
    """The lock held while ``model``'s plan in ``cache`` is checked, built or installed."""
    return cache / f".{model}.lock"


def temporary_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A new, empty file of a unique name in ``path``'s folder (hidden, so never
    mistaken for ``path``): written there, then renamed over ``path`` atomically."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o644)  # mkstemp's 0600 would stay with the file once renamed
    return Path(name)


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old content or the new, never a part of it."""
    tmp = temporary_beside(path)
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_leftovers(path: Path) -> None:
    """Temporary files of ``path`` left by a builder that died (call with its lock held:
    no live builder of the same file exists then)."""
    prefix = f".{path.name}."
    for leftover in path.parent.iterdir():
        # .tmp.lock: the lock file trtexec keeps beside a timing cache it writes
        if leftover.name.startswith(prefix) and leftover.name.endswith((".tmp", ".tmp.lock")):
            leftover.unlink(missing_ok=True)


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-LOG_TAIL_LINES:])


@dataclass(frozen=True)
class Failure:
    detail: str
    # The same inputs would fail the same way (not a timeout or a missing tool),
    # so the failure is remembered instead of retried at every start.
    final: bool


def timing_cache_copy(shared: Path, model: str) -> Path:
    """A copy of the ``shared`` timing cache for one build of ``model``, under a
    unique name beside it (``timing_cache_leftovers`` finds it by ``model``);
    absent where no cache exists yet: trtexec then starts one under that name."""
    private = temporary_beside(timing_cache_leftovers(shared, model))
    try:
        shutil.copyfile(shared, private)
    except FileNotFoundError:
        private.unlink()
    return private


def timing_cache_leftovers(shared: Path, model: str) -> Path:
    """The name ``remove_leftovers`` takes for ``model``'s copies of ``shared``
    (only ``model``'s builder, holding its lock, uses them)."""
    return shared.with_name(f"{model}.{shared.name}")


def run_trtexec(trtexec: str, onnx: Path, plan: Path, shapes: Shapes, log_path: Path,
                timeout_s: float, timing_cache: Path | None = None) -> Failure | None:
    """Build ``plan`` from ``onnx``; returns None on success. trtexec writes a
    temporary file beside it, renamed to ``plan`` only once complete. With
    ``timing_cache``, trtexec starts from a copy of it, and that copy (now with
    this build's timings added) replaces it after a successful build."""
    tmp = temporary_beside(plan)
    model = plan.stem  # plans are named <model>.plan
    timing = timing_cache_copy(timing_cache, model) if timing_cache is not None else None
    try:
        failure = _trtexec_into(trtexec, onnx, tmp, plan, shapes, log_path, timeout_s, timing)
        if (failure is None and timing_cache is not None and timing is not None
                and timing.is_file() and timing.stat().st_size > 0):
            timing.replace(timing_cache)
        return failure
    finally:
        tmp.unlink(missing_ok=True)
        if timing is not None:
            timing.unlink(missing_ok=True)
            timing.with_name(timing.name + ".lock").unlink(missing_ok=True)


def _trtexec_into(trtexec: str, onnx: Path, tmp: Path, plan: Path, shapes: Shapes,
                  log_path: Path, timeout_s: float, timing: Path | None) -> Failure | None:
    profile = shapes.as_dict()
    argv = [trtexec, f"--onnx={onnx}", f"--saveEngine={tmp}", f"--{PRECISION}",
            f"--minShapes={profile['min']}", f"--optShapes={profile['opt']}",
            f"--maxShapes={profile['max']}", "--skipInference",
            *([f"--timingCacheFile={timing}"] if timing is not None else [])]
    with log_path.open("w") as out:
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        try:
            code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s,
                                  check=False).returncode
        except subprocess.TimeoutExpired:
            return Failure(f"trtexec timed out after {timeout_s:.0f} s (log {log_path})", False)
        except OSError as exc:
            return Failure(f"cannot run trtexec: {exc}", False)
    if code != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
        why = f"trtexec exited {code}" if code != 0 else "trtexec wrote no engine"
        return Failure(f"{why} (log {log_path}):\n{_tail(log_path)}", True)
    tmp.replace(plan)
    return None


@dataclass(frozen=True)
class BuildOptions:
    home: Path
    repository: Path
    templates: Path
    trtexec: str
    timeout_s: float = 3600.0
    retry_failed: bool = False


def _read_stamp(path: Path) -> dict[str, object] | None:
    try:
        stamp = json.loads(path.read_text()).get("stamp")
    except (OSError, ValueError, AttributeError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _stamp_matches(path: Path, stamp: dict[str, object]) -> bool:
    return _read_stamp(path) == stamp


def forget_older_failure(model: str, failed: Path, stamp: dict[str, object]) -> bool:
    """Forget ``model``'s remembered failure if it was recorded under another export
    format than the ONNX's now (a record without one predates format 2): the
    exporter was fixed since, so the build is tried again."""
    recorded = _read_stamp(failed)
    if recorded is None:
        return False
    before, now = (str(s.get("export_format") or "none") for s in (recorded, stamp))
    if before == now:
        return False
    log(f"{model}: forgetting the failure under export format {before}; trying again "
        f"under {now}")
    failed.unlink(missing_ok=True)
    return True


def _build_plan(model: str, opts: BuildOptions, toolchain: Toolchain, cache: Path,
                onnx: Path, shapes: Shapes, stamp: dict[str, object]) -> Outcome:
    plan, stamp_path, failed = (cache / f"{model}.plan", cache / f"{model}.json",
                                cache / f"{model}.failed.json")
    forget_older_failure(model, failed, stamp)
    if not opts.retry_failed and _stamp_matches(failed, stamp):
        detail = json.loads(failed.read_text())["detail"]
        return Outcome(model, "failed", "failed before with this ONNX, GPU and TensorRT, not "
                                        f"retried (--retry-failed to force): {detail}")
    log(f"{model}: building {PRECISION} engine for {toolchain.gpu} "
        f"(TensorRT {toolchain.tensorrt}, batch 1..{shapes.max_batch})")
    timing_cache = cache / TIMING_CACHE
    for path in (plan, stamp_path, failed, timing_cache_leftovers(timing_cache, model)):
        remove_leftovers(path)
    started = time.monotonic()
    failure = run_trtexec(opts.trtexec, onnx, plan, shapes, cache / f"{model}.log",
                          opts.timeout_s, timing_cache)
    if failure:
        plan.unlink(missing_ok=True)
        stamp_path.unlink(missing_ok=True)
        if failure.final:
            write_atomic(failed, json.dumps({"stamp": stamp, "detail": failure.detail},
                                            indent=2) + "\n")
        return Outcome(model, "failed", failure.detail)
    failed.unlink(missing_ok=True)
    built_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    write_atomic(stamp_path, json.dumps({"stamp": stamp, "built_at": built_at}, indent=2) + "\n")
    return Outcome(model, "built", f"{plan} in {time.monotonic() - started:.0f} s")


def template_for(opts: BuildOptions, model: str) -> Path:
    """The zoo's committed template, else the one a card's build wrote under HOME."""
    committed = opts.templates / model / "config.pbtxt"
    return committed if committed.is_file() else opts.home.joinpath(
        *CARD_TEMPLATES, model, "config.pbtxt")


def _ensure_plan(model: str, opts: BuildOptions, toolchain: Toolchain,
                 cache: Path) -> tuple[Outcome, Path | None, dict[str, str]]:
    """Cached or freshly built plan for ``model``, with the provenance to install it with."""
    onnx = opts.home / "onnx" / f"{model}.onnx"
    template = template_for(opts, model)
    if not (onnx.is_file() and onnx.with_suffix(".json").is_file()):
        return Outcome(model, "failed", f"no built ONNX at {onnx}"), None, {}
    if not template.is_file():
        return Outcome(model, "failed", f"no gpu config template at {template}"), None, {}
    try:
        shapes = shapes_from_config(template.read_text())
    except ValueError as exc:
        return Outcome(model, "failed", f"{template}: {exc}"), None, {}
    provenance = json.loads(onnx.with_suffix(".json").read_text())
    stamp: dict[str, object] = {
        "onnx_sha256": sha256_file(onnx), "export_format": provenance.get("export_format", ""),
        "shapes": shapes.as_dict(), "precision": PRECISION,
        "gpu": toolchain.gpu, "tensorrt": toolchain.tensorrt}
    plan = cache / f"{model}.plan"
    if plan.is_file() and _stamp_matches(cache / f"{model}.json", stamp):
        outcome = Outcome(model, "cached", str(plan))
    else:
        outcome = _build_plan(model, opts, toolchain, cache, onnx, shapes, stamp)
        if outcome.status == "failed":
            return outcome, None, {}
    provenance["engine"] = (f"TensorRT {toolchain.tensorrt} {PRECISION} on {toolchain.gpu}, "
                            f"batch 1..{shapes.max_batch}")
    return outcome, plan, provenance


def _install(staging: Path, model: str, plan: Path, template: Path,
             provenance: dict[str, str]) -> None:
    version_dir = staging / model / "1"
    version_dir.mkdir(parents=True)
    try:  # same volume: a hard link costs nothing; else (Helm's emptyDir) copy
        os.link(plan, version_dir / "model.plan")
    except OSError:
        shutil.copyfile(plan, version_dir / "model.plan")
    (staging / model / "config.pbtxt").write_text(template.read_text()
                                                  + provenance_params(provenance))


def _swap_in(staging: Path, repository: Path) -> None:
    """Replace the repository as a whole: no stale or half-written model survives."""
    old = repository.with_name(f".{repository.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    try:
        if repository.exists():
            repository.rename(old)
        staging.rename(repository)
    except OSError as exc:  # e.g. the repository is itself a mount point
        raise EngineError(f"cannot replace {repository} ({exc}); give a folder inside "
                          "a volume, not the volume's mount point") from None
    shutil.rmtree(old, ignore_errors=True)


def build_repository(models: Sequence[str], toolchain: Toolchain, opts: BuildOptions) -> Report:
    """Build or reuse a plan per model and write the ``gpu`` repository of the good ones.

    Each model's plan is checked, built and installed under that model's own lock:
    builders of different models run side by side, builders of the same model take
    turns (the later one then finds the plan cached).
    """
    cache = opts.home / "engines" / toolchain.key
    cache.mkdir(parents=True, exist_ok=True)
    report = Report(toolchain)
    opts.repository.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{opts.repository.name}.staging.",
                                    dir=opts.repository.parent))
    try:
        for model in models:
            with locked(model_lock(cache, model)):
                outcome, plan, provenance = _ensure_plan(model, opts, toolchain, cache)
                if plan is not None:  # linked or copied while no one can replace it
                    _install(staging, model, plan, template_for(opts, model), provenance)
            report.outcomes.append(outcome)
        # Builders writing the same repository (compose's, in the volume) take turns.
        with locked(opts.repository.with_name(f".{opts.repository.name}.lock")):
            _swap_in(staging, opts.repository)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_atomic(cache / "report.json", json.dumps(report.as_dict(), indent=2) + "\n")
    return report


# --- command line -------------------------------------------------------------------------


def _models_arg(text: str | None) -> list[str]:
    return [m.strip() for m in (text or "").split(",") if m.strip()]


def _toolchain(args: argparse.Namespace) -> tuple[Toolchain, str]:
    trtexec = find_trtexec(args.trtexec)
    return Toolchain(discover_gpu(args.nvidia_smi), discover_tensorrt(trtexec)), trtexec


def cmd_build(args: argparse.Namespace) -> int:
    home: Path = args.home
    templates = args.templates or find_templates()
    if templates is None or not templates.is_dir():
        raise EngineError("no gpu config templates: pass --templates "
                          "(model_repository/gpu from the tierdet source)")
    requested = _models_arg(args.models)
    if requested and args.wait_s > 0:
        wait_for_models(home, requested, args.wait_s)
    models = requested or built_models(home)
    cards = [Path(c) for c in _models_arg(args.cards)]
    if cards:
        found, unbuilt = card_models(home, cards, args.wait_s)
        models = list(dict.fromkeys([*models, *found]))
        for card in unbuilt:  # left out like a model that fails: the others serve
            log(f"LEFT OUT: no model built from the card {card} (the model builder runs "
                "`tierdet build --card` first)")
    if not models:
        raise EngineError(f"no built models in {home / 'onnx'}: run `tierdet build` first")
    toolchain, trtexec = _toolchain(args)
    log(f"GPU {toolchain.gpu}, TensorRT {toolchain.tensorrt}: cache {toolchain.key}")
    opts = BuildOptions(home, args.repository or home / "repository" / "gpu", templates,
                        trtexec, args.timeout_s, args.retry_failed)
    report = build_repository(models, toolchain, opts)
    for outcome in report.outcomes:
        log(f"{outcome.model}: {outcome.status} {outcome.detail}")
    if report.failed:
        log(f"LEFT OUT (failed to build): {', '.join(o.model for o in report.failed)}")
    log(f"repository {opts.repository}: {', '.join(report.installed) or 'EMPTY'}")
    # Triton with an empty repository would serve nothing: fail loudly instead.
    return 0 if report.installed else 1


def cmd_key(args: argparse.Namespace) -> int:
    print(_toolchain(args)[0].key)
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    models = _models_arg(args.models)
    if not models:
        raise EngineError("wait needs --models")
    missing = wait_for_models(args.home, models, args.wait_s, args.repository)
    if missing:
        log(f"still not built after {args.wait_s:.0f} s: {', '.join(missing)}")
        return 1
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Sub-commands of ``engines.py`` and ``tierdet engines`` (one definition for both)."""
    sub = p.add_subparsers(dest="engines_command", required=True)
    b = sub.add_parser("build", help="build or reuse TensorRT plans, write the gpu repository",
                       description="Build an fp16 TensorRT plan per built ONNX model on this "
                                   "GPU with trtexec (cached per GPU model and TensorRT "
                                   "version), then write the gpu Triton repository. Models "
                                   "that fail are reported and left out.")
    k = sub.add_parser("key", help="print the cache key (GPU model + TensorRT version)")
    w = sub.add_parser("wait", help="wait until `tierdet build` has written the models",
                       description="Exit 0 once HOME/onnx holds every model named, "
                                   "1 if some are still missing after --wait-s.")
    for q in (b, w):
        q.add_argument("--models", help="comma-separated names (build: default every built "
                                        "model in HOME/onnx)")
        q.add_argument("--wait-s", type=float, default=0.0,
                       help="wait this long for the named models' ONNX to appear (default 0)")
    w.add_argument("--repository", type=Path,
                   help="also wait until each model is installed in this repository")
    w.set_defaults(engines_func=cmd_wait)
    for q in (b, k):
        q.add_argument("--trtexec", help="trtexec to use (default: PATH, then "
                                         f"{', '.join(TRTEXEC_FALLBACKS)})")
        q.add_argument("--nvidia-smi", default="nvidia-smi", help="nvidia-smi to ask for the GPU")
    b.add_argument("--repository", type=Path,
                   help="repository to write (default HOME/repository/gpu)")
    b.add_argument("--cards", help="comma-separated model cards the model builder built "
                                   "(`tierdet build --card`): their models too, each with "
                                   "the gpu template its build wrote under HOME")
    b.add_argument("--templates", type=Path,
                   help="folder of gpu config.pbtxt templates (default: model_repository/gpu "
                        "found beside or above this file)")
    b.add_argument("--timeout-s", type=float, default=3600.0, help="limit per trtexec run")
    b.add_argument("--retry-failed", action="store_true",
                   help="build again models that failed before with the same ONNX, GPU and "
                        "TensorRT (a failure is remembered; timeouts are always retried, and "
                        "a failure under an older export format is forgotten)")
    b.set_defaults(engines_func=cmd_build)
    k.set_defaults(engines_func=cmd_key)


def run(args: argparse.Namespace) -> int:
    try:
        return args.engines_func(args)
    except EngineError as exc:
        log(f"error: {exc}")
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="engines.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--home", type=Path,
                   default=Path(os.environ.get("TIERDET_HOME")
                                or Path.home() / ".cache" / "tierdet"),
                   help="TIERDET_HOME: built ONNX in, engine cache and repository out")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

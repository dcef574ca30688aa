"""The detect use case (tierdet.serving.usecase.Detector) against an in-process backend.

The fake stands in for Triton only here, where the use case's own rules are
the point (admission, names, classes, shedding, mapping, tickets, metrics):
these run in milliseconds. Everything about the serving path itself runs on a
real tritonserver in the other tests.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from prometheus_client import generate_latest
from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.contract.options import DetectOptions
from tierdet.registry.labels import COCO90
from tierdet.registry.specs import SPECS
from tierdet.serving.catalog import PROBE_BATCH
from tierdet.serving.latency import UNKNOWN_SERVICE_MS
from tierdet.serving.metrics import Metrics
from tierdet.serving.security import hash_key
from tierdet.serving.settings import Settings
from tierdet.serving.usecase import Detector

D0 = "efficientdet-d0"  # 512 px, letterbox, 90 COCO slots (slot i = category i + 1)
SHAPES = "damoyolo-ns-shapes"  # 256 px, stretch, the 6 shapes classes


def _rows(*rows: tuple[float, float, float, float, float, int], k: int = 100) -> np.ndarray:
    """[K, 6] model rows in input pixels, padded like the graph pads them."""
    out = np.zeros((k, 6), np.float32)
    out[:, 5] = -1
    if rows:
        out[:len(rows)] = rows
    return out


class FakeBackend:
    """An in-process Backend: every model READY, ``infer`` answers fixed rows."""

    def __init__(self, rows: dict[str, np.ndarray], provenance: dict[str, dict] | None = None,
                 fail: ApiError | None = None) -> None:
        self.rows = rows
        self.prov = provenance or {}
        self.fail = fail
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    @contextlib.contextmanager
    def input_buffer(self, shape):
        yield np.empty(shape, np.uint8)

    async def infer(self, model, images, timeout_s, priority=0):
        self.calls.append((model, images.shape))
        if self.fail is not None:
            raise self.fail
        return np.stack([self.rows[model]] * images.shape[0])

    async def repository_models(self, timeout_s=2.0):
        return {name: ("READY", "") for name in self.rows}

    async def provenance(self, model, timeout_s=2.0):
        return self.prov.get(model, {"weights": "random (seed 0): NOT trained"})

    async def batch_executions(self, model, timeout_s=2.0):
        return {}

    async def close(self):
        pass


PERSON, CAR = 0, 2  # EfficientDet slots of COCO "person" (1) and "car" (3)
D0_ROWS = _rows((10, 20, 110, 220, 0.9, PERSON), (30, 40, 60, 90, 0.8, PERSON),
                (200, 200, 300, 240, 0.5, CAR), (400, 100, 500, 200, 0.4, CAR))


def _detector(tmp_path: Path | None = None, keys: str | None = None,
              backend: FakeBackend | None = None, **settings) -> tuple[Detector, FakeBackend]:
    backend = backend or FakeBackend({D0: D0_ROWS, SHAPES: _rows((0, 0, 128, 128, 0.9, 1))})
    if keys is not None and tmp_path is not None:
        (tmp_path / "keys.yaml").write_text(keys)
        settings["api_keys_file"] = tmp_path / "keys.yaml"
    detector = Detector(Settings(models=tuple(backend.rows), **settings), backend, Metrics())
    asyncio.run(detector.catalog.refresh())
    return detector, backend


def _jpeg(width: int, height: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((height, width, 3), 127, np.uint8))
    assert ok
    return buf.tobytes()


def _detect(detector: Detector, image: bytes, credentials: str | None = None, **options):
    async def run():
        caller = detector.admit(credentials, "http")
        return await detector.detect(caller, image, DetectOptions(**options))

    return asyncio.run(run())


def test_rows_come_back_in_image_pixels_best_first():
    detector, backend = _detector()
    # 1024x512 letterboxed into 512: every coordinate doubles.
    result = _detect(detector, _jpeg(1024, 512), model=D0, score_threshold=0.0)
    assert backend.calls[-1] == (D0, (1, 512, 512, 3))
    assert (result.width, result.height) == (1024, 512)
    first = result.detections[0]
    assert first.box == (20.0, 40.0, 220.0, 440.0) and first.class_id == 1
    assert first.class_name == "person"
    assert [round(d.score, 2) for d in result.detections] == [0.9, 0.8, 0.5, 0.4]
    assert result.routing.tier is None and result.timing.total_ms >= result.timing.infer_ms


def test_the_class_filter_applies_before_the_threshold_and_the_limit():
    detector, _ = _detector()
    image = _jpeg(512, 512)
    for classes in (["car"], ["3"], [" Car "]):
        result = _detect(detector, image, model=D0, classes=classes, score_threshold=0.45,
                         max_detections=5)
        assert [(d.class_name, round(d.score, 2)) for d in result.detections] == [("car", 0.5)]
    result = _detect(detector, image, model=D0, classes=["car", "person"], max_detections=3,
                     score_threshold=0.0)
    assert [d.class_id for d in result.detections] == [1, 1, 3]


@pytest.mark.parametrize("classes,where", [(["unicorn"], "unicorn"), (["person", "99"], "99")])
def test_an_unknown_class_is_refused_before_any_work(classes, where):
    detector, backend = _detector()
    calls = len(backend.calls)
    with pytest.raises(ApiError) as info:
        _detect(detector, b"not even an image", classes=classes)
    assert info.value.code is ErrorCode.INVALID_OPTION and where in info.value.message
    assert len(backend.calls) == calls


def test_classes_steer_the_router_to_a_model_that_has_them():
    detector, _ = _detector()
    # "circle" is only in the shapes model's label set: the router must take it.
    result = _detect(detector, _jpeg(300, 200), classes=["circle"], sla_ms=5000)
    assert (result.model == SHAPES and {d.class_name for d in result.detections} == {"square"}) \
        or result.detections == ()
    with pytest.raises(ApiError) as info:  # a pinned model without the class
        _detect(detector, _jpeg(300, 200), model=D0, classes=["circle"])
    assert info.value.code is ErrorCode.INVALID_OPTION


def test_a_hopeless_budget_is_shed_before_decoding():
    detector, backend = _detector()
    calls = len(backend.calls)
    with pytest.raises(ApiError) as info:
        _detect(detector, b"\xff\xd8\xff garbage that would not decode", sla_ms=0.5)
    assert info.value.code is ErrorCode.SLA_UNATTAINABLE and info.value.retry_after_s >= 1
    assert len(backend.calls) == calls


def test_admission_authenticates_rate_limits_and_authorizes(tmp_path):
    keys = f"""keys:
  - name: app
    sha256: {hash_key("secret")}
    rate_per_s: 1
    burst: 2
    tiers: [accurate]
"""
    detector, _ = _detector(tmp_path, keys)
    with pytest.raises(ApiError) as info:
        detector.admit(None, "http")
    assert info.value.code is ErrorCode.UNAUTHENTICATED
    with pytest.raises(ApiError) as info:
        _detect(detector, _jpeg(64, 64), "secret", tier="realtime")
    assert info.value.code is ErrorCode.FORBIDDEN
    detector.admit("secret", "http")  # the second token of the burst of 2
    with pytest.raises(ApiError) as info:  # the burst is spent (1 more per second)
        detector.admit("secret", "http")
    assert info.value.code is ErrorCode.RATE_LIMITED and info.value.retry_after_s >= 1
    text = generate_latest(detector.metrics.registry).decode()
    assert 'outcome="unauthorized"' in text and 'outcome="rate_limited"' in text


def test_a_grant_holds_whatever_the_options_name(tmp_path):
    (tmp_path / "tiers.yaml").write_text(
        f"default: wide\ntiers:\n  narrow: {{budget_ms: 5000, models: [{D0}]}}\n"
        f"  wide: {{budget_ms: 9000, models: [{D0}, {SHAPES}]}}\n")
    keys = f"keys:\n  - {{name: app, sha256: {hash_key('secret')}, tiers: [narrow]}}\n"
    detector, _ = _detector(tmp_path, keys, tiers_file=tmp_path / "tiers.yaml")
    # No tier, or a bare budget: routed in the key's tier, never the default's models.
    assert _detect(detector, _jpeg(64, 64), "secret").routing.tier == "narrow"
    assert _detect(detector, _jpeg(64, 64), "secret", sla_ms=4000).model == D0
    for options in ({"sla_ms": 600_000}, {"model": SHAPES}, {"tier": "wide"}):
        with pytest.raises(ApiError) as info:
            _detect(detector, _jpeg(64, 64), "secret", **options)
        assert info.value.code is ErrorCode.FORBIDDEN, options
    # Classes only the shapes model knows cannot lead out of the grant either.
    with pytest.raises(ApiError) as info:
        _detect(detector, _jpeg(64, 64), "secret", classes=["circle"])
    assert info.value.code is ErrorCode.MODEL_NOT_READY  # none of its models has them


def test_a_rate_counts_images_not_calls(tmp_path):
    keys = f"keys:\n  - {{name: app, sha256: {hash_key('s')}, rate_per_s: 0.01, burst: 3}}\n"
    detector, _ = _detector(tmp_path, keys)

    async def three_images() -> list[str]:
        caller = detector.admit("s", "http")  # one token: the first image's
        codes = []
        for item in range(4):
            try:
                await detector.detect(caller.restarted(item), _jpeg(64, 64), DetectOptions())
                codes.append("ok")
            except ApiError as exc:
                codes.append(exc.code.value)
        return codes

    assert asyncio.run(three_images()) == ["ok", "ok", "ok", "rate_limited"]


def test_an_unknown_tier_is_counted_under_one_label():
    detector, _ = _detector()
    for n in range(5):
        with pytest.raises(ApiError):
            _detect(detector, _jpeg(64, 64), tier=f"attacker-{n}")
    text = generate_latest(detector.metrics.registry).decode()
    assert "attacker" not in text and 'tier="invalid"' in text


def test_a_failed_call_releases_its_device_ticket_and_is_counted():
    failing = FakeBackend({D0: D0_ROWS})
    detector, _ = _detector(backend=failing)
    failing.fail = ApiError(ErrorCode.TRITON_UNAVAILABLE, "down", retry_after_s=1.0)
    with pytest.raises(ApiError) as info:
        _detect(detector, _jpeg(64, 64), model=D0)
    assert info.value.code is ErrorCode.TRITON_UNAVAILABLE
    assert detector.router.latency.backlog_ms() == 0.0  # nothing left in flight
    text = generate_latest(detector.metrics.registry).decode()
    assert f'model="{D0}",outcome="error",protocol="http"' in text


def test_server_paths_are_shown_to_the_admin_only():
    backend = FakeBackend({D0: D0_ROWS, SHAPES: _rows()},
                          {SHAPES: {"weights": "file /srv/tierdet/weights/x.pt"}})
    detector, _ = _detector(backend=backend)
    public = {m.name: m for m in detector.models().models}
    admin = {m.name: m for m in detector.models(admin=True).models}
    assert admin[SHAPES].weights == "file /srv/tierdet/weights/x.pt"
    assert public[SHAPES].weights == "file x.pt"
    assert public[D0].weights == admin[D0].weights  # nothing to hide in a seed


def test_the_router_ranks_a_model_by_the_ap_its_weights_measured():
    backend = FakeBackend({D0: D0_ROWS, SHAPES: _rows()},
                          {SHAPES: {"weights": "file weights/x.pt", "measured_ap": "0.8480",
                                    "measured_on": "shapes-v2-seed0:shapes-256"}})
    detector, _ = _detector(backend=backend)
    infos = {m.name: m for m in detector.models().models}
    assert infos[SHAPES].routing_ap == 84.8 and infos[SHAPES].published_coco_ap is None
    assert infos[SHAPES].measured_ap == {"shapes-v2-seed0:shapes-256": 0.848}
    # Random weights find nothing real: they rank 0, not their published 34.2 AP.
    assert infos[D0].routing_ap == 0.0 and infos[D0].published_coco_ap == 34.2
    assert detector.router.ap[SHAPES] == 84.8


@pytest.mark.parametrize("provenance,pinned,expected", [
    ({"weights": "random (seed 0): NOT trained"}, False, 0.0),
    ({"weights": "random (seed 0): NOT trained"}, True, 34.2),
    ({"weights": "official", "weights_digest_check": "sha256"}, False, 34.2),
    ({"weights": "file /x.pth",
      "weights_sha256": SPECS[D0].official_weights.sha256}, False, 34.2),  # the same file
    ({"weights": "file /x.pth", "weights_sha256": "0" * 64}, False, 0.0),
    ({"weights": "file /x.pth", "measured_ap": "0.2500", "measured_on": "mine"}, False, 25.0),
])
def test_the_published_ap_counts_only_for_the_published_weights(provenance, pinned, expected):
    backend = FakeBackend({D0: D0_ROWS}, {D0: provenance})
    detector, _ = _detector(backend=backend, pin_published_ap=pinned)
    assert detector.router.ap[D0] == expected


def test_a_model_being_measured_counts_as_the_slowest_known_model_not_a_second():
    """The catalog measures each model it has no profile for before ranking it. The
    calls count as work on the device, at the slowest known model's time until
    timed: the unknown model's prior (a second) would refuse every budgeted
    request for the measurement's length."""
    backlogs: dict[str, list[float]] = {}

    class Watched(FakeBackend):
        async def infer(self, model, images, timeout_s, priority=0):
            latency = detector.router.latency
            backlogs.setdefault(model, []).append(max(latency.own_ms(e)
                                                      for e in latency.busy_until))
            return await super().infer(model, images, timeout_s, priority)

    backend = Watched({D0: D0_ROWS, SHAPES: _rows((0, 0, 128, 128, 0.9, 1))})
    detector = Detector(Settings(models=(D0, SHAPES)), backend, Metrics())
    asyncio.run(detector.catalog.refresh())
    first, second = backlogs  # the first is measured with nothing known: the prior
    assert len(backlogs[second]) == 3 and max(backlogs[second]) < UNKNOWN_SERVICE_MS / 10
    assert [images[0] for model, images in backend.calls if model == second] == [
        1, 1, PROBE_BATCH]
    assert detector.router.profiled(first) and detector.router.profiled(second)


def test_the_models_answer_lists_tiers_with_the_default_marked():
    detector, _ = _detector()
    served = detector.models()
    assert served.default_tier == "balanced"
    assert [(t.name, t.default) for t in served.tiers] == [
        ("realtime", False), ("balanced", True), ("accurate", False)]
    assert COCO90.category_id("traffic light") == 10


class ViewBackend(FakeBackend):
    """Answers, for each view of a batch, the rows ``answer(view, size)`` gives."""

    def __init__(self, answer) -> None:
        super().__init__({D0: _rows()})
        self.answer = answer

    async def infer(self, model, images, timeout_s, priority=0):
        self.calls.append((model, images.shape))
        return np.stack([self.answer(i, len(images)) for i in range(len(images))])


def test_a_box_in_the_overlap_of_tiles_comes_back_once_at_its_place():
    from tierdet.serving import imaging, tiling

    width, height = 2048, 1024
    truth = np.array([[1300.0, 300.0, 1360.0, 360.0]])  # in 4 tiles (none at x 0), whole view
    tiles = tiling.plan(width, height, 512, 7)
    prep = SPECS[D0].preprocessing
    views = [imaging.prepare(np.zeros((height, width, 3), np.uint8), 512, prep)[1]] + [
        imaging.prepare(np.zeros((t.height, t.width, 3), np.uint8), 512, prep)[1]
        for t in tiles]
    corners = [(0, 0)] + [(t.x, t.y) for t in tiles]
    holders = [i for i, (x, y) in enumerate(corners) if i == 0 or (
        x <= truth[0, 0] and truth[0, 2] <= x + tiles[i - 1].width and
        y <= truth[0, 1] and truth[0, 3] <= y + tiles[i - 1].height)]
    assert len(holders) >= 3  # the whole view and at least two overlapping tiles

    def answer(view: int, count: int) -> np.ndarray:
        # One batch: the whole view, then every tile (or the latency probe's
        # batches when the model is first seen).
        assert count in (1, PROBE_BATCH, 1 + len(tiles))
        if view not in holders:
            return _rows()
        geometry, (x, y) = views[view], corners[view]
        scale = np.array([geometry.scale_x, geometry.scale_y] * 2)
        offset = np.array([geometry.offset_x, geometry.offset_y] * 2)
        box = (truth - [x, y, x, y]) * scale + offset  # the view's input pixels
        # The tiles see it larger and sharper: they score it higher than the whole view.
        return _rows((*box[0], 0.9 if view else 0.6, PERSON))

    detector, _ = _detector(backend=ViewBackend(answer))
    result = _detect(detector, _jpeg(width, height), model=D0, tile="auto", sla_ms=60000,
                     score_threshold=0.1)
    assert result.routing.tiles == len(tiles) >= 2
    (found,) = result.detections
    assert np.abs(np.array(found.box) - truth[0]).max() <= 2.0
    assert found.score == pytest.approx(0.9) and found.class_name == "person"
    # Off: one view, no tiles asked of Triton.
    plain = _detect(detector, _jpeg(width, height), model=D0, sla_ms=60000)
    assert plain.routing.tiles == 0


@pytest.mark.parametrize("code", [ErrorCode.DEADLINE_EXCEEDED, ErrorCode.INFERENCE_FAILED,
                                  ErrorCode.TRITON_UNAVAILABLE])
def test_a_failed_image_is_an_access_log_line_with_its_code(tmp_path, code):
    # The outcomes the real stack cannot be made to give on demand (timeout, error);
    # the others are pinned on a real gateway in test_access.py.
    import json

    from tierdet.serving import access

    log = tmp_path / "access.jsonl"
    backend = FakeBackend({D0: D0_ROWS}, fail=ApiError(code, "as asked"))
    detector, _ = _detector(backend=backend, access_log=str(log))

    async def run():
        with access.call("fails", "grpc", "Detect"):
            caller = detector.admit(None, "grpc")
            with pytest.raises(ApiError):
                await detector.detect(caller, _jpeg(64, 64),
                                      DetectOptions(model=D0, sla_ms=60000))

    asyncio.run(run())
    (line,) = map(json.loads, log.read_text().splitlines())
    assert (line["request_id"], line["code"]) == ("fails", code.value)
    assert line["status"] == code.kind.grpc_status and line["model"] == D0


def test_a_cancelled_image_is_logged_as_cancelled(tmp_path):
    import json

    from tierdet.serving import access

    class Hanging(FakeBackend):
        hang = False  # the latency probes at start answer
        reached = asyncio.Event()  # the request is at the backend, waiting

        async def infer(self, model, images, timeout_s, priority=0):
            if self.hang:
                self.reached.set()
                await asyncio.Event().wait()
            return await super().infer(model, images, timeout_s, priority)

    log = tmp_path / "access.jsonl"
    backend = Hanging({D0: D0_ROWS})
    detector, _ = _detector(backend=backend, access_log=str(log))
    backend.hang = True

    async def run():
        with access.call("gone", "grpc", "Detect"):
            caller = detector.admit(None, "grpc")
            task = asyncio.create_task(detector.detect(
                caller, _jpeg(64, 64), DetectOptions(model=D0, sla_ms=60000)))
            await backend.reached.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(run())
    (line,) = map(json.loads, log.read_text().splitlines())
    assert (line["code"], line["status"]) == ("cancelled", "CANCELLED")


def test_estimates_of_a_retired_model_or_an_endpoint_that_left_leave_the_metrics():
    metrics = Metrics()
    metrics.observe_queues({}, {("a", "e1"): 20.0, ("a", "e2"): 30.0, ("b", "e1"): 10.0,
                                ("b", "e2"): 40.0})
    metrics.drop_route_service(endpoint="e1")
    metrics.drop_route_service(model="a")
    shown = [line for line in generate_latest(metrics.registry).decode().splitlines()
             if line.startswith("tierdet_route_service_seconds{")]
    assert shown == ['tierdet_route_service_seconds{endpoint="e2",model="b"} 0.04']

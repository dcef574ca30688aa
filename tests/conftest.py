"""Shared fixtures: the real stack (built model, tritonserver, gateway), started once.

Everything listens on 127.0.0.1 on free ports. Built models are cached in
``TIERDET_TEST_HOME`` (default: <repo>/.cache/test-home; one per xdist worker)
so local reruns skip the export; CI starts from a clean clone and builds once.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from corpus import MAX_IMAGE_BYTES
from corpus import encode as encode  # re-exported (tests import both from here)
from corpus import photos as photos
from tierdet.devstack.stack import GatewayProcess, start_triton
from tierdet.devstack.triton import API_KEY_ENV, LocalTriton

REPO = Path(__file__).resolve().parents[1]
# Torch's OpenMP threads (libgomp) spin while they wait for each other. On 2 cores
# shared with anything else (the tests' own Triton and gateways, another job on
# the host), a spinning thread holds the core the thread it waits for needs, and
# each of thousands of small ops waits a scheduler slice: DAMO-YOLO's 25 loss
# steps in test_synthetic_training took 112 s beside a load of 4, 7.5 s with the
# threads sleeping instead. libgomp reads this once, when torch loads, so it is
# set before any import of torch; the processes the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Triton's control plane is closed by default (devstack.triton): every Triton and
# every gateway this test run starts share one key, as a `tierdet up` stack does.
os.environ.setdefault(API_KEY_ENV, secrets.token_urlsafe(24))
# Shadow scoring re-runs a sample of answers on another model: off in every test
# gateway (their Triton counts and timings stay the tests' own) but those of
# tests/test_shadow.py, which turn it on.
os.environ.setdefault("TIERDET_SHADOW_SAMPLE", "0")
TEST_MODEL = "efficientdet-d0"
TEST_WEIGHTS = "random:0"


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_session() -> Iterator[None]:
    """Whatever a test started (a gateway, its workers, a tritonserver, a load
    tool) ends with the session, even when the test failed before its own stop.
    As a subreaper, pytest adopts descendants whose parent died: none escapes
    to init."""
    import ctypes

    import psutil

    pr_set_child_subreaper = 36
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1)
    yield
    left = psutil.Process().children(recursive=True)
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=20)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


@pytest.fixture(scope="session")
def home() -> Path:
    """The built models' cache. Each pytest-xdist worker past the first has its
    own (``test-home-gw1``, ...): a build and a repository's install write files
    in place, and another worker's Triton could load one half written."""
    path = Path(os.environ.get("TIERDET_TEST_HOME", REPO / ".cache" / "test-home"))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    if worker != "gw0":
        path = path.with_name(f"{path.name}-{worker}")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def built_d0(home: Path):
    """EfficientDet-D0 exported with deterministic random weights (seed 0)."""
    from tierdet.build.models import ensure_built
    from tierdet.build.weights import WeightsSource

    (model,) = ensure_built([TEST_MODEL], WeightsSource.parse(TEST_WEIGHTS), home,
                            progress=False)
    return model


@dataclass
class Triton:
    grpc_url: str
    http_url: str
    metrics_url: str
    repository: Path
    server: LocalTriton

    @property
    def endpoint(self) -> str:
        """The server as a gateway's ``TIERDET_TRITON_URL`` (its metrics port too)."""
        return self.server.endpoint


@pytest.fixture(scope="session")
def triton(home: Path, built_d0, tmp_path_factory) -> Iterator[Triton]:
    server = start_triton([built_d0], home, tmp_path_factory.mktemp("triton"), threads=2)
    try:
        yield Triton(server.grpc_url, server.http_url,
                     f"http://127.0.0.1:{server.metrics_port}/metrics", server.repository,
                     server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gateway(triton: Triton, tmp_path_factory) -> Iterator[GatewayProcess]:
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    # A small byte limit keeps the 413 test cheap (the bad-input corpus is sized to it).
    gw = GatewayProcess.start(triton.endpoint, log, max_image_bytes=str(MAX_IMAGE_BYTES))
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="session")
def client(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.http, timeout=30.0) as c:
        yield c


@pytest.fixture(scope="session")
def busy_gateway(triton: Triton, tmp_path_factory) -> Iterator[GatewayProcess]:
    """A second gateway (same Triton) for tests that load it concurrently: batches,
    streams. Its router learns latencies under that load; kept apart, what it
    learns cannot shed other tests' requests on the default 500 ms tier."""
    log = tmp_path_factory.mktemp("busy-gateway") / "gateway.log"
    gw = GatewayProcess.start(triton.endpoint, log, max_image_bytes=str(MAX_IMAGE_BYTES))
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="session")
def busy_client(busy_gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=busy_gateway.http, timeout=30.0) as c:
        yield c


def triton_key() -> dict[str, str]:
    """The gRPC header of this run's key for Triton's restricted APIs."""
    from tierdet.serving.triton import GRPC_KEY_HEADER

    return {GRPC_KEY_HEADER: os.environ[API_KEY_ENV]}


def regions_of(triton_url: str, gateway: GatewayProcess) -> list[str]:
    """The shared-memory regions Triton holds for ``gateway``'s process."""
    import tritonclient.grpc as triton_grpc

    with triton_grpc.InferenceServerClient(triton_url) as client:
        status = client.get_system_shared_memory_status(as_json=True, headers=triton_key())
    prefix = f"tierdet_{gateway.process.pid}_"
    return [name for name in status.get("regions", {}) if name.startswith(prefix)]


def with_changes(raw: dict, changes: dict) -> dict:
    """``raw`` (a card's mapping) with ``changes`` set in place: dotted keys
    (``input.size``), None deletes the key."""
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return raw


ZOO = ("efficientdet-d0", "efficientdet-d1", "damoyolo-ns", "damoyolo-t")


@pytest.fixture(scope="session")
def zoo_built(home: Path):
    """The four small models CI builds end to end (random weights, seed 0)."""
    from tierdet.build.models import ensure_built
    from tierdet.build.weights import WeightsSource

    return ensure_built(ZOO, WeightsSource.parse(TEST_WEIGHTS), home, progress=False)


@pytest.fixture(scope="session")
def zoo_triton(zoo_built, tmp_path_factory) -> Iterator[LocalTriton]:
    work = tmp_path_factory.mktemp("zoo-triton")
    server = start_triton(zoo_built, work / "home", work, threads=2, timeout_s=300.0)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def zoo_gateway(zoo_triton: LocalTriton, tmp_path_factory) -> Iterator[GatewayProcess]:
    log = tmp_path_factory.mktemp("zoo-gateway") / "gateway.log"
    # Random weights rank 0 by default; the routing tests need the published AP.
    gw = GatewayProcess.start(zoo_triton.endpoint, log, timeout_s=180.0,
                              pin_published_ap="true")
    try:
        yield gw
    finally:
        gw.stop()


# The real COCO ladder (what `tierdet up` serves by default, and NanoDet-m, asked
# for), then a fine-tuned DAMO-YOLO-Ns with its own classes.
LADDER = (REPO / "examples" / "cards" / "yolox-nano.yaml",
          REPO / "examples" / "cards" / "picodet-s.yaml",
          REPO / "examples" / "cards" / "more" / "nanodet-m.yaml")
CARDS = (*LADDER, REPO / "examples" / "cards" / "fine-tuned" / "shapes-ns.yaml")
LADDER_MODELS = ("yolox-nano-320", "yolox-nano-416", "picodet-s-320", "picodet-s-416",
                 "nanodet-m-320", "nanodet-m-416")


@pytest.fixture(scope="session")
def cards_built(home):
    """Every card's models: the ladder's six (real COCO weights), then shapes-ns."""
    from tierdet.build.models import ensure_cards

    return ensure_cards(CARDS, home)


@pytest.fixture(scope="session")
def card_evals(tmp_path_factory) -> Path:
    """The card stack's evaluation folder (``TIERDET_EVAL_DIR``)."""
    return tmp_path_factory.mktemp("card-evals")


@pytest.fixture(scope="session")
def card_stack(cards_built, built_d0, home, card_evals, tmp_path_factory
               ) -> Iterator[GatewayProcess]:
    """D0 (random weights) with every card's model: one stack for the ladder's AP
    test and the card tests."""
    work = tmp_path_factory.mktemp("cards")
    triton = start_triton([built_d0, *cards_built], home, work, threads=2)
    gateway = GatewayProcess.start(triton.endpoint, work / "gateway.log",
                                   cards=",".join(map(str, CARDS)), eval_dir=str(card_evals))
    try:
        yield gateway
    finally:
        gateway.stop()
        triton.stop()

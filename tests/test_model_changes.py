"""Models that change while serving, through the admin API, on the real stack.

Two tritonservers (explicit model control) reading one repository and serving
D0; one gateway with both in its pool and an admin credential; a cards folder
holding YOLOX-Nano's real graph; a model home of its own. A card PUT is
built, loaded on both, measured and routed to; a second PUT replaces it while
pinned requests keep coming, a DELETE retires it while they still come: every
request answers 200 or, once the model is gone, a clear 422. Bad cards, paths
out of the folder, digest mismatches and callers' keys are refused with their
codes, and the serving set stays as it was.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import yaml
from conftest import REPO, TEST_MODEL, encode, photos, triton_key, with_changes
from tierdet import cli
from tierdet.devstack.stack import GatewayProcess, start_triton
from tierdet.devstack.triton import LocalTriton
from tierdet.serving.changes import BUILD_NICENESS
from waiting import wait_until

ADMIN_KEY = "admin-key-of-the-model-changes-test"
CALLER_KEY = "a-callers-api-key"
GRAPH = REPO / "weights" / "yolox-nano" / "yolox_nano.onnx"
GRAPH_SHA = hashlib.sha256(GRAPH.read_bytes()).hexdigest()
ADMIN = {"X-Admin-Key": ADMIN_KEY}
CALLER = {"Authorization": f"Bearer {CALLER_KEY}"}


@dataclass
class Stack:
    tritons: list[LocalTriton]
    gateway: GatewayProcess
    cards: Path
    http: httpx.Client


def caller_keys(work: Path) -> Path:
    """The gateway's API keys file: one caller, ``CALLER_KEY``."""
    keys = work / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [
        {"name": "caller", "sha256": hashlib.sha256(CALLER_KEY.encode()).hexdigest()}]}))
    return keys


@pytest.fixture(scope="module")
def stack(built_d0, tmp_path_factory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("changes")
    cards = work / "cards"
    cards.mkdir()
    shutil.copy(GRAPH, cards / "yolox_nano.onnx")
    os.symlink(GRAPH, cards / "outside.onnx")  # a link out of the folder
    keys = caller_keys(work)
    tritons: list[LocalTriton] = []
    try:
        for server in ("a", "b"):  # a pool of two: every change reaches both
            tritons.append(start_triton([built_d0], work / "home", work / server, threads=1))
        gateway = GatewayProcess.start(
            ",".join(t.endpoint for t in tritons), work / "gateway.log",
            api_keys_file=str(keys),
            admin_key_sha256=hashlib.sha256(ADMIN_KEY.encode()).hexdigest(),
            cards_dir=str(cards), home=str(work / "home"),
            # A folder of cards served while they are there, read every 0.2 s.
            cards_watch=str(cards / "live"), cards_watch_s="0.2",
            # Every pixel decoded: a request spends a while in the gateway before it
            # reaches Triton, the time a retirement must wait for.
            decode_scale="full")
        try:
            with httpx.Client(base_url=gateway.http, timeout=300.0) as http:
                yield Stack(tritons, gateway, cards, http)
        finally:
            gateway.stop()
    finally:
        for triton in tritons:
            triton.stop()


def card(name: str, **changes) -> str:
    """A YOLOX-Nano card at 320 px whose graph is the cards folder's copy."""
    raw: dict = {
        "name": name, "source": {"onnx": "yolox_nano.onnx", "sha256": GRAPH_SHA},
        "input": {"size": 320, "channels": "BGR", "resize": "letterbox"},
        "output": {"format": "yolox", "strides": [8, 16, 32]},
        "classes": "coco80", "nms_iou": 0.6, "pre_nms_top_k": 1000,
        "licence": "Apache-2.0", "provenance": "tests/test_model_changes.py"}
    return yaml.safe_dump(with_changes(raw, changes))


def served(stack: Stack) -> dict[str, bool]:
    models = stack.http.get("/v1/models", headers=CALLER).json()["models"]
    return {m["name"]: m["ready"] for m in models}


def admin_states(stack: Stack) -> dict[str, str]:
    answer = stack.http.get("/admin/models", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    return {m["name"]: m["state"] for m in answer.json()["models"]}


def triton_versions(stack: Stack, model: str) -> list[dict[str, str]]:
    """Per Triton of the pool: version -> state of ``model`` as its repository index says."""
    out = []
    for triton in stack.tritons:
        with triton_grpc.InferenceServerClient(triton.grpc_url) as client:
            index = client.get_model_repository_index(as_json=True, headers=triton_key())
        out.append({m.get("version", ""): m.get("state", "") for m in index.get("models", [])
                    if m["name"] == model})
    return out


def detect(http: httpx.Client, model: str, photo: bytes | None = None) -> httpx.Response:
    return http.post("/v1/detect", params={"model": model},
                     headers={**CALLER, "Content-Type": "image/jpeg"},
                     content=photo or PHOTO, timeout=60.0)


PHOTO = encode(photos()["astronaut"])
# 4096 x 4096 pixels: tens of milliseconds of decoding before each call to Triton.
LARGE_PHOTO = encode(np.tile(photos()["astronaut"], (8, 8, 1)))


class Traffic:
    """Pinned requests from threads until stopped; every answer's status and code."""

    def __init__(self, base_url: str, model: str, photo: bytes, threads: int = 3) -> None:
        self.answers: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._send, args=(base_url, model, photo))
                         for _ in range(threads)]

    def _send(self, base_url: str, model: str, photo: bytes) -> None:
        with httpx.Client(base_url=base_url, timeout=60.0) as http:
            while not self._stop.is_set():
                answer = detect(http, model, photo)
                code = "" if answer.status_code == 200 else answer.json()["error"]["code"]
                with self._lock:
                    self.answers.append((answer.status_code, code))

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def count(self) -> int:
        with self._lock:
            return len(self.answers)


def test_the_admin_api_takes_the_admin_credential_only(stack: Stack):
    before = served(stack)
    for headers in ({}, CALLER, {"X-Admin-Key": CALLER_KEY}, {"X-Admin-Key": "wrong"}):
        for method, path, body in (("GET", "/admin/models", None),
                                   ("PUT", "/admin/models/sneaky", card("sneaky")),
                                   ("DELETE", f"/admin/models/{TEST_MODEL}", None)):
            answer = stack.http.request(method, path, headers=headers, content=body)
            assert answer.status_code == 403, (method, headers, answer.text)
            assert answer.json()["error"]["code"] == "admin_required"
    assert served(stack) == before
    assert admin_states(stack) == {TEST_MODEL: "serving"}


def test_without_an_admin_credential_configured_there_is_no_admin_api(client):
    """The session's plain gateway: no TIERDET_ADMIN_KEY_SHA256."""
    for headers in ({}, {"X-Admin-Key": ADMIN_KEY}):
        answer = client.get("/admin/models", headers=headers)
        assert answer.status_code == 403
        assert answer.json()["error"]["code"] == "admin_required"
        assert "no admin credential is configured" in answer.json()["error"]["message"]


@pytest.mark.parametrize("name, body, code", [
    ("bad", "name: [unclosed", "invalid_card"),
    ("bad", card("bad", licence=""), "invalid_card"),
    ("bad", card("other"), "invalid_card"),  # the URL names another model
    ("bad", card("bad", source={"onnx": "yolox_nano.onnx"}), "invalid_card"),  # no digest
    ("bad", card("bad", **{"source.sha256": "0" * 64}), "digest_mismatch"),
    ("bad", card("bad", **{"source.onnx": str(GRAPH)}), "card_path_refused"),
    ("bad", card("bad", **{"source.onnx": "../cards/yolox_nano.onnx"}), "card_path_refused"),
    ("bad", card("bad", **{"source.onnx": "outside.onnx"}), "card_path_refused"),
    ("bad", card("bad", **{"source.onnx": "missing.onnx"}), "graph_not_found"),
    (TEST_MODEL, card(TEST_MODEL), "model_conflict"),  # a shipped model's name
])
def test_a_bad_card_is_refused_and_the_serving_set_stays(stack: Stack, name, body, code):
    before = served(stack)
    answer = stack.http.put(f"/admin/models/{name}", headers=ADMIN, content=body)
    assert answer.status_code in (409, 422), answer.text
    assert answer.json()["error"]["code"] == code, answer.text
    assert served(stack) == before
    assert "bad" not in admin_states(stack)


def test_a_card_that_does_not_fit_its_graph_fails_its_build_and_changes_nothing(stack):
    before = served(stack)
    # Two strides where the graph has three levels: the build's run of the graph finds it.
    answer = stack.http.put("/admin/models/misfit", headers=ADMIN,
                            content=card("misfit", **{"output.strides": [8, 16]}))
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "invalid_card"
    assert "strides" in answer.json()["error"]["message"]
    assert served(stack) == before
    assert admin_states(stack)["misfit"] == "failed"
    assert triton_versions(stack, "misfit") == [{}, {}]  # nothing was installed


def test_add_replace_and_retire_while_requests_keep_coming(stack: Stack):
    name = "hot-yolox"
    # Add: built, loaded, measured, routed to.
    added = stack.http.put(f"/admin/models/{name}", headers=ADMIN, content=card(name))
    assert added.status_code == 200, added.text
    assert added.json()["models"] == [{"name": name, "state": "serving", "reason": "",
                                       "card": name, "canary": None}]
    assert served(stack)[name] is True
    answer = detect(stack.http, name)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == name
    assert any(d["class_name"] == "person" for d in answer.json()["detections"])
    assert triton_versions(stack, name) == [{"1": "READY"}, {"1": "READY"}]

    # A replacement that changes the input the gateway prepares is refused.
    refused = stack.http.put(f"/admin/models/{name}", headers=ADMIN,
                             content=card(name, **{"input.size": 416}))
    assert refused.json()["error"]["code"] == "model_conflict", refused.text
    assert served(stack)[name] is True
    # A replacement whose build fails leaves the old version serving.
    misfit = stack.http.put(f"/admin/models/{name}", headers=ADMIN,
                            content=card(name, **{"output.strides": [8, 16]}))
    assert misfit.json()["error"]["code"] == "invalid_card", misfit.text
    (state,) = [m for m in stack.http.get("/admin/models", headers=ADMIN).json()["models"]
                if m["name"] == name]
    assert state["state"] == "serving"
    assert state["reason"].startswith("the replacement failed: ")
    assert detect(stack.http, name).status_code == 200
    assert triton_versions(stack, name) == [{"1": "READY"}, {"1": "READY"}]

    # Replace under load: the old version answers until the new one serves.
    # One sender: requests are in flight all along, and the build keeps a core.
    with Traffic(stack.gateway.http, name, PHOTO, threads=1) as traffic:
        wait_until(lambda: traffic.count() >= 3, "requests answered before the replacement")
        with ThreadPoolExecutor(1) as admin:  # the admin waits; GET shows the steps
            put = admin.submit(httpx.put, f"{stack.gateway.http}/admin/models/{name}",
                               headers=ADMIN, content=card(name, nms_iou=0.5), timeout=300.0)
            wait_until(lambda: admin_states(stack)[name] == "building", "the build")
            # The build yields the cores to serving: a child of lower priority (as the
            # gateway read it back from the kernel: the build is over in a second).
            line = wait_until(lambda: re.search(r"building \S+: pid \d+ at niceness (-?\d+)",
                                                stack.gateway.log.read_text()),
                              "the build's start in the gateway's log")
            assert int(line.group(1)) == BUILD_NICENESS
            replaced = put.result()
        assert replaced.status_code == 200, replaced.text
        assert admin_states(stack)[name] == "serving"
        seen = traffic.count()
        wait_until(lambda: traffic.count() >= seen + 3, "requests answered after it")
    assert {status for status, _ in traffic.answers} == {200}, traffic.answers
    wait_until(lambda: all(v.get("2") == "READY" and v.get("1") != "READY"
                           for v in triton_versions(stack, name)), "version 2 alone, on both")

    # Retire under load: what was routed finishes, then the model is unknown. Large
    # photos keep requests in the gateway (decoding) for a while before Triton.
    with Traffic(stack.gateway.http, name, LARGE_PHOTO) as traffic:
        wait_until(lambda: traffic.count() >= 3, "requests answered before the retirement")
        retired = stack.http.delete(f"/admin/models/{name}", headers=ADMIN)
        assert retired.status_code == 200, retired.text
        seen = traffic.count()
        wait_until(lambda: traffic.count() >= seen + 3, "requests answered after it")
    outcomes = set(traffic.answers)
    assert outcomes <= {(200, ""), (422, "unknown_model")}, outcomes
    assert (200, "") in outcomes and (422, "unknown_model") in outcomes
    gone = detect(stack.http, name)
    assert gone.status_code == 422 and gone.json()["error"]["code"] == "unknown_model"
    assert name not in served(stack)
    assert admin_states(stack)[name] == "retired"
    wait_until(lambda: all("READY" not in v.values() for v in triton_versions(stack, name)),
               "both Tritons to unload it")
    unknown = stack.http.delete(f"/admin/models/{name}", headers=ADMIN)
    assert unknown.json()["error"]["code"] == "unknown_model"


def drop(folder: Path, name: str, text: str) -> None:
    """Write a card file as a copy tool should: whole, then renamed in place."""
    folder.mkdir(exist_ok=True)
    (folder / f".{name}").write_text(text)
    (folder / f".{name}").replace(folder / name)


def admin_reason(stack: Stack, name: str) -> str:
    answer = stack.http.get("/admin/models", headers=ADMIN).json()["models"]
    return next((m["reason"] for m in answer if m["name"] == name and m["state"] == "failed"),
                "")


def test_cards_in_the_watched_folder_are_served_replaced_and_retired(stack: Stack):
    live = stack.cards / "live"
    drop(live, "folder-hot.yaml", card("folder-hot"))
    wait_until(lambda: served(stack).get("folder-hot"), "the folder's card to serve")
    assert detect(stack.http, "folder-hot").status_code == 200

    # A file that is no card, and a card whose graph is not there yet: each shown as
    # failed, with its file named; nothing else changes.
    drop(live, "broken.yaml", "name: broken\nsource: [not, a, source]\n")
    late = yaml.safe_load(card("late"))
    late["source"]["onnx"] = "late.onnx"
    drop(live, "late.yaml", yaml.safe_dump(late))
    assert "broken.yaml" in wait_until(lambda: admin_reason(stack, "broken"), "broken's failure")
    assert "late.onnx" in wait_until(lambda: admin_reason(stack, "late"), "late's failure")
    assert detect(stack.http, "folder-hot").status_code == 200
    # The graph arrives after its card: tried again without the card changing.
    shutil.copy(GRAPH, stack.cards / "late.onnx")
    wait_until(lambda: served(stack).get("late"), "the late card to serve once its graph is in")

    # A changed file replaces its model: a new version, on both Tritons.
    drop(live, "folder-hot.yaml", card("folder-hot", nms_iou=0.5))
    wait_until(lambda: all(v.get("2") == "READY" for v in triton_versions(stack, "folder-hot")),
               "version 2 of the folder's card")
    assert detect(stack.http, "folder-hot").status_code == 200

    # A Triton that restarts loads only what it was started with: the gateway loads
    # the folder's models there again.
    restarted = stack.tritons[1]
    restarted.stop()
    restarted.start()
    restarted.wait_ready()
    wait_until(lambda: triton_versions(stack, "folder-hot")[1].get("2") == "READY",
               "the folder's card loaded again on the restarted Triton")

    # Files that go retire their models; the failed one leaves nothing behind.
    for name in ("folder-hot.yaml", "late.yaml", "broken.yaml"):
        (live / name).unlink()
    wait_until(lambda: not {"folder-hot", "late"} & set(served(stack)), "the cards retired")
    wait_until(lambda: "broken" not in admin_states(stack), "broken's failure forgotten")
    gone = detect(stack.http, "folder-hot")
    assert gone.status_code == 422 and gone.json()["error"]["code"] == "unknown_model"
    # Built by the gateway, gone from the repository: a restarted Triton cannot load it.
    repository = stack.cards.parent / "home" / "repository" / "cpu-local"
    assert not (repository / "folder-hot").exists() and not (repository / "late").exists()
    assert (repository / TEST_MODEL).is_dir()  # what the stack started with stays


def test_the_cli_lists_adds_and_retires(stack: Stack, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TIERDET_ADMIN_KEY", ADMIN_KEY)
    url = ["--url", stack.gateway.http]
    path = tmp_path / "cli-yolox.yaml"
    path.write_text(card("cli-yolox"))
    assert cli.main(["admin", "models", "put", str(path), *url]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["cli-yolox", "serving",
                                                               "cli-yolox"]
    assert cli.main(["admin", "models", "list", *url]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert rows["cli-yolox"] == ["serving", "cli-yolox"]
    assert rows[TEST_MODEL] == ["serving", "-"]
    assert detect(stack.http, "cli-yolox").status_code == 200
    assert cli.main(["admin", "models", "delete", "cli-yolox", *url]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["cli-yolox", "retired",
                                                               "cli-yolox"]
    path.write_text(card("cli-yolox", **{"source.sha256": "1" * 64}))
    assert cli.main(["admin", "models", "put", str(path), *url]) == 1
    assert capsys.readouterr().err.startswith("error: digest_mismatch: ")
    monkeypatch.setenv("TIERDET_ADMIN_KEY", CALLER_KEY)
    assert cli.main(["admin", "models", "list", *url]) == 1
    assert capsys.readouterr().err.startswith("error: admin_required: ")


def test_a_failed_change_puts_the_repository_back_as_it_was(tmp_path):
    """What a failed add or replacement built is removed (a restarted Triton would
    load it): a new model's folder, a replaced one's new version and config."""
    from tierdet.serving import repository_files

    served = tmp_path / "served"
    (served / "1").mkdir(parents=True)
    (served / "1" / "model.onnx").write_bytes(b"v1")
    (served / "config.pbtxt").write_text("version 1's config")
    was = repository_files.before(tmp_path, ["served", "new"])
    (served / "2").mkdir()  # the failed replacement's build
    (served / "2" / "model.onnx").write_bytes(b"v2")
    (served / "config.pbtxt").write_text("version 2's config")
    (tmp_path / "new" / "1").mkdir(parents=True)  # the failed add's build
    repository_files.put_back(was)
    assert sorted(p.name for p in served.iterdir()) == ["1", "config.pbtxt"]
    assert (served / "config.pbtxt").read_text() == "version 1's config"
    assert (served / "1" / "model.onnx").read_bytes() == b"v1"
    assert not (tmp_path / "new").exists()


def test_a_replacement_that_drops_a_size_is_refused(stack: Stack):
    """A size left out of a card's replacement would serve on with no card: the
    replacement is refused, the card serves as it was."""
    put = stack.http.put("/admin/models/two-sizes", headers=ADMIN,
                         content=card("two-sizes", **{"input.size": [320, 416]}))
    assert put.status_code == 200, put.text
    assert {"two-sizes-320", "two-sizes-416"} <= {n for n, ready in served(stack).items()
                                                  if ready}
    fewer = stack.http.put("/admin/models/two-sizes", headers=ADMIN,
                           content=card("two-sizes", **{"input.size": [320]}))
    assert fewer.status_code == 409, fewer.text
    assert fewer.json()["error"]["code"] == "model_conflict"
    assert "two-sizes-416" in fewer.json()["error"]["message"]
    assert admin_states(stack)["two-sizes-416"] == "serving"
    retired = stack.http.delete("/admin/models/two-sizes", headers=ADMIN)
    assert retired.status_code == 200, retired.text
    assert {m["name"] for m in retired.json()["models"]} == {"two-sizes-320", "two-sizes-416"}


def test_a_folder_card_retired_through_the_admin_api_frees_its_name(stack: Stack):
    """Retired by the admin while its file stays: the file going later is no error,
    and the same card from another file serves again."""
    live = stack.cards / "live"
    drop(live, "once.yaml", card("folder-once"))
    wait_until(lambda: admin_states(stack).get("folder-once") == "serving",
               "the folder's card to serve, its change over")
    assert stack.http.delete("/admin/models/folder-once", headers=ADMIN).status_code == 200
    (live / "once.yaml").unlink()
    drop(live, "again.yaml", card("folder-once"))
    wait_until(lambda: served(stack).get("folder-once"), "the card from its new file")
    (live / "again.yaml").unlink()
    wait_until(lambda: "folder-once" not in served(stack), "the card retired with its file")

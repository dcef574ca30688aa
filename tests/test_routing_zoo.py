"""Budget routing across four real models (two families) on one Triton.

Budgets are derived from the router's own latency estimates (reported in
/v1/models) at the moment of each request, so the tests hold on fast and slow
machines alike. They run alone (not beside another test worker): another
worker's builds change this device's speed from one request to the next.
"""

from __future__ import annotations

import concurrent.futures
import re

import httpx
import pytest
from conftest import encode, photos
from waiting import wait_until

JPEG = encode(photos()["chelsea"])

pytestmark = pytest.mark.alone


@pytest.fixture(scope="module")
def zoo(zoo_gateway):
    with httpx.Client(base_url=zoo_gateway.http, timeout=120.0) as client:
        models = _current(client)
        assert all(m["ready"] for m in models.values()), models
        yield client


def _post(client, **fields):
    return client.post("/v1/detect", files={"image": ("a.jpg", JPEG, "image/jpeg")},
                       data={k: str(v) for k, v in fields.items()})


def _current(client) -> dict[str, dict]:
    """The router's estimates now: they follow the device, so a budget taken from
    the ones read at the module's start may no longer fit."""
    return {m["name"]: m for m in client.get("/v1/models").json()["models"]}


def _fastest(models):
    return min(models.values(), key=lambda m: m["latency_ms"])


def _need(latency_ms: float) -> float:
    """The budget the router needs to pick a model: its latency plus ~10 ms of
    decode and overhead, with the router's margin (15% + 5 ms)."""
    return (latency_ms + 10) * 1.15 + 5


def test_a_tight_budget_gets_the_fastest_model(zoo):
    """Halfway between what the fastest model needs and what the next one needs:
    the zoo's fastest (damoyolo-ns) takes about half the time of the next one,
    so a router that cannot tell them apart fails here.

    A budget this tight is missed now and then on a loaded 2-core machine, and
    the router learns from the miss. So each try takes the budget from the
    router's current estimates (/v1/models), and every try must be decided for
    the fastest model: answered by it, late on it (a 504 names it), or refused
    with it named as the fastest; one of five must answer."""
    client = zoo
    answered = None
    for _ in range(5):
        models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        fastest = _fastest(models)
        nxt = min(m["latency_ms"] for m in models.values() if m is not fastest)
        assert _need(nxt) - _need(fastest["latency_ms"]) >= 10, \
            f"the router's latencies do not separate the models: {models}"
        r = _post(client, sla_ms=round((_need(fastest["latency_ms"]) + _need(nxt)) / 2))
        error = r.json().get("error", {}) if r.status_code != 200 else {}
        if r.status_code == 504:
            assert error["code"] == "deadline_exceeded", r.text
            assert error["message"].startswith(fastest["name"] + ":"), r.text
            continue
        if r.status_code == 503:
            assert error["code"] == "sla_unattainable", r.text
            assert f"(fastest: {fastest['name']}," in error["message"], r.text
            continue
        assert r.status_code == 200, r.text
        answered = r.json()["model"]
        assert answered == fastest["name"], r.json()
        break
    assert answered is not None, "five tight budgets, none answered"


def test_a_loose_budget_gets_the_most_accurate_model(zoo):
    client = zoo
    best = max(_current(client).values(), key=lambda m: m["routing_ap"])
    r = _post(client, sla_ms=round(best["latency_ms"] * 4 + 500))
    assert r.status_code == 200 and r.json()["model"] == best["name"]


def _triton_requests(triton) -> float:
    """Requests Triton has received, all models together (its own counters)."""
    text = httpx.get(triton.metrics_url, timeout=10).text
    return sum(float(v) for v in re.findall(
        r"^nv_inference_(?:request_success|request_failure)\{[^}]*\} (\S+)$", text, re.M))


def test_an_impossible_budget_is_refused_at_once(zoo, zoo_triton):
    """Refused at admission: no model is tried, nothing reaches the device."""
    client = zoo
    before = _triton_requests(zoo_triton)
    r = _post(client, sla_ms=2)
    assert r.status_code == 503 and r.json()["error"]["code"] == "sla_unattainable"
    assert _triton_requests(zoo_triton) == before


def _inflight(client) -> float:
    text = client.get("/metrics").text
    return float(re.search(r"^tierdet_inflight_requests (\S+)$", text, re.M).group(1))


def test_a_busy_device_moves_the_router_to_a_faster_model(zoo, zoo_gateway):
    """Work queued on the big model delays everything on the shared device: a
    budget that fits the big model when idle goes to a faster one while busy."""
    client = zoo
    best = max(_current(client).values(), key=lambda m: m["routing_ap"])
    budget = round(best["latency_ms"] * 1.6 + 40)
    idle = _post(client, sla_ms=budget)
    assert idle.status_code == 200 and idle.json()["model"] == best["name"]

    def pinned(_):
        with httpx.Client(base_url=zoo_gateway.http, timeout=120.0) as c:
            return _post(c, model=best["name"], sla_ms=60_000).status_code

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        backlog = [pool.submit(pinned, i) for i in range(6)]
        # Six sent at once queue at the one instance of the big model, however
        # fast it runs: half of them in flight is a backlog of its service times.
        wait_until(lambda: _inflight(client) >= 3, "requests of the big model in flight")
        busy = _post(client, sla_ms=budget)
        assert [f.result() for f in backlog] == [200] * 6
    assert busy.status_code in (200, 503, 504), busy.text
    if busy.status_code == 200:
        assert busy.json()["model"] != best["name"]
        assert busy.json()["routing"]["predicted_ms"] <= budget
    elif busy.status_code == 504:
        # Routed to a faster model that then missed the deadline (a loaded 2-core
        # machine): still a move, and the 504 names the model it went to.
        error = busy.json()["error"]
        assert error["code"] == "deadline_exceeded", busy.text
        assert not error["message"].startswith(best["name"] + ":"), busy.text
    else:  # nothing fitted behind that backlog: refused, not queued
        assert busy.json()["error"]["code"] == "sla_unattainable"

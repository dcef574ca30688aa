"""The decision rule: which model a budget gets, and when a request is shed."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.registry.profile import LatencyProfile, ModelProfile
from tierdet.registry.specs import SPECS
from tierdet.serving import latency as latency_module
from tierdet.serving.backend import QueueReport, Served
from tierdet.serving.latency import LatencyModel
from tierdet.serving.routing import Router, RouteRequest
from tierdet.serving.tiers import Tier, TierConfig

BASE = SPECS["efficientdet-d0"]
# name -> (published AP, batch-1 ms, batch-8 ms): a CPU-like profile.
ZOO = {"fast": (30.0, 15.0, 120.0), "mid": (35.0, 50.0, 400.0), "slow": (41.0, 110.0, 880.0)}
AP_TABLE = {n: ap for n, (ap, _, _) in ZOO.items()}
TIERS = TierConfig({
    "realtime": Tier("realtime", 70.0, priority=1),
    "balanced": Tier("balanced", 300.0, degrade=True),
    "small-only": Tier("small-only", 1000.0, models=("fast",)),
}, default="balanced")
READY = list(ZOO)


def router(profile: dict | None = None) -> Router:
    prof = LatencyProfile({n: ModelProfile({1: b1, 8: b8}) for n, (_, b1, b8) in
                           (profile or ZOO).items()})
    return Router(AP_TABLE, TIERS, LatencyModel(prof), default_budget_ms=10_000,
                  margin_frac=0.1, margin_ms=5.0, overhead_ms=2.0)


@pytest.mark.parametrize("budget,expected", [(30, "fast"), (70, "mid"), (140, "slow"),
                                             (5000, "slow")])
def test_tighter_budget_gets_a_faster_model(budget, expected):
    d = router().decide(RouteRequest(sla_ms=budget), elapsed_ms=3.0, ready=READY)
    assert d.model == expected and not d.degraded
    assert d.predicted_ms * 1.1 + 5 <= budget


def test_time_already_spent_counts():
    assert router().decide(RouteRequest(sla_ms=140), 3.0, READY).model == "slow"
    assert router().decide(RouteRequest(sla_ms=140), 40.0, READY).model == "mid"


def test_impossible_budget_is_shed_at_once_with_retry_after():
    with pytest.raises(ApiError) as info:
        router().decide(RouteRequest(sla_ms=10), 3.0, READY)
    assert info.value.code is ErrorCode.SLA_UNATTAINABLE
    assert info.value.http_status == 503 and info.value.retry_after_s >= 1


def test_backlog_on_the_shared_device_moves_requests_to_faster_models():
    r = router()
    assert r.decide(RouteRequest(sla_ms=200), 3.0, READY).model == "slow"
    for _ in range(1):
        r.latency.admit("slow")  # one D1-like request in flight: ~110 ms of work
    assert r.decide(RouteRequest(sla_ms=200), 3.0, READY).model == "mid"
    for _ in range(3):
        r.latency.admit("slow")
    with pytest.raises(ApiError):
        r.decide(RouteRequest(sla_ms=200), 3.0, READY)


def test_finished_work_leaves_the_backlog():
    r = router()
    ticket = r.latency.admit("slow")
    assert r.latency.backlog_ms() == pytest.approx(110.0, abs=1.0)
    r.latency.finish(ticket, observed_ms=110.0)
    assert r.latency.backlog_ms() == 0


def test_work_in_flight_runs_down_as_the_device_works():
    """Half-way through a 110 ms request, 55 ms of it is left (not 110)."""
    r = router()
    ticket = r.latency.admit("slow")
    r.latency.admit("mid")  # queued behind it: its 50 ms come after
    assert r.latency.own_ms(now=ticket.admitted_at + 0.055) == pytest.approx(105.0, abs=1.0)
    # Overdue: still in flight, progress unknown: half of the running request is expected.
    assert r.latency.own_ms(now=ticket.admitted_at + 0.5) == pytest.approx(55.0)
    r.latency.finish(ticket, observed_ms=110.0)  # the clock restarts from what is in flight
    assert r.latency.own_ms() == pytest.approx(50.0, abs=1.0)


def test_observed_latency_corrects_the_profile():
    r = router()
    for _ in range(20):  # the machine is twice as slow as profiled
        r.latency.finish(r.latency.admit("mid"), observed_ms=100.0)
    assert r.latency.service_ms("mid") == pytest.approx(100.0, rel=0.05)
    assert r.decide(RouteRequest(sla_ms=70), 3.0, READY).model == "fast"


def test_gpu_like_profile_queues_cheaply():
    r = router({"mid": (35.0, 10.0, 16.0)})  # batch 8 costs 1.6x batch 1
    assert r.latency.marginal_ms("mid") == pytest.approx(2.0)
    first, *_ = [r.latency.admit("mid") for _ in range(8)]
    # The first starts at once (a batch of one, 10 ms); the next 7 batch behind it.
    # Read at the first admission: the clock runs down as time passes (a loaded
    # CI machine took 1.6 ms over the eight admissions).
    assert r.latency.own_ms(now=first.admitted_at) == pytest.approx(10.0 + 7 * 2.0, abs=0.01)
    assert r.latency.backlog_ms() <= 10.0 + 7 * 2.0


def test_default_tier_applies_without_budget_tier_or_model():
    d = router().decide(RouteRequest(), 3.0, READY)
    assert d.tier == "balanced" and d.budget_ms == 300 and d.model == "slow"


def test_tier_budget_priority_and_allowed_models():
    d = router().decide(RouteRequest(tier="realtime"), 3.0, READY)
    assert (d.model, d.priority, d.budget_ms) == ("mid", 1, 70)
    assert router().decide(RouteRequest(tier="small-only"), 3.0, READY).model == "fast"


def test_degrading_tier_serves_the_fastest_model_marked():
    r = router()
    for _ in range(4):
        r.latency.admit("slow")
    d = r.decide(RouteRequest(tier="balanced"), 3.0, READY)
    assert d.degraded and d.model == "fast"


def test_explicit_budget_is_never_degraded():
    r = router()
    for _ in range(4):
        r.latency.admit("slow")
    with pytest.raises(ApiError):
        r.decide(RouteRequest(tier="balanced", sla_ms=100), 3.0, READY)


def test_pinned_model_must_fit_its_budget():
    assert router().decide(RouteRequest(model="slow"), 3.0, READY).model == "slow"
    with pytest.raises(ApiError) as info:
        router().decide(RouteRequest(model="slow", sla_ms=50), 3.0, READY)
    assert info.value.code is ErrorCode.SLA_UNATTAINABLE


def test_transport_deadline_tightens_the_budget():
    d = router().decide(RouteRequest(sla_ms=1000, deadline_ms=70), 3.0, READY)
    assert d.budget_ms == 70 and d.model == "mid"


def test_only_ready_models_are_candidates():
    assert router().decide(RouteRequest(sla_ms=5000), 3.0, ["fast", "mid"]).model == "mid"
    with pytest.raises(ApiError) as info:
        router().decide(RouteRequest(sla_ms=5000), 3.0, [])
    assert info.value.code is ErrorCode.MODEL_NOT_READY


def test_unknown_tier_is_refused():
    with pytest.raises(ApiError) as info:
        router().decide(RouteRequest(tier="platinum"), 3.0, READY)
    assert info.value.code is ErrorCode.UNKNOWN_TIER


def _two_label_sets(extra: dict[str, str]) -> Router:
    """The zoo on COCO, beside a shapes detector whose AP (85) is on its own data."""
    r = router({**ZOO, "shapes": (85.0, 15.0, 120.0)})
    r.ap["shapes"] = 85.0
    r.label_sets.update({"shapes": "shapes", **extra})
    return r


def test_a_request_both_label_sets_could_answer_goes_to_the_default_sets_best():
    r = _two_label_sets({})
    assert r.decide(RouteRequest(sla_ms=5000), 3.0, [*READY, "shapes"]).model == "slow"


def test_a_request_only_one_label_set_can_answer_is_routed_within_it():
    r = _two_label_sets({"shapes-ns": "shapes"})
    r.ap["shapes-ns"] = 80.0
    assert r.decide(RouteRequest(sla_ms=5000), 3.0, ["shapes", "shapes-ns"]).model == "shapes"
    assert r.decide(RouteRequest(model="shapes"), 3.0, [*READY, "shapes"]).model == "shapes"


def test_two_label_sets_none_of_them_the_default_are_refused_not_compared():
    r = _two_label_sets({"fast": "retail", "mid": "retail", "slow": "retail"})
    with pytest.raises(ApiError) as info:
        r.decide(RouteRequest(sla_ms=5000), 3.0, [*READY, "shapes"])
    assert info.value.code is ErrorCode.INVALID_OPTION and info.value.http_status == 422
    assert "retail, shapes" in info.value.message


def test_unprofiled_model_learns_from_observations():
    r = Router(AP_TABLE, TIERS, LatencyModel(LatencyProfile()), default_budget_ms=10_000)
    assert r.latency.service_ms("mid") >= 1000  # unknown: assumed slow
    r.latency.finish(r.latency.admit("mid"), observed_ms=40.0)
    assert r.latency.service_ms("mid") == pytest.approx(40.0)


def test_queueing_does_not_inflate_the_learned_service_time():
    """Answers that waited behind others say little about the model itself."""
    r = Router(AP_TABLE, TIERS, LatencyModel(LatencyProfile()), default_budget_ms=10_000)
    r.latency.finish(r.latency.admit("mid"), observed_ms=40.0)
    tickets = [r.latency.admit("mid") for _ in range(6)]  # a burst
    for i, ticket in enumerate(tickets):
        r.latency.finish(ticket, observed_ms=40.0 * (i + 1))  # each waited for the others
    assert r.latency.service_ms("mid") == pytest.approx(40.0)
    prof = router()
    prof.latency.admit("fast")  # keeps the device busy for every request below
    busy = [prof.latency.admit("mid") for _ in range(6)]
    assert not any(t.idle for t in busy)
    for ticket in busy:
        prof.latency.finish(ticket, observed_ms=ticket.predicted_ms * 3)
    assert prof.latency.service_ms("mid") < 50.0 * 1.6  # slow, bounded drift


def _device(r: Router, served: int, queue_ms_each: float, batch: int, model: str = "mid",
            endpoint: str = "local", run_ms: float = 0.0, executions: int | None = None,
            arrived: int | None = None) -> None:
    """Triton's report after it answered ``served`` more requests of ``model``, each
    after ``queue_ms_each`` in its queue, in executions of ``batch`` images (or
    ``executions`` of them in all) where each request counts ``run_ms`` on the
    device (0: a server that does not say); ``arrived``: every client's requests
    so far (None: not reported)."""
    before = r.latency._served.get((endpoint, model), Served())
    now = Served(before.requests + served, before.queue_us + served * queue_ms_each * 1e3,
                 before.images + served,
                 before.executions + (served // batch if executions is None else executions),
                 before.compute_us + served * run_ms * 1e3)
    counts = {} if arrived is None else {model: arrived}
    r.latency.observe_queues({endpoint: (time.monotonic(),
                                         QueueReport({}, counts, {model: now}))})


def test_a_busy_device_twice_as_slow_is_followed_within_ten_answers():
    """Under load (here: another model's work in flight all along) every answer
    still reads the device's speed."""
    r = router()
    _device(r, 0, 0.0, 1)  # the first report: a start to count from
    _device(r, 5, 0.0, 1)
    r.latency.admit("fast")
    for _ in range(10):
        r.latency.finish(r.latency.admit("mid"), observed_ms=100.0)  # profile: 50
        _device(r, 1, 0.0, 1)
    assert r.latency.service_ms("mid") == pytest.approx(100.0, rel=0.15)


def test_a_busy_device_is_read_from_tritons_queue_wait_not_mistaken_for_a_slow_one():
    """Behind a queue every answer takes long; Triton's own queue time says how
    much of it was waiting, so the device's speed is learned, busy or not."""
    r = router()
    _device(r, 0, 0.0, 1)
    _device(r, 8, 200.0, 1)
    r.latency.admit("fast")  # the device is busy for every request below
    for _ in range(20):
        r.latency.finish(r.latency.admit("mid"), observed_ms=250.0)  # 200 waiting + 50
        _device(r, 1, 200.0, 1)
    assert r.latency.service_ms("mid") == pytest.approx(50.0, rel=0.1)


def test_a_batched_answer_is_compared_with_the_profiles_batch():
    """On a CPU a batch of 8 takes 8x one image: an answer from one is not slow."""
    r = router()
    _device(r, 0, 0.0, 8)
    _device(r, 8, 0.0, 8)
    for _ in range(20):
        r.latency.finish(r.latency.admit("mid"), observed_ms=400.0)  # the profile's batch 8
        _device(r, 8, 0.0, 8)
    assert r.latency.service_ms("mid") == pytest.approx(50.0, rel=0.05)


def test_a_device_twice_as_slow_is_followed_from_its_run_time_within_three_reports():
    """Where Triton says how long the device ran the model, that time is the
    device's speed: answers that queued behind another client are not read."""
    r = router()
    _device(r, 0, 0.0, 1)
    r.latency.finish(r.latency.admit("mid"), observed_ms=50.0)  # idle: 45 run + 5 outside
    _device(r, 1, 0.0, 1, run_ms=45.0)
    assert r.latency.service_ms("mid") == pytest.approx(50.0)
    r.latency.admit("fast")  # busy from here on: another client's queue ahead of ours
    for _ in range(3):
        r.latency.finish(r.latency.admit("mid"), observed_ms=400.0)
        _device(r, 4, 300.0, 1, run_ms=90.0)
    assert r.latency.service_ms("mid") == pytest.approx(95.0, rel=0.15)
    for _ in range(10):
        _device(r, 4, 300.0, 1, run_ms=90.0)
    assert r.latency.service_ms("mid") == pytest.approx(95.0, rel=0.01)


def test_another_clients_batches_are_not_read_as_a_slow_device():
    """A run of 8 images takes the profile's batch-8 time: the device is as fast
    as profiled, however long the answers that waited for it took."""
    r = router()
    _device(r, 0, 0.0, 1)
    r.latency.admit("fast")
    for _ in range(10):
        r.latency.finish(r.latency.admit("mid"), observed_ms=900.0)
        _device(r, 8, 400.0, 8, run_ms=400.0)
    assert r.latency.service_ms("mid") == pytest.approx(50.0, rel=0.01)


def test_a_window_of_singles_and_pairs_is_read_at_the_batch_its_requests_ran_in():
    """Triton counts a pair's run once for each of its two requests: 8 singles
    and a pair on a CPU (a pair takes twice a single) are a device at its
    profiled speed, not one 8% slower."""
    r = router()
    _device(r, 0, 0.0, 1)
    r.latency.admit("fast")
    for _ in range(10):  # 10 requests, 9 executions: (8 x 50 + 2 x 100) / 10 ms each
        _device(r, 10, 0.0, 1, executions=9, run_ms=60.0)
    assert r.latency.service_ms("mid") == pytest.approx(50.0, rel=0.01)


def test_the_time_outside_the_device_is_read_where_triton_answered_only_ours():
    r = router()
    _device(r, 0, 0.0, 1)
    for _ in range(40):  # the device runs as profiled; transfer now takes 30 ms more
        r.latency.finish(r.latency.admit("mid"), observed_ms=80.0)
        _device(r, 1, 0.0, 1, run_ms=45.0)
    assert r.latency.service_ms("mid") == pytest.approx(80.0, rel=0.02)


def _outside_learned(r: Router) -> None:
    """Answers of this gateway alone: 45 ms on the device, 5 outside it."""
    _device(r, 0, 0.0, 1)
    for _ in range(5):
        r.latency.finish(r.latency.admit("mid"), observed_ms=50.0)
        _device(r, 1, 0.0, 1, run_ms=45.0)


def test_batched_windows_and_single_ones_read_the_same_device_alike():
    """Runs of 8 (Triton counts each of them 8 times) and of 1, at the profile's
    speed: the estimate does not move either way."""
    r = router()
    _outside_learned(r)
    r.latency.admit("fast")
    for _ in range(20):
        _device(r, 8, 100.0, 8, run_ms=360.0)
        _device(r, 1, 10.0, 1, run_ms=45.0)
        assert r.latency.service_ms("mid") == pytest.approx(50.0, rel=0.01)


def test_an_answer_held_up_once_outside_the_device_is_no_trend():
    r = router()
    _outside_learned(r)
    r.latency.finish(r.latency.admit("mid"), observed_ms=2000.0)  # a pause, a retransmit
    _device(r, 1, 0.0, 1, run_ms=45.0)
    r.latency.admit("fast")
    for _ in range(20):  # other clients' windows from here on: nothing corrects it
        _device(r, 4, 100.0, 1, run_ms=45.0)
    assert r.latency.service_ms("mid") < 50.0 * 1.5


def test_a_window_other_clients_sent_to_is_not_read_as_ours():
    """Our two answers, but another client's requests arrived too: Triton's mean
    queue wait is not ours, so it says nothing of the time outside the device."""
    r = router()
    _outside_learned(r)
    arrived = r.latency.sent.get(("local", "mid"), 0)
    _device(r, 0, 0.0, 1, arrived=arrived)  # all ours so far
    for extra in (5, 10, 15, 20):
        ours = [r.latency.admit("mid") for _ in range(2)]
        for ticket in ours:
            r.latency.finish(ticket, observed_ms=250.0)  # they waited 200 behind the others
        arrived += 2
        _device(r, 2, 20.0, 1, run_ms=45.0, arrived=arrived + extra)
    assert r.latency.service_ms("mid") == pytest.approx(50.0, rel=0.05)


def test_counters_that_start_again_are_a_new_start_not_a_window():
    r = router()
    _outside_learned(r)
    _device(r, 10, 100.0, 1, run_ms=45.0)
    before = r.latency._served["local", "mid"]
    # More answers than before, but less queue wait: counted again from zero.
    reloaded = Served(before.requests + 5, 0.0, before.images + 5, before.executions + 5,
                      before.compute_us + 5 * 500.0 * 1e3)
    r.latency.observe_queues({"local": (time.monotonic(), QueueReport({}, {}, {"mid": reloaded}))})
    assert r.latency.service_ms("mid") == pytest.approx(50.0, rel=0.01)
    _device(r, 1, 0.0, 1, run_ms=45.0)  # read from the new start
    assert r.latency.service_ms("mid") == pytest.approx(50.0, rel=0.01)


def test_batches_larger_than_any_profiled_are_not_read():
    """A GPU measured at batch 1 and 2 says nothing of its batches of 8: the
    profile's straight line through them would read these runs as fast."""
    r = Router(AP_TABLE, TIERS, LatencyModel(LatencyProfile(
        {"mid": ModelProfile({1: 8.0, 2: 9.0})})), default_budget_ms=10_000)
    _device(r, 0, 0.0, 1)
    for _ in range(5):
        r.latency.finish(r.latency.admit("mid"), observed_ms=8.0)
        _device(r, 1, 0.0, 1, run_ms=5.0)
    for _ in range(10):  # another client's batches of 8, each run 10 ms
        _device(r, 8, 0.0, 8, run_ms=10.0)
    assert r.latency.service_ms("mid") == pytest.approx(8.0)


def test_a_new_profile_is_the_device_as_it_runs_now():
    """What was learned against the old profile is not carried over to the new one."""
    r = router()
    _outside_learned(r)
    for _ in range(10):
        _device(r, 1, 0.0, 1, run_ms=95.0)
    assert r.latency.service_ms("mid") > 80.0
    r.latency.measured("mid", ModelProfile({1: 100.0, 8: 800.0}))
    assert r.latency.service_ms("mid") == pytest.approx(100.0)
    for _ in range(10):
        _device(r, 1, 0.0, 1, run_ms=95.0)
    assert r.latency.service_ms("mid") == pytest.approx(100.0, rel=0.01)


def test_a_model_without_profile_learns_its_speed_under_load_too():
    r = Router(AP_TABLE, TIERS, LatencyModel(LatencyProfile()), default_budget_ms=10_000)
    r.latency.finish(r.latency.admit("mid"), observed_ms=40.0)  # the probe at start
    _device(r, 0, 0.0, 1)
    _device(r, 4, 120.0, 1)
    r.latency.admit("fast")  # busy from here on
    for _ in range(15):
        r.latency.finish(r.latency.admit("mid"), observed_ms=200.0)  # 120 waiting + 80
        _device(r, 1, 120.0, 1)
    assert r.latency.service_ms("mid") == pytest.approx(80.0, rel=0.1)


def test_corrections_decay_back_to_the_profile():
    lm = LatencyModel(LatencyProfile({"mid": ModelProfile({1: 50.0})}), decay_s=10.0)
    for _ in range(30):
        lm.finish(lm.admit("mid"), observed_ms=150.0)
    at = lm.corrections.at("mid", "local").ratio_at
    factor = lm.corrections.factor
    assert factor("mid", "local", now=at) > 2.5
    assert factor("mid", "local", now=at + 10.0) == pytest.approx(
        1 + (factor("mid", "local", now=at) - 1) / 2)
    assert factor("mid", "local", now=at + 600.0) == pytest.approx(1.0, abs=1e-6)


def test_tiers_file(tmp_path):
    path = tmp_path / "tiers.yaml"
    path.write_text("default: fast\ntiers:\n  fast: {budget_ms: 80, priority: 1}\n"
                    "  slow: {budget_ms: 2000, models: [mid, slow], degrade: true}\n")
    config = TierConfig.load(path, "balanced")
    assert config.default == "fast"
    assert config.tiers["slow"] == Tier("slow", 2000.0, ("mid", "slow"), True, 2)


def test_profile_round_trips_through_json():
    prof = LatencyProfile({"mid": ModelProfile({1: 50.0, 4: 190.0})}, machine="x")
    back = LatencyProfile.from_json(prof.to_json())
    assert back.models["mid"].service_ms(2) == pytest.approx(50 + (190 - 50) / 3)
    assert back.models["mid"].service_ms(8) == pytest.approx(380.0)


def test_batching_settings_come_from_the_profile():
    from tierdet.registry.profile import tuned_batching
    from tierdet.registry.specs import Batching

    spec_bound = Batching(max_queue_delay_us=5000)
    cpu = ModelProfile({1: 50.0, 8: 400.0})  # a batch costs its images: no gain
    gpu = ModelProfile({1: 8.0, 8: 16.0})
    assert tuned_batching(spec_bound, cpu).max_queue_delay_us == 0
    assert tuned_batching(spec_bound, gpu).max_queue_delay_us == 2000
    assert tuned_batching(spec_bound, ModelProfile({1: 40.0, 8: 40.0})).max_queue_delay_us == 5000
    assert tuned_batching(spec_bound, None) == spec_bound


def test_under_load_the_governor_shifts_the_mix_to_cheaper_models():
    r = router()
    assert r.decide(RouteRequest(sla_ms=5000), 3.0, READY).model == "slow"
    r.governor.rate = 10.0  # 10 req/s: "slow" (110 ms) would need 1.1 devices
    r.governor.mean_cost_ms = 40.0  # recent requests averaged 40 ms of device time
    assert r.decide(RouteRequest(sla_ms=5000), 3.0, READY).model == "mid"
    r.governor.rate = 60.0  # only the cheapest keeps the device under its target
    assert r.decide(RouteRequest(sla_ms=5000), 3.0, READY).model == "fast"


def test_requests_refused_before_decoding_count_as_load():
    """The governor counts demand, not only what was let in: one that saw only
    admitted requests would see less load the more it refused, and upgrade more."""
    r = router()
    r.governor.mean_cost_ms = 40.0
    assert r.decide(RouteRequest(sla_ms=5000), 3.0, READY).model == "slow"
    for _ in range(60):  # about 30 requests a second over the governor's window
        with pytest.raises(ApiError):
            r.precheck(RouteRequest(sla_ms=10), 3.0, READY)
    assert r.decide(RouteRequest(sla_ms=5000), 3.0, READY).model == "fast"


def test_the_governor_mixes_rather_than_all_or_nothing():
    from tierdet.serving.governor import LoadGovernor

    gov = LoadGovernor(target=0.85)
    gov.rate = 10.0  # device time per second available: 850 ms -> 85 ms per request
    chosen = []
    for _ in range(200):
        cost = 110.0 if gov.affordable(110.0) else 15.0
        gov.admitted(cost)
        chosen.append(cost)
    upgrades = chosen[-100:].count(110.0) / 100
    mean = sum(chosen[-100:]) / 100
    assert 0.4 < upgrades < 0.9 and mean <= 90.0


def test_other_gateways_work_at_the_device_leaves_less_room_for_upgrades():
    """Gateways sharing a Triton each see only their own arrivals; the others'
    work, read from Triton's arrival counts, takes its share of the device."""
    r = router()
    loose = RouteRequest(sla_ms=5000)
    assert r.decide(loose, 3.0, READY).model == "slow"
    r.latency.observe_queues({"local": (time.monotonic(), QueueReport({}, {}))})
    r.latency.others_rate["local"] = 450.0  # device ms a second: 0.45 of the device
    assert r.decide(loose, 3.0, READY).model == "fast"


def test_other_gateways_work_read_long_ago_says_nothing_of_now():
    """Triton's metrics have not answered for seconds: the rate last read is not
    counted against upgrades (nor is the queue)."""
    r = router()
    r.latency.observe_queues({"local": (time.monotonic() - 5.0, QueueReport({}, {}))})
    r.latency.others_rate["local"] = 450.0
    assert r.decide(RouteRequest(sla_ms=5000), 3.0, READY).model == "slow"


def test_arrival_rate_decays():
    from tierdet.serving.governor import LoadGovernor

    gov = LoadGovernor(window_s=2.0)
    for i in range(100):
        gov.arrival(now=i * 0.1)  # 10 req/s
    assert gov.rate == pytest.approx(10.0, rel=0.1)
    gov.arrival(now=100 * 0.1 + 20.0)
    assert gov.rate < 1.0


def test_precheck_sheds_before_decoding_only_when_nothing_could_fit():
    r = router()
    r.precheck(RouteRequest(sla_ms=40), 3.0, READY)  # "fast" fits
    with pytest.raises(ApiError) as info:
        r.precheck(RouteRequest(sla_ms=10), 3.0, READY)
    assert info.value.code is ErrorCode.SLA_UNATTAINABLE
    for _ in range(4):
        r.latency.admit("slow")
    r.precheck(RouteRequest(tier="balanced"), 3.0, READY)  # degrades, never shed early


def test_an_upgrade_is_not_taken_when_it_would_push_frequent_tight_requests_out():
    # "slow" adds ~95 ms of device work over "fast"; 40 ms requests fit only
    # while that work is not queued ahead of them.
    busy = router()
    for _ in range(20):  # 10 tight requests per second in the last 2 s
        busy.governor.saw_budget(40.0)
    assert busy.decide(RouteRequest(sla_ms=5000), 3.0, READY).model == "fast"

    rare = router()
    rare.governor.saw_budget(40.0)  # one in 2 s: the risk is small, take the accuracy
    assert rare.decide(RouteRequest(sla_ms=5000), 3.0, READY).model == "slow"

    loose = router()
    for _ in range(20):  # many requests, all loose enough to absorb the extra work
        loose.governor.saw_budget(2000.0)
    assert loose.decide(RouteRequest(sla_ms=5000), 3.0, READY).model == "slow"


# -- several endpoints (Triton servers), each its own device ------------------

TWO = {m: ["a", "b"] for m in ZOO}  # every model on endpoints a and b


def test_work_on_one_endpoint_sends_the_next_request_to_the_other():
    r = router()
    r.latency.admit("slow", "a")
    d = r.decide(RouteRequest(sla_ms=200), 3.0, TWO)
    assert (d.model, d.endpoint) == ("slow", "b")  # b is idle: the best model still fits


def test_idle_endpoints_take_turns():
    r = router()
    chosen = [r.decide(RouteRequest(sla_ms=5000), 3.0, TWO).endpoint for _ in range(6)]
    assert sorted(chosen) == ["a"] * 3 + ["b"] * 3


def _device_speed(r: Router, endpoint: str, run_ms: float, reports: int = 1,
                  model: str = "mid") -> None:
    """``reports`` windows in which ``endpoint``'s device ran one ``model`` in
    ``run_ms`` (plus 5 ms outside the run)."""
    for _ in range(reports):
        r.latency.finish(r.latency.admit(model, endpoint), observed_ms=run_ms + 5.0)
        _device(r, 1, 0.0, 1, model=model, endpoint=endpoint, run_ms=run_ms)


def _started(r: Router, *endpoints: str, model: str = "mid") -> None:
    """Each endpoint's first report (a start to count from) and one idle answer at
    the profile's speed (its time less 5 ms of run, + 5 outside)."""
    for e in endpoints:
        _device(r, 0, 0.0, 1, model=model, endpoint=e)
        _device_speed(r, e, ZOO[model][1] - 5.0, model=model)


def test_each_endpoint_reads_its_own_device():
    """Two Tritons serve ``mid``; b's device slows to nearly 3x (a neighbour on
    its node). b is read slower, a keeps its speed, and requests go to a while
    it is free; an endpoint not read yet is expected to run like the others."""
    r = router()
    _started(r, "a", "b")
    _device_speed(r, "b", 135.0, reports=12)
    assert r.latency.service_ms("mid", "a") == pytest.approx(50.0)
    assert r.latency.service_ms("mid", "b") == pytest.approx(140.0, rel=0.1)
    pinned = RouteRequest(model="mid", sla_ms=5000)
    assert {r.decide(pinned, 3.0, TWO).endpoint for _ in range(6)} == {"a"}
    assert r.latency.service_ms("mid", "c") == pytest.approx(
        (r.latency.service_ms("mid", "a") + r.latency.service_ms("mid", "b")) / 2)


def test_an_endpoint_that_left_the_pool_no_longer_speaks_for_the_others():
    r = router()
    _started(r, "a", "b")
    _device_speed(r, "b", 135.0, reports=12)
    late = r.latency.admit("mid", "b")  # sent before it left: answered after
    r.latency.left("b")
    r.latency.finish(late, observed_ms=400.0)
    assert r.latency.service_ms("mid", "c") == pytest.approx(r.latency.service_ms("mid", "a"))
    assert r.latency.service_ms("mid", "b") == pytest.approx(50.0)  # back: read afresh
    assert not any("b" in key for key in (*r.latency.sent, *r.latency._served))
    assert "b" not in {*r.latency.busy_until, *r.latency._returned}


def test_an_endpoint_not_read_yet_is_expected_to_run_like_the_others():
    """a runs the model at twice its profile; b joins: it starts from a's speed,
    and its first reads move from there, not from the profile."""
    r = router()
    _started(r, "a")
    _device_speed(r, "a", 95.0, reports=20)
    assert r.latency.service_ms("mid", "a") == pytest.approx(100.0, rel=0.05)
    assert r.latency.service_ms("mid", "b") == pytest.approx(r.latency.service_ms("mid", "a"))
    _device(r, 0, 0.0, 1, endpoint="b")
    _device_speed(r, "b", 95.0)
    assert r.latency.service_ms("mid", "b") == pytest.approx(100.0, rel=0.05)


def test_a_model_without_profile_is_expected_at_its_other_endpoints_speed():
    r = Router(AP_TABLE, TIERS, LatencyModel(LatencyProfile()), default_budget_ms=10_000)
    r.latency.corrections.at("mid", "b")  # known at b before anything was observed
    r.latency.finish(r.latency.admit("mid", "a"), observed_ms=30.0)
    assert r.latency.service_ms("mid", "b") == pytest.approx(30.0)


def test_the_governor_costs_a_request_on_the_device_it_goes_to():
    """b runs ``slow`` at 3x: a request placed on a costs a's time, not the mean."""
    r = router()
    _started(r, "a", "b", model="slow")
    _device_speed(r, "b", 325.0, reports=12, model="slow")
    r.governor.rate = 60.0  # 0.9 of two devices: 110 ms each fits, the mean does not
    d = r.decide(RouteRequest(sla_ms=5000), 3.0, TWO)
    assert (d.model, d.endpoint) == ("slow", "a")


def test_endpoints_read_a_little_apart_still_take_turns():
    """Two reads of like devices differ by their noise: within a quarter of each
    other they share the load (and both reads stay fresh)."""
    r = router()
    _started(r, "a", "b")
    _device_speed(r, "b", 55.0, reports=12)
    assert r.latency.service_ms("mid", "b") > 1.1 * r.latency.service_ms("mid", "a")
    pinned = RouteRequest(model="mid", sla_ms=5000)
    assert sorted(r.decide(pinned, 3.0, TWO).endpoint for _ in range(6)) == ["a"] * 3 + ["b"] * 3


def test_tritons_queue_counts_work_other_gateways_sent():
    """Nothing of ours is in flight at a, but its Triton reports 3 ``slow`` queued."""
    r = router()
    r.latency.observe_queues({"a": (time.monotonic(), QueueReport({"slow": 3}, {"slow": 3})),
                              "b": (time.monotonic(), QueueReport({}, {}))})
    # 3 waiting, and half of the batch running ahead of them (Triton counts only waiting)
    assert r.latency.backlog_ms("a") == pytest.approx(3 * 110.0 + 0.5 * 110.0, abs=1.0)
    assert r.decide(RouteRequest(sla_ms=200), 3.0, TWO).endpoint == "b"
    only_a = {m: ["a"] for m in ZOO}
    with pytest.raises(ApiError):  # 330 ms queued: nothing makes 200 ms at a
        r.decide(RouteRequest(sla_ms=200), 3.0, only_a)


def test_own_work_sent_after_tritons_report_is_added_to_it():
    r = router()
    r.latency.observe_queues({"a": (time.monotonic(), QueueReport({"mid": 1}, {"mid": 1}))})
    r.latency.admit("mid", "a")  # after the report: not in Triton's count yet
    assert r.latency.backlog_ms("a") == pytest.approx(50.0 + 25.0 + 50.0, abs=1.0)


def test_a_queue_triton_reported_runs_down_as_the_device_works(monkeypatch):
    """Triton's count of 3 ``mid`` waiting came back 60 ms ago (its scrape took
    0.2 s): the device has worked on them since the count was read."""
    r = router()
    r.latency.observe_queues({"a": (time.monotonic() - 0.2,
                                    QueueReport({"mid": 3}, {"mid": 3}))})
    read = time.monotonic()
    monkeypatch.setattr(latency_module, "time", SimpleNamespace(monotonic=lambda: read + 0.06))
    # 3 waiting, half of the batch running ahead of them, less the 60 ms worked since
    assert r.latency.backlog_ms("a") == pytest.approx(3 * 50.0 + 25.0 - 60.0, abs=2.0)


def test_a_stale_queue_report_is_not_used():
    r = router()
    r.latency.observe_queues({"a": (time.monotonic() - 5.0, QueueReport({"slow": 9}, {}))})
    assert r.latency.backlog_ms("a") == 0


def test_a_failed_call_goes_to_another_endpoint_only_while_the_budget_allows():
    r = router()
    d = r.decide(RouteRequest(sla_ms=300), 3.0, TWO)
    retry = r.reroute(d, elapsed_ms=20.0, ready=TWO, tried=[d.endpoint])
    assert retry is not None and retry.endpoint != d.endpoint and retry.model == d.model
    assert r.reroute(d, elapsed_ms=290.0, ready=TWO, tried=[d.endpoint]) is None
    assert r.reroute(d, elapsed_ms=20.0, ready=TWO, tried=["a", "b"]) is None


def test_other_clients_work_since_the_report_is_counted_at_their_rate():
    """Triton took in 10 ``mid`` in 0.1 s, 4 of them ours: 6 x 50 ms of others'
    work per 0.1 s. Half a poll later, half of that rate's work is added."""
    r = router()
    t0 = time.monotonic() - 0.15
    r.latency.observe_queues({"a": (t0, QueueReport({}, {"mid": 0}))})
    for _ in range(4):
        r.latency.finish(r.latency.admit("mid", "a"), observed_ms=50.0)
    t1 = t0 + 0.1
    r.latency.observe_queues({"a": (t1, QueueReport({}, {"mid": 10}))})
    assert r.latency.others_rate["a"] == pytest.approx(6 * 50.0 / 0.1)
    assert r.latency.backlog_ms("a") == pytest.approx(3000.0 * (time.monotonic() - t1), rel=0.1)


def test_our_requests_that_triton_counts_late_are_no_one_elses_load():
    """Ours are counted when sent, Triton's when it takes them: while two of ours
    are on the way, arrivals less ours dips by two, then recovers. No other
    client sent anything, so no rate of others' work may come of it."""
    r = router()
    t0 = time.monotonic() - 0.3
    r.latency.observe_queues({"a": (t0, QueueReport({}, {"mid": 0}))})
    tickets = [r.latency.admit("mid", "a") for _ in range(2)]
    r.latency.observe_queues({"a": (t0 + 0.1, QueueReport({}, {"mid": 0}))})  # not there yet
    for ticket in tickets:
        r.latency.finish(ticket, observed_ms=50.0)
    r.latency.observe_queues({"a": (t0 + 0.2, QueueReport({}, {"mid": 2}))})  # now counted
    assert r.latency.others_rate["a"] == 0.0


# -- calibrated admission ------------------------------------------------------


def test_admission_learns_how_late_answers_run():
    from tierdet.serving.calibration import Calibration

    late = Calibration(prior=1.15, quantile=0.95)
    for _ in range(49):
        late.observe(100.0, 150.0, 150.0)
    assert late.factor == 1.15  # too few answers yet: the configured margin
    for _ in range(51):
        late.observe(100.0, 150.0, 150.0)
    assert late.factor == pytest.approx(1.5)
    early = Calibration(prior=1.15, quantile=0.95)
    for _ in range(100):
        early.observe(100.0, 60.0, 150.0)  # pessimistic predictions: trust them as they are
    assert early.factor == 1.0
    off = Calibration(prior=1.15, quantile=0.0)
    for _ in range(100):
        off.observe(100.0, 300.0, 150.0)
    assert off.factor == 1.15
    far = Calibration(prior=1.15, quantile=0.95)
    for _ in range(100):
        far.observe(20.0, 60.0, 1000.0)  # admitted with lots of room: not counted
    assert far.factor == 1.15


def test_a_learned_factor_decides_what_fits():
    r = router()
    assert r.fits(100.0, 120.0)  # 100 * 1.1 + 5
    for _ in range(100):
        r.calibration.quantile = 0.95
        r.calibration.observe(100.0, 130.0, 150.0)
    assert not r.fits(100.0, 120.0) and r.fits(100.0, 140.0)


def test_a_model_that_only_just_fits_loses_to_one_with_room_when_answers_run_late():
    # 140 ms: "slow" (predicted 115 ms) fits the configured margin, "mid" with room.
    on_time = router()
    assert on_time.decide(RouteRequest(sla_ms=140), 3.0, READY).model == "slow"
    late = router()
    for _ in range(100):  # answers have been running 20% over their predictions
        late.calibration.observe(100.0, 120.0, 150.0)
    assert late.calibration.factor == pytest.approx(1.1)  # admission is unchanged
    assert late.fits(115.0, 140.0)
    assert late.decide(RouteRequest(sla_ms=140), 3.0, READY).model == "mid"
    # A pinned model is what was asked for, however it runs.
    assert late.decide(RouteRequest(sla_ms=140, model="slow"), 3.0, READY).model == "slow"


def test_a_request_may_wait_for_an_image_slot_while_its_fastest_model_still_fits():
    r = router()
    wait = r.slot_wait_ms(RouteRequest(sla_ms=100), 3.0, READY)
    assert wait is not None and wait > 0
    assert r.decide(RouteRequest(sla_ms=100), 3.0 + wait - 0.01, READY).model == "fast"
    with pytest.raises(ApiError) as late:
        r.decide(RouteRequest(sla_ms=100), 3.0 + wait + 0.5, READY)
    assert late.value.code is ErrorCode.SLA_UNATTAINABLE
    assert r.slot_wait_ms(RouteRequest(sla_ms=10), 3.0, READY) < 0  # no room at all
    assert r.slot_wait_ms(RouteRequest(), 3.0, READY) is None  # the default tier degrades


# The shipped ladder on a 2-core CPU at batch 1 (ms): the fastest of 25 interleaved
# runs of each served graph in bare ONNX Runtime (2 threads) on a busy machine
# (10.9, 21.1, 14.6, 44.8), plus 8 ms for the gateway and Triton.
IDLE_LADDER_MS = {"yolox-nano-320": 19.0, "yolox-nano-416": 29.0, "picodet-s-320": 23.0,
                  "picodet-s-416": 53.0}


def test_the_default_tiers_give_the_shipped_ladder_three_models_on_an_idle_cpu():
    """With the tiers `tierdet up` serves the ladder with, a tight, a medium and a
    loose tier each get a different model, more accurate as the budget loosens,
    ranked by the AP the cards record."""
    from conftest import REPO
    from tierdet.registry.cards import register, shipped_cards, shipped_tiers

    cards = shipped_cards()
    assert {c.name for c in cards} == {"yolox-nano.yaml", "picodet-s.yaml"}
    assert all(c.parent == REPO / "examples" / "cards" for c in cards)
    ap = {c.name: c.measured_ap.ap for card in cards for c in register(card)}
    assert set(ap) == set(IDLE_LADDER_MS)
    latency = LatencyModel(LatencyProfile(
        {n: ModelProfile({1: ms}) for n, ms in IDLE_LADDER_MS.items()}))
    tiers = TierConfig.load(shipped_tiers(), "balanced")
    assert [(t.name, t.budget_ms) for t in tiers.tiers.values()] == [
        ("realtime", 50.0), ("balanced", 100.0), ("accurate", 3000.0)]
    assert tiers.default == "balanced"
    r = Router(ap, tiers, latency, default_budget_ms=10_000)
    got = [r.decide(RouteRequest(tier=t), 3.0, list(ap)).model
           for t in ("realtime", "balanced", "accurate")]
    assert got == ["yolox-nano-416", "picodet-s-320", "picodet-s-416"]
    # Slower (a busy host): each tier falls back to a faster model of its list.
    slow = LatencyModel(LatencyProfile(
        {n: ModelProfile({1: 1.6 * ms}) for n, ms in IDLE_LADDER_MS.items()}))
    r = Router(ap, tiers, slow, default_budget_ms=10_000)
    assert r.decide(RouteRequest(tier="realtime"), 3.0, list(ap)).model == "yolox-nano-320"


def test_on_a_shared_cpu_other_models_work_stretches_a_prediction_not_its_own():
    """On a CPU Triton runs each model's executions on the same cores at once:
    work admitted for other models recently takes its share of the device while
    this model's request runs; the model's own requests queue at its instance."""
    shared = router()
    shared.shared_device = True
    alone = shared.decide(RouteRequest(model="mid", sla_ms=5000), 3.0, READY).predicted_ms
    now = time.monotonic()
    for _ in range(4):  # 4 x 110 ms of "slow" over a 2 s window: a fifth of the device
        shared.governor.admitted(110.0, "slow", now)
    beside = shared.decide(RouteRequest(model="mid", sla_ms=5000), 3.0, READY).predicted_ms
    # The mid request decided first counts as its own model's work, not "other".
    assert beside - 2.0 - 3.0 == pytest.approx((alone - 5.0) / (1 - 0.22), rel=0.05)
    for _ in range(10):
        shared.governor.admitted(50.0, "mid", now)
    assert shared.decide(RouteRequest(model="mid", sla_ms=5000), 3.0, READY
                         ).predicted_ms == pytest.approx(beside, rel=0.02)
    assert router().decide(RouteRequest(model="mid", sla_ms=5000), 3.0, READY
                           ).predicted_ms == pytest.approx(alone)  # off by default


def test_a_queue_report_older_than_our_last_answer_does_not_make_the_device_busy():
    """Triton's report may count our own request queued; once it came back the
    device is idle until a newer report says otherwise."""
    r = router()
    asked = time.monotonic()
    ticket = r.latency.admit("mid", "a")
    r.latency.observe_queues({"a": (asked, QueueReport({"mid": 1}, {"mid": 1}))})
    assert not r.idle("a")  # ours, in flight
    r.latency.finish(ticket, 50.0)
    assert r.idle("a")  # the report counted it; it is back
    r.latency.observe_queues({"a": (time.monotonic(), QueueReport({"slow": 2}, {"mid": 1,
                                                                             "slow": 2}))})
    assert not r.idle("a")  # another client's, reported after ours came back

"""API keys: hashed, constant-time compared, 401 vs 403, per-key token buckets
(shared by every worker of a gateway)."""

from __future__ import annotations

import pytest
from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.serving.routing import RouteRequest
from tierdet.serving.security import Allowance, ApiKey, KeyRing, bearer, hash_key
from tierdet.serving.tiers import DEFAULT_TIERS, Tier, TierConfig

ALICE = ApiKey("alice", hash_key("alice-secret"), rate_per_s=2, burst=3)
BOB = ApiKey("bob", hash_key("bob-secret"), tiers=("realtime",), models=("damoyolo-ns",))
RING = KeyRing((ALICE, BOB))


def _code(fn) -> ErrorCode:
    with pytest.raises(ApiError) as info:
        fn()
    return info.value.code


def test_no_keys_configured_means_open():
    assert KeyRing().authenticate(None) is None


def test_missing_or_unknown_key_is_401():
    assert _code(lambda: RING.authenticate(None)) is ErrorCode.UNAUTHENTICATED
    assert _code(lambda: RING.authenticate("nope")) is ErrorCode.UNAUTHENTICATED
    assert ApiError(ErrorCode.UNAUTHENTICATED, "").http_status == 401


def test_known_key_is_identified_by_its_hash_only():
    assert RING.authenticate("alice-secret") == ALICE
    assert "alice-secret" not in repr(RING)


TIERS = TierConfig(dict(DEFAULT_TIERS), "balanced")


def test_known_key_outside_its_grant_is_403():
    key = RING.authenticate("bob-secret")
    RING.confine(key, RouteRequest(tier="realtime"), TIERS)
    for asked in (RouteRequest(tier="accurate"), RouteRequest(model="efficientdet-d7"),
                  RouteRequest(sla_ms=600_000), RouteRequest(tier="realtime", sla_ms=151)):
        assert _code(lambda r=asked: RING.confine(key, r, TIERS)) is ErrorCode.FORBIDDEN
    assert ApiError(ErrorCode.FORBIDDEN, "").http_status == 403


def test_a_grant_confines_what_the_request_leaves_unsaid():
    key = ApiKey("rt", hash_key("rt"), tiers=("realtime",))
    # No tier: the key's own tier, not the gateway's default; a budget within it stays.
    assert RING.confine(key, RouteRequest(), TIERS).tier == "realtime"
    within = RING.confine(key, RouteRequest(sla_ms=100), TIERS)
    assert (within.tier, within.sla_ms) == ("realtime", 100)
    # A pinned model runs under the tier's budget and model list.
    listed = TierConfig({"realtime": Tier("realtime", 150, ("damoyolo-ns",)),
                         "accurate": Tier("accurate", 3000)}, "accurate")
    assert RING.confine(key, RouteRequest(model="damoyolo-ns"), listed).allowed == (
        "damoyolo-ns",)
    assert _code(lambda: RING.confine(key, RouteRequest(model="efficientdet-d0"), listed)
                 ) is ErrorCode.FORBIDDEN
    # A key granted models is routed among them even when it names none.
    only = ApiKey("d0", hash_key("d0"), models=("efficientdet-d0",))
    assert RING.confine(only, RouteRequest(), TIERS).allowed == ("efficientdet-d0",)
    # A key without grants, or no key, is not confined.
    assert RING.confine(ALICE, RouteRequest(sla_ms=9e5), TIERS) == RouteRequest(sla_ms=9e5)


def test_an_unknown_tier_stays_a_422_for_a_granted_key():
    key = ApiKey("rt", hash_key("rt"), tiers=("realtime",))
    assert _code(lambda: RING.confine(key, RouteRequest(tier="nope"), TIERS)
                 ) is ErrorCode.UNKNOWN_TIER


def test_admission_prepays_one_image_per_call():
    allowance = Allowance()
    assert allowance.use() and not allowance.use()


def test_rate_limit_is_a_token_bucket_with_retry_after():
    ring = KeyRing((ALICE,))
    for _ in range(3):  # the burst
        ring.take(ALICE, now=100.0)
    with pytest.raises(ApiError) as info:
        ring.take(ALICE, now=100.0)
    assert info.value.code is ErrorCode.RATE_LIMITED and info.value.http_status == 429
    assert info.value.retry_after_s >= 1
    ring.take(ALICE, now=100.6)  # 2 tokens/s: one more after half a second


def test_rings_sharing_a_buckets_file_share_each_keys_burst(tmp_path):
    # As two gateway workers do: each loads the keys, both map the same file.
    first, second = KeyRing((BOB, ALICE)), KeyRing((BOB, ALICE))
    for ring in (first, second):
        ring.share(tmp_path / "buckets")
    first.take(ALICE, now=100.0)
    second.take(ALICE, now=100.0)
    first.take(ALICE, now=100.0)
    assert _code(lambda: second.take(ALICE, now=100.0)) is ErrorCode.RATE_LIMITED
    second.take(ALICE, now=100.6)  # the refill is shared too


def test_keys_file(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - name: ci\n    sha256: {hash_key('k')}\n    rate_per_s: 5\n")
    ring = KeyRing.load(path)
    assert ring.authenticate("k").rate_per_s == 5
    path.write_text("keys:\n  - name: bad\n    sha256: plaintext-key\n")
    with pytest.raises(ValueError):
        KeyRing.load(path)


def test_bearer_forms():
    assert bearer("Bearer abc", None) == "abc"
    assert bearer("bearer abc ", None) == "abc"
    assert bearer(None, "xyz") == "xyz"
    assert bearer("Basic abc", None) is None


def test_failed_key_attempts_are_throttled_per_source_for_a_window():
    from tierdet.serving.security import FailedAttempts

    throttle = FailedAttempts(limit=2, window_s=60.0)
    for _ in range(2):
        throttle.check("10.0.0.1", now=100.0)
        throttle.failed("10.0.0.1", now=100.0)
    with pytest.raises(ApiError) as info:
        throttle.check("10.0.0.1", now=130.0)
    assert info.value.code is ErrorCode.RATE_LIMITED and info.value.retry_after_s == 30
    throttle.check("10.0.0.2", now=130.0)  # another address has its own count
    throttle.check("10.0.0.1", now=160.0)  # the failures left the window


def test_the_failure_table_stays_bounded():
    from tierdet.serving.security import FailedAttempts

    throttle = FailedAttempts(limit=1, window_s=60.0, max_sources=3)
    for n in range(10):
        throttle.failed(f"10.0.0.{n}", now=100.0 + n)
    assert len(throttle._seen) <= 3
    with pytest.raises(ApiError):
        throttle.check("10.0.0.9", now=110.0)  # the newest is still known


def test_the_admin_credential_is_its_own_secret():
    from tierdet.serving.security import AdminKey

    admin = AdminKey(hash_key("operator-secret"))
    assert admin.allows("operator-secret") and not admin.allows("alice-secret")
    assert not admin.allows(None) and not AdminKey(None).allows("operator-secret")

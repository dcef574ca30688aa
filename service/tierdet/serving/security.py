"""API keys, their grants, per-key rate limits, and the admin credential.

Keys are configured as sha256 hashes (the service never stores a key), and
a presented key is compared against every stored hash with
``hmac.compare_digest``, so timing says nothing about which key or how
much of it matched. 401: no key or an unknown key; 403: a known key asking
for a tier or model it is not allowed; 429: over its rate, with the time
until its next token as Retry-After. With several gateway workers the
buckets live in one file every worker maps (``SharedBuckets``), so a key's
rate holds for the gateway, not for each worker.

A grant confines the routing request itself (``KeyRing.confine``), whatever
the request names: the use case applies it to every image on every surface.
A key's rate counts images: the admission's token pays for the first, each
further image of a batch or stream takes its own (``Allowance``). Failed key
attempts are throttled per source address (``FailedAttempts``). The admin
credential (``AdminKey``) is a separate secret, never a caller's API key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import math
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.serving.routing import RouteRequest
from tierdet.serving.tiers import TierConfig


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    rate_per_s: float = 0.0  # 0: unlimited
    burst: float = 0.0  # bucket size; default: one second of rate, at least 1
    tiers: tuple[str, ...] = ()  # empty: any
    models: tuple[str, ...] = ()  # empty: any (applies to pinned models)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class _Bucket:
    tokens: float
    updated: float


class LocalBuckets:
    """One process's buckets, by key index."""

    def __init__(self) -> None:
        self._buckets: dict[int, _Bucket] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with self._lock:
            yield

    def get(self, index: int) -> _Bucket | None:
        return self._buckets.get(index)

    def put(self, index: int, bucket: _Bucket) -> None:
        self._buckets[index] = bucket


class SharedBuckets(LocalBuckets):
    """Buckets in a file every worker maps: a (tokens, updated) pair of doubles per
    key, in the keys file's order (every worker loads the same file), read and
    written under an exclusive flock. ``updated`` is CLOCK_MONOTONIC, one clock
    for every process of the host; 0 marks a bucket not used yet."""

    SLOT = struct.Struct("dd")

    def __init__(self, path: Path, count: int) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        size = max(1, count) * self.SLOT.size
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)
        self._map = mmap.mmap(self._fd, size)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with self._lock:  # flock does not exclude this process's other threads
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def get(self, index: int) -> _Bucket | None:
        tokens, updated = self.SLOT.unpack_from(self._map, index * self.SLOT.size)
        return _Bucket(tokens, updated) if updated else None

    def put(self, index: int, bucket: _Bucket) -> None:
        self.SLOT.pack_into(self._map, index * self.SLOT.size, bucket.tokens, bucket.updated)


@dataclass
class KeyRing:
    keys: tuple[ApiKey, ...] = ()
    buckets: LocalBuckets = field(default_factory=LocalBuckets)

    def share(self, path: Path) -> None:
        """Keep the rate buckets beside ``path``, with every process that shares it.
        The file is named by the keys (slots are by position): a worker restarted
        after the keys file changed does not read other keys' buckets."""
        names = hashlib.sha256("\n".join(k.name for k in self.keys).encode()).hexdigest()
        self.buckets = SharedBuckets(path.with_name(f"{path.name}-{names[:12]}"),
                                     len(self.keys))

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    @classmethod
    def load(cls, path: Path | None) -> KeyRing:
        """Keys from YAML: {keys: [{name, sha256, rate_per_s, burst, tiers, models}]}."""
        if path is None:
            return cls()
        import yaml

        raw = yaml.safe_load(path.read_text()) or {}
        keys = []
        for entry in raw.get("keys") or ():
            digest = str(entry["sha256"]).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"key {entry.get('name')!r}: sha256 must be 64 hex digits")
            keys.append(ApiKey(name=str(entry["name"]), sha256=digest,
                               rate_per_s=float(entry.get("rate_per_s", 0)),
                               burst=float(entry.get("burst", 0)),
                               tiers=tuple(entry.get("tiers") or ()),
                               models=tuple(entry.get("models") or ())))
        return cls(tuple(keys))

    def authenticate(self, presented: str | None) -> ApiKey | None:
        """The key's entry, or ApiError 401. None when no keys are configured."""
        if not self.keys:
            return None
        if not presented:
            raise ApiError(ErrorCode.UNAUTHENTICATED, "an API key is required "
                           "(Authorization: Bearer <key> or X-API-Key)")
        digest = hash_key(presented).encode()
        found = None
        for key in self.keys:  # no early exit: the time does not depend on the match
            if hmac.compare_digest(digest, key.sha256.encode()):
                found = key
        if found is None:
            raise ApiError(ErrorCode.UNAUTHENTICATED, "the API key is not valid")
        return found

    @staticmethod
    def confine(key: ApiKey | None, request: RouteRequest, tiers: TierConfig) -> RouteRequest:
        """``request`` as ``key``'s grant lets it be routed, or ApiError 403.

        A key granted tiers is always routed in one of them: a request naming
        no tier gets the gateway's default if granted, else the key's first; a
        pinned model or a bare ``sla_ms`` no longer leaves the tier (its budget,
        priority and model list apply), and ``sla_ms`` may not exceed the
        tier's budget. A key granted models is routed among those only. The
        result's ``allowed`` is what the router may pick from (classes can only
        narrow it further)."""
        if key is None or not (key.tiers or key.models):
            return request
        tier_name, allowed = request.tier, key.models
        if key.tiers:
            tier_name = _granted_tier(key, request.tier, tiers)
            tier = tiers.tiers[tier_name]
            if request.sla_ms is not None and request.sla_ms > tier.budget_ms:
                raise ApiError(ErrorCode.FORBIDDEN, f"key {key.name} may not ask for more "
                               f"than tier {tier_name}'s {tier.budget_ms:g} ms")
            if tier.models:
                allowed = (tuple(m for m in tier.models if m in key.models) if key.models
                           else tier.models)
        if request.model is not None and allowed and request.model not in allowed:
            raise ApiError(ErrorCode.FORBIDDEN,
                           f"key {key.name} may not use model {request.model}")
        return replace(request, tier=tier_name, allowed=allowed or None)

    def take(self, key: ApiKey | None, now: float | None = None) -> None:
        """Spend one token of ``key``'s bucket, or ApiError 429 with Retry-After."""
        if key is None or key.rate_per_s <= 0:
            return
        now = time.monotonic() if now is None else now
        size = key.burst or max(1.0, key.rate_per_s)
        index = self.keys.index(key)
        with self.buckets.locked():
            bucket = self.buckets.get(index) or _Bucket(size, now)
            bucket.tokens = min(size, bucket.tokens + (now - bucket.updated) * key.rate_per_s)
            bucket.updated = now
            allowed = bucket.tokens >= 1.0
            if allowed:
                bucket.tokens -= 1.0
            self.buckets.put(index, bucket)
        if allowed:
            return
        wait = (1.0 - bucket.tokens) / key.rate_per_s
        raise ApiError(ErrorCode.RATE_LIMITED, f"key {key.name} is over {key.rate_per_s:g} "
                       "requests/s", retry_after_s=max(1.0, math.ceil(wait)))


def _granted_tier(key: ApiKey, asked: str | None, tiers: TierConfig) -> str:
    """The tier a request of ``key`` runs in: the one it asked for if granted
    (an unknown name is the router's 422), else the default or the key's first."""
    if asked is not None:
        if asked in tiers.tiers and asked not in key.tiers:
            raise ApiError(ErrorCode.FORBIDDEN, f"key {key.name} may not use tier {asked}")
        if asked in key.tiers:
            return asked
        raise ApiError(ErrorCode.UNKNOWN_TIER, f"unknown tier {asked!r}; tiers: "
                       f"{', '.join(sorted(tiers.tiers))}")
    if tiers.default in key.tiers:
        return tiers.default
    for name in key.tiers:
        if name in tiers.tiers:
            return name
    raise ApiError(ErrorCode.FORBIDDEN, f"key {key.name} is granted no configured tier")


class Allowance:
    """The tokens a call has paid for and not used: admission pays for one
    image (a single detect's), so each further image of the call (a batch's,
    a stream's frames) takes a token of its own. Shared by every piece of
    work of one call."""

    def __init__(self, prepaid: int = 1) -> None:
        self._prepaid = prepaid
        self._lock = threading.Lock()

    def use(self) -> bool:
        """True if a prepaid token covers one more image (and spends it)."""
        with self._lock:
            if self._prepaid > 0:
                self._prepaid -= 1
                return True
            return False


def bearer(authorization: str | None, api_key_header: str | None) -> str | None:
    """The presented key from ``Authorization: Bearer <key>`` or ``X-API-Key``."""
    if api_key_header:
        return api_key_header.strip()
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


class AdminKey:
    """The admin credential: one secret, configured as its sha256 (never a
    caller's API key, which it is not compared with). It unlocks what only an
    operator may see (server paths, Triton addresses) and is the one check any
    admin surface makes (``allows``). Unset: nobody is admin."""

    HEADER = "x-admin-key"

    def __init__(self, sha256: str | None) -> None:
        self._digest = sha256.lower().encode() if sha256 else None

    @property
    def enabled(self) -> bool:
        return self._digest is not None

    def allows(self, presented: str | None) -> bool:
        """True for the admin credential (constant time in what was presented)."""
        if self._digest is None or not presented:
            return False
        return hmac.compare_digest(hash_key(presented.strip()).encode(), self._digest)


class FailedAttempts:
    """Failed API-key attempts per source address, in a sliding window: after
    ``limit`` in ``window_s`` the source is refused (429, before its key is even
    checked, a right one included) until the oldest failure leaves the window.
    ``limit`` 0: no throttle. The table is bounded: at ``max_sources`` the
    sources whose failures all left the window are forgotten first."""

    def __init__(self, limit: int, window_s: float = 60.0, max_sources: int = 10_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_sources = max_sources
        self._seen: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def check(self, source: str | None, now: float | None = None) -> None:
        """ApiError 429 while ``source`` is over its failures."""
        if not self.limit or source is None:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            recent = self._recent(source, now)
        if len(recent) >= self.limit:
            wait = recent[0] + self.window_s - now
            raise ApiError(ErrorCode.RATE_LIMITED, "too many failed API key attempts from "
                           "this address", retry_after_s=max(1.0, math.ceil(wait)))

    def failed(self, source: str | None, now: float | None = None) -> None:
        if not self.limit or source is None:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            if source not in self._seen and len(self._seen) >= self.max_sources:
                self._forget(now)
            recent = self._recent(source, now)
            recent.append(now)
            del recent[:-self.limit]  # only the last ``limit`` can matter
            self._seen[source] = recent

    def _recent(self, source: str, now: float) -> list[float]:
        return [t for t in self._seen.get(source, ()) if now - t < self.window_s]

    def _forget(self, now: float) -> None:
        for source in [s for s, ts in self._seen.items() if not self._recent(s, now)]:
            del self._seen[source]
        while len(self._seen) >= self.max_sources:  # all still failing: oldest first
            del self._seen[next(iter(self._seen))]

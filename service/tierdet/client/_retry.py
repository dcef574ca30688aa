"""One retry policy for every client: answers that say "come back later"."""

from __future__ import annotations

from dataclasses import dataclass, field

from tierdet.client._errors import TierdetError


@dataclass(frozen=True)
class RetryPolicy:
    """Retry answers that carry a retry-after (the gateway's 503s and 429s), within
    bounds: at most ``max_retries`` more attempts, ``max_wait_s`` per wait
    whatever the server asks, ``max_total_wait_s`` in all."""

    max_retries: int = 2
    max_wait_s: float = 5.0
    max_total_wait_s: float = 10.0

    def start(self) -> Attempts:
        return Attempts(self)


@dataclass
class Attempts:
    """The retry state of one call. The sync and async loops are the same four
    lines around it: send; on a ``TierdetError``, ``wait = attempts.after(err)``
    (which re-raises when the policy gives up); sleep ``wait``; send again."""

    policy: RetryPolicy
    count: int = 1  # attempts made, the one in progress included
    waited_s: float = field(default=0.0)

    def after(self, error: TierdetError) -> float:
        """Seconds to wait before the next attempt; raises ``error`` to give up."""
        error.attempts = self.count
        p = self.policy
        if error.retry_after_s is None or self.count > p.max_retries:
            raise error
        wait = min(max(error.retry_after_s, 0.0), p.max_wait_s)
        if self.waited_s + wait > p.max_total_wait_s:
            raise error
        self.waited_s += wait
        self.count += 1
        return wait


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(max_retries=0)

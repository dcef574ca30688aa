"""Waiting on events, never on the clock: poll the thing itself until it holds.

The deadline is a backstop against a hang, not a bound under test: it is long,
so a slow or busy host only makes the wait longer, never the test red.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
DEADLINE_S = 120.0


def wait_until(check: Callable[[], T], what: str, timeout_s: float = DEADLINE_S,
               poll_s: float = 0.05) -> T:
    """``check()`` until it returns something true; that value is returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout_s:.0f} s for {what}")
        time.sleep(poll_s)


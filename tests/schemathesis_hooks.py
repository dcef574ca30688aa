"""Schemathesis hooks for tests/test_fuzz_api.py (loaded via SCHEMATHESIS_HOOKS)."""

import schemathesis

# The only server-side statuses a client may see, each deliberate and documented.
DELIBERATE_5XX = {(503, "sla_unattainable"), (503, "model_not_ready"),
                  (504, "deadline_exceeded")}


@schemathesis.check
def no_unexpected_server_error(ctx, response, case):
    if response.status_code < 500:
        return None
    try:
        error = response.json().get("error")
    except ValueError:
        error = None
    # tierdet's own body {"error": {"code", ...}}; the Open Inference Protocol's
    # (under /v2) {"error": "<code>: <message>"}.
    code = error.get("code") if isinstance(error, dict) else (
        error.split(":", 1)[0] if isinstance(error, str) else None)
    if (response.status_code, code) not in DELIBERATE_5XX:
        raise AssertionError(f"unexpected {response.status_code} ({code}): "
                             f"{response.text[:300]}")
    return None


@schemathesis.check
def no_stack_traces(ctx, response, case):
    if b"Traceback (most recent call last)" in response.content:
        raise AssertionError("a stack trace reached the client")
    return None

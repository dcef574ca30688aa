"""Request ids and the access log.

Every call gets an id: the caller's ``X-Request-ID`` (HTTP header or gRPC
metadata) when it is sane, else a new one. It is returned on every answer,
errors included, and is in every log line written while the call runs.

The access log has one JSON line per image a call brings (a single detect,
each image of a batch, each frame of a stream: the use case writes those,
knowing the model and endpoint that answered), and one line for a call that
never reached an image (refused at admission, a bad body, another API route):
the front end writes that. Never image bytes, never a key: only the key's name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tierdet.contract.errors import ErrorCode
from tierdet.serving import tracing

HEADER = "x-request-id"
# The protocols a call may come by (the ``protocol`` of the access log, the
# metrics and the spans: a closed set) and the transport of each, whose statuses
# it is answered with: tierdet's own API, and the Open Inference Protocol (v2).
TRANSPORTS: dict[str, str] = {"http": "http", "grpc": "grpc",
                              "v2-http": "http", "v2-grpc": "grpc"}
_SANE = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


def request_id(given: str | None) -> str:
    """The caller's id if it is 1-128 characters of [A-Za-z0-9._:/+=@-], else a
    new one (a header is not trusted to be printable, short or free of newlines)."""
    if given and _SANE.fullmatch(given):
        return given
    return uuid.uuid4().hex


@dataclass
class Call:
    """What the front end knows of the call in progress."""

    request_id: str
    protocol: str
    method: str  # HTTP: "POST /v1/detect"; gRPC: the method's name
    started: float  # perf_counter()
    key: str | None = None  # the API key's name, once admitted
    code: str = "ok"  # the error code it was refused with, if any
    trace_id: str | None = None  # from the caller's traceparent, returned as X-Trace-Id
    images: int = 0  # lines the use case wrote for it

    def ids(self) -> list[tuple[str, str]]:
        """The (name, value) pairs every answer carries, errors included: the
        request id, and the trace id when the caller sent a ``traceparent``."""
        pairs = [(HEADER, self.request_id)]
        if self.trace_id is not None:
            pairs.append((tracing.TRACE_ID_HEADER, self.trace_id))
        return pairs


_current: ContextVar[Call | None] = ContextVar("tierdet_call", default=None)


def current() -> Call | None:
    return _current.get()


@contextlib.contextmanager
def call(request_id: str, protocol: str, method: str,
         trace_id: str | None = None) -> Iterator[Call]:
    """The call in progress for this task (and the tasks it starts)."""
    token = _current.set(Call(request_id, protocol, method, time.perf_counter(),
                              trace_id=trace_id))
    try:
        yield _current.get()  # type: ignore[misc]
    finally:
        _current.reset(token)


def incoming(protocol: str, method: str, given_id: str | None,
             traceparent: str | None) -> contextlib.AbstractContextManager[Call]:
    """The call of a request that brought these headers (HTTP) or metadata
    (gRPC): each front end reads its own transport, the ids are made here."""
    return call(request_id(given_id), protocol, method, tracing.trace_id(traceparent))


def ended(call: Call, status: int | str, log: AccessLog | None) -> None:
    """What a front end records as a call ends: its outcome on the server span,
    and in ``log`` its access-log line if it reached no image (the use case
    wrote a line per image). ``log`` None: a call with no line of its own."""
    tracing.annotate(request_id=call.request_id, protocol=call.protocol, code=call.code,
                     status=status)
    if log is not None and not call.images:
        log.write(call, code=call.code, status=status,
                  latency_ms=round((time.perf_counter() - call.started) * 1e3, 1))


def note_refusal(code: ErrorCode) -> None:
    """The error code the call is being answered with."""
    if (c := current()) is not None:
        c.code = code.value


class AccessLog:
    """JSON lines to stderr, to a file (appended), or nowhere (``off``)."""

    def __init__(self, target: str) -> None:
        self._lock = threading.Lock()
        self._stream: TextIO | None = None
        if target == "stderr":
            self._stream = sys.stderr
        elif target != "off":
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._stream = path.open("a", encoding="utf-8", buffering=1)

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def write(self, call: Call, **fields: Any) -> None:
        """One line for ``call``; ``fields`` say what it was (model, outcome...)."""
        if self._stream is None:
            return
        line = {"ts": _now(), "request_id": call.request_id, "protocol": call.protocol,
                "method": call.method, "key": call.key, **fields}
        text = json.dumps(line, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            self._stream.write(text)
            self._stream.flush()

    def close(self) -> None:
        if self._stream is not None and self._stream is not sys.stderr:
            self._stream.close()
        self._stream = None


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e3):03d}Z"


def tag_log_records() -> None:
    """Every log record made while a call runs ends with its request id."""
    make = logging.getLogRecordFactory()
    if getattr(make, "tierdet_tagged", False):
        return

    def tagged(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        if (c := current()) is not None:
            record.msg = f"{record.msg} [request {c.request_id}]"
        return record

    tagged.tierdet_tagged = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(tagged)

"""ASGI middlewares: the request's id and access-log line, refusing requests
beyond the concurrency bound before they are read, and oversized bodies while
they stream in; reading what is left of a refused request's body before its
answer, so that the answer arrives."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.frontends.errors import http_response, is_v2
from tierdet.serving import access, tracing
from tierdet.serving.access import AccessLog

log = logging.getLogger("tierdet.http")


def is_api(path: str) -> bool:
    """An API call (/v1, and /v2 but its health probes): counted, logged, traced."""
    return path.startswith("/v1/") or (is_v2(path) and not path.startswith("/v2/health/"))


class RequestContext:
    """The outermost layer: every HTTP request runs as an ``access.call`` with an
    id (the caller's ``X-Request-ID`` when sane, else a new one) that comes back
    on the answer, errors included. An API call (``is_api``) that reached no
    image gets its access-log line here; images get theirs from the use case."""

    def __init__(self, app: ASGIApp, log: AccessLog) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        ids: list[tuple[bytes, bytes]] = []  # the call's, once it is made
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *ids]
            await send(message)

        method = f"{scope['method']} {scope['path']}"
        api = is_api(scope["path"])  # spans for the API, not probes or files
        protocol = "v2-http" if is_v2(scope["path"]) else "http"
        with access.incoming(protocol, method, headers.get(access.HEADER),
                             headers.get("traceparent")) as call, \
                (tracing.server_span(method, headers) if api else contextlib.nullcontext()):
            ids = [(k.encode(), v.encode()) for k, v in call.ids()]
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                if status:  # the answer has begun: nothing more can be said
                    raise
                # Answered here, not by Starlette's outermost handler, so that
                # the id comes back on this answer too.
                log.exception("unhandled error")
                await http_response(ApiError(ErrorCode.INTERNAL, "internal error"),
                                    scope["path"])(scope, receive, send_with_id)
            finally:
                access.ended(call, status, self.log if api else None)


class BodyLimit:
    """A declared Content-Length over the limit is answered 413 before a byte of
    the body is read; a body without one (chunked) is counted as it arrives and
    refused as soon as it passes the limit, so the gateway never holds more than
    the limit of any request in memory.

    ``limit_for(path)``: the most bytes a body to ``path`` may have, None for no limit.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int | None]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit_for(scope["path"]) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                await http_response(ApiError(ErrorCode.INVALID_OPTION,
                                             "Content-Length is not a number"),
                                    scope["path"])(scope, receive, send)
                return
            if too_large:
                response = http_response(ApiError(
                    ErrorCode.IMAGE_TOO_LARGE,
                    f"the request body is over the limit of {limit} bytes"), scope["path"])
                # The unread body must not be parsed as the next request.
                response.headers["Connection"] = "close"
                await response(scope, receive, send)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise ApiError(ErrorCode.IMAGE_TOO_LARGE,
                               f"the request body passed the limit of {limit} bytes")
            return message

        await self.app(scope, counted, send)


class ConcurrencyLimit:
    """At most ``limit`` images' worth of API requests (``is_api``) in
    progress: one more is answered 503 ``overloaded`` before its body is read,
    so what the gateway holds stays bounded (serving/memory.py). A request
    counts ``units_for(scope)`` (a batch: the images its Content-Length can
    hold). Probes, metrics and the page are not counted and always answer.
    ``refused()`` is told of each refusal."""

    def __init__(self, app: ASGIApp, limit: int, units_for: Callable[[Scope], int],
                 refused: Callable[[], None]) -> None:
        self.app = app
        self.limit = limit
        self.units_for = units_for
        self.refused = refused
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_api(scope["path"]):
            await self.app(scope, receive, send)
            return
        units = min(self.units_for(scope), self.limit)  # a whole-limit batch still runs alone
        if self.active + units > self.limit:
            self.refused()
            await http_response(ApiError(
                ErrorCode.OVERLOADED, "the gateway is serving all the requests it may at "
                "once (TIERDET_MAX_CONCURRENCY)", retry_after_s=1.0),
                scope["path"])(scope, receive, send)
            return
        self.active += units
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= units


class DrainBody:
    """After the answer to a request whose body has not all been read (a
    refusal: 413, 503, 401...) is written, read the rest of the body and drop
    it before the response ends.

    uvicorn closes such a connection as soon as the response ends, and the
    kernel answers the bytes the client is still sending to a closed socket
    with a reset, which takes the unread answer with it: the client sees a
    transport error instead of its 413. Read to the end, the connection
    closes cleanly after the answer (or serves the next request). As a web
    server's lingering close, the reading is bounded: at most ``max_s``
    seconds, ``idle_s`` between chunks and ``max_bytes``; nothing is kept, so
    what the gateway holds does not grow (uvicorn reads 64 KB ahead at most).
    A client that asked to ``Expect: 100-continue`` has sent nothing."""

    def __init__(self, app: ASGIApp, max_s: float = 30.0, idle_s: float = 2.0,
                 max_bytes: int = 1 << 30) -> None:
        self.app = app
        self.max_s = max_s
        self.idle_s = idle_s
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        expects = dict(scope["headers"]).get(b"expect", b"").lower() == b"100-continue"
        read_all = False

        async def tracked() -> Message:
            nonlocal read_all
            message = await receive()
            read_all = read_all or message["type"] != "http.request" or not message.get(
                "more_body", False)
            return message

        unfinished = False  # the answer is out, the response not ended

        async def answer(message: Message) -> None:
            nonlocal unfinished
            last = message["type"] == "http.response.body" and not message.get("more_body")
            if not last or read_all or expects:
                await send(message)
                return
            # The whole answer goes out now (its Content-Length tells the client
            # it is complete); the response ends once the body is read.
            await send({**message, "more_body": True})
            unfinished = True

        await self.app(scope, tracked, answer)
        if unfinished:  # read once the app is done: it holds no concurrency unit meanwhile
            await self._drain(tracked)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _drain(self, receive: Receive) -> None:
        deadline, seen = time.monotonic() + self.max_s, 0
        while seen <= self.max_bytes and (left := deadline - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(receive(), min(self.idle_s, left))
            except asyncio.TimeoutError:
                return
            seen += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

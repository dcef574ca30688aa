"""ASGI middlewares that keep callers from holding the gateway or learning from
its answers: ``BodyDeadline`` (a request body must arrive in full in time) and
``SafeHeaders`` (no content sniffing, no caching of answers, no server banner).
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tierdet.contract.errors import ApiError, ErrorCode

# Every answer: a browser must not guess another type than the one given, and no
# cache (a proxy's, a browser's) keeps detections of someone's image.
SAFE_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"))


class BodyDeadline:
    """A request's body must arrive in full within ``timeout_s`` of the app
    starting on it (its head is in by then): reading past that raises
    ``request_timeout`` (408), so a body that trickles in (slowloris) cannot
    hold a concurrency slot. What is read after the body (waiting for the
    client to go away) is not bounded here."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise ApiError(ErrorCode.REQUEST_TIMEOUT, f"the request body did not arrive "
                               f"within {self.timeout_s:g} s") from None
            body_done = message["type"] != "http.request" or not message.get("more_body")
            return message

        await self.app(scope, timed_receive, send)


class SafeHeaders:
    """``nosniff`` and ``no-store`` on every answer, and no ``server`` header
    (uvicorn's own is turned off where it is configured)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_safe(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SAFE_HEADERS}
                headers = [(k, v) for k, v in message.get("headers", ()) if
                           k.lower() not in names and k.lower() != b"server"]
                message["headers"] = [*headers, *SAFE_HEADERS]
            await send(message)

        await self.app(scope, receive, send_safe)

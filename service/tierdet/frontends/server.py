"""Run the gateway: HTTP and gRPC front ends in one event loop (per worker:
``workers`` runs several).

Shutdown (SIGTERM/SIGINT): stop accepting, let in-flight requests finish
within ``grace_s``, then exit. ``tierdet serve`` and the container
entrypoint both call ``run_gateway``: there is one way to start it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator

import grpc
import uvicorn
from grpc_health.v1 import health

from tierdet.frontends.connections import head_deadline_protocol
from tierdet.frontends.grpc_api import create_grpc_server, set_health
from tierdet.frontends.http_api import create_app
from tierdet.frontends.workers import Job, listen_shared, run_workers
from tierdet.serving import access, memory, tracing
from tierdet.serving.card_folder import CardFolder
from tierdet.serving.decoding import configure_decoders
from tierdet.serving.metrics import Metrics
from tierdet.serving.pool import EndpointPool, Target
from tierdet.serving.settings import Settings
from tierdet.serving.triton import TritonClient
from tierdet.serving.usecase import Detector

log = logging.getLogger("tierdet")
REFRESH_S = 1.0
STATS_EVERY = 5  # refresh ticks between polls of Triton's statistics
IDLE_POLL_S = 0.25  # Triton's queue, while no request comes


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: ours stop HTTP and gRPC together.
    ``listening`` is set once its sockets accept connections."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.listening.set()


async def _watch_models(detector: Detector, health_servicer: health.HealthServicer,
                        stop: asyncio.Event) -> None:
    """Keep readiness current, so a restarted Triton is picked up by itself."""
    ticks = 0
    while not stop.is_set():
        try:
            ready, _, _ = await detector.readiness()
            await set_health(health_servicer, ready)
            if ticks % STATS_EVERY == 0:
                await detector.changes.restore()  # first: statistics may fail
                await detector.catalog.refresh_statistics()
                detector.catalog.refresh_accuracy()
        except Exception:
            log.exception("model refresh failed")
        ticks += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), REFRESH_S)


async def _watch_queues(detector: Detector, every_s: float, stop: asyncio.Event) -> None:
    """Keep the router's view of every Triton's queue current (all gateways' work):
    every ``every_s`` while requests come, every IDLE_POLL_S when none came for a
    second (an idle gateway need not make Triton render its metrics 20 times a
    second; its view stays younger than the router's limit, 1 s)."""
    while not stop.is_set():
        try:
            await detector.poll_queues()
        except Exception:
            log.exception("queue poll failed")
        busy = time.monotonic() - detector.last_request_at < 1.0
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s if busy else max(every_s, IDLE_POLL_S))


def triton_pool(settings: Settings) -> EndpointPool:
    """The Triton endpoints ``TIERDET_TRITON_URL`` names, one client each."""
    def connect(target: Target) -> TritonClient:
        return TritonClient(target.url, settings.triton_shared_memory,
                            settings.triton_keepalive_ms, settings.triton_api_key)

    return EndpointPool.from_spec(settings.triton_url, connect, settings.triton_metrics_port,
                                  settings.triton_resolve_s)


def _grpc_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert_file is None:
        return None
    if settings.tls_key_file is None:
        raise ValueError("TIERDET_TLS_CERT_FILE needs TIERDET_TLS_KEY_FILE")
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())])


def _check_card_folder(settings: Settings) -> None:
    """A folder of cards changes models as the admin API does: refuse to start
    where that cannot work rather than fail each card."""
    if settings.cards_watch is None:
        return
    if settings.cards_dir is None or settings.home is None:
        raise ValueError("TIERDET_CARDS_WATCH needs TIERDET_CARDS_DIR (where its cards' "
                         "graphs are) and TIERDET_HOME (where they are built)")
    if settings.workers > 1:
        raise ValueError("TIERDET_CARDS_WATCH needs a gateway of one worker "
                         "(TIERDET_WORKERS=1): each worker keeps its own catalog")
    if not os.access(settings.home, os.W_OK):
        raise ValueError(f"TIERDET_CARDS_WATCH: the gateway builds cards into TIERDET_HOME "
                         f"({settings.home}), which it cannot write (compose: "
                         "GATEWAY_MODELS_ACCESS=rw)")


async def run_gateway(settings: Settings, stop: asyncio.Event | None = None,
                      grace_s: float = 10.0) -> None:
    """Serve until SIGTERM/SIGINT or ``stop``: in this process, or with
    ``TIERDET_WORKERS`` > 1 in that many worker processes sharing the ports."""
    _check_card_folder(settings)
    stop = stop or asyncio.Event()
    _stop_on_signals(stop)
    log.info("gateway memory: %s (%d workers, %d image slots each; see serving/memory.py)",
             memory.bound(settings).describe(), settings.workers, memory.image_slots(settings))
    if settings.workers > 1:
        await run_workers(settings, stop, grace_s)
    else:
        await serve(settings, stop, grace_s)


async def _ready(http: _Uvicorn, job: Job | None) -> None:
    """Tell the supervisor this worker serves (gRPC started before HTTP): from now
    on, its death is a crash to recover from, not a failed start."""
    await http.listening.wait()
    if job is not None:
        job.mark_ready(os.getpid())


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


async def serve(settings: Settings, stop: asyncio.Event | None = None, grace_s: float = 10.0,
                job: Job | None = None) -> None:
    """The gateway in this process; as one of several workers with ``job``."""
    if "MALLOC_ARENA_MAX" not in os.environ:  # the operator's choice stands
        memory.limit_arenas()
    configure_decoders(settings.max_image_pixels)
    # httpx logs each request at INFO: a line per queue poll, 20 a second.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    access.tag_log_records()
    if tracing.configure():
        log.info("tracing: spans to %s over OTLP",
                 os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                 or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    if stop is None:
        stop = asyncio.Event()
        _stop_on_signals(stop)
    triton = triton_pool(settings)
    detector = Detector(settings, triton, Metrics())
    if job is not None:
        detector.keys.share(job.buckets)
    await detector.catalog.refresh()
    for info in detector.catalog.infos():
        log.info("model %s: ready=%s weights=%s", info.name, info.ready, info.weights)

    grpc_server, health_servicer, grpc_port = create_grpc_server(
        detector, f"{settings.grpc_host}:{settings.grpc_port}", _grpc_credentials(settings),
        share_port=job is not None)
    await grpc_server.start()
    tls = settings.tls_cert_file is not None
    http = _Uvicorn(uvicorn.Config(
        create_app(detector), host=settings.http_host, port=settings.http_port,
        log_level=settings.log_level, access_log=False, timeout_graceful_shutdown=int(grace_s),
        # Requests are bounded by the app (ConcurrencyLimit, a JSON 503); uvicorn's
        # bound counts connections, idle keep-alive ones too: a backstop only.
        lifespan="off", limit_concurrency=4 * settings.max_concurrency + 64,
        # No banner; a request head must arrive in time (connections). The loop is
        # asyncio's, chosen here: with uvloop installed (another package may pull
        # uvicorn[standard] in) uvicorn would otherwise switch to it unasked.
        server_header=False, http=head_deadline_protocol(settings.header_timeout_s),
        loop="asyncio",
        ssl_certfile=str(settings.tls_cert_file) if tls else None,
        ssl_keyfile=str(settings.tls_key_file) if tls else None))
    sockets = [listen_shared(settings.http_host, settings.http_port)] if job else None
    http_task = asyncio.create_task(http.serve(sockets))
    watch_task = asyncio.create_task(_watch_models(detector, health_servicer, stop))
    queue_task = asyncio.create_task(
        _watch_queues(detector, settings.triton_queue_poll_ms / 1e3, stop))
    cards_task = asyncio.create_task(
        CardFolder(settings.cards_watch, detector.changes).watch(settings.cards_watch_s, stop)
        if settings.cards_watch else stop.wait())
    log.info("gateway listening: %s://%s:%d grpc%s %s:%d, triton %s, API keys %s",
             "https" if tls else "http", settings.http_host, settings.http_port,
             "+tls" if tls else "", settings.grpc_host, grpc_port, settings.triton_url,
             f"required ({len(detector.keys.keys)})" if detector.keys.enabled else "off")
    stop_task = asyncio.create_task(stop.wait())
    ready_task = asyncio.create_task(_ready(http, job))
    try:
        await asyncio.wait({stop_task, http_task}, return_when=asyncio.FIRST_COMPLETED)
        if http_task.done() and not stop.is_set():
            raise RuntimeError(f"the HTTP server stopped: cannot serve on "
                               f"{settings.http_host}:{settings.http_port}?")
    finally:
        stop_task.cancel()
        ready_task.cancel()
        log.info("shutting down: finishing in-flight requests (grace %.0f s)", grace_s)
        await set_health(health_servicer, False)
        http.should_exit = True
        await asyncio.gather(grpc_server.stop(grace_s), http_task, return_exceptions=True)
        watch_task.cancel()
        queue_task.cancel()
        cards_task.cancel()  # a change it was making is undone before Triton's clients close
        await asyncio.gather(cards_task, return_exceptions=True)
        await detector.shadow.close()
        await detector.canaries.close()
        await triton.close()
        detector.access.close()
        tracing.shutdown()
        log.info("gateway stopped")

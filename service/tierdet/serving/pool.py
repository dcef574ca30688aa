"""The Triton endpoints a gateway may send work to, and what each one reports.

``TIERDET_TRITON_URL`` names them: a comma-separated list of gRPC endpoints
(``host:port``), and/or ``dns:///name:port``, a name re-resolved every few
seconds to every address it has (a Kubernetes headless Service: one address
per Triton pod). An entry may say where its metrics are
(``host:port?metrics=PORT``); else ``TIERDET_TRITON_METRICS_PORT`` on the
same host.

Per endpoint the pool keeps whether it answers, which models it has ready
(Triton's repository index, re-read by the model watcher every second) and
how many requests wait in its scheduler queue per model (Triton's
``nv_inference_pending_request_count``, and how many it has taken in, polled
every ~50 ms). That queue is
the device's truth, the same for every gateway that shares the device: the
router adds it to its own in-flight work (``routing.LatencyModel``).

An endpoint that fails a call (connection refused, UNAVAILABLE) leaves the
pool at once (``mark_down``); the watcher's next successful read brings it
back. Endpoints found or lost by re-resolution join and leave without a
restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from tierdet.serving.backend import Backend, QueueReport

log = logging.getLogger("tierdet")

DNS_PREFIX = "dns:///"
CLOSE_AFTER_S = 30.0  # a departed endpoint's client outlives the calls sent to it


async def _close_later(backend: Backend, delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    with contextlib.suppress(Exception):
        await backend.close()


@dataclass(frozen=True)
class Target:
    """One endpoint: where to call it and where its metrics are (None: not read)."""

    url: str  # host:port (gRPC)
    metrics_url: str | None


@dataclass
class Endpoint:
    target: Target
    backend: Backend
    up: bool = False
    index: dict[str, tuple[str, str]] = field(default_factory=dict)  # model -> (state, reason)
    report: QueueReport | None = None  # its queue, as Triton last reported it
    report_at: float | None = None  # monotonic time that report was asked for

    @property
    def url(self) -> str:
        return self.target.url

    def ready_models(self) -> list[str]:
        return [m for m, (state, _) in self.index.items() if state == "READY"] if self.up else []


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"triton endpoint {text!r}: expected host:port")
    return host.strip("[]"), int(port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_targets(spec: str, metrics_port: int) -> tuple[list[Target], list[tuple[str, int]]]:
    """``TIERDET_TRITON_URL`` -> (fixed targets, DNS names to resolve)."""
    fixed, names = [], []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        if entry.startswith(DNS_PREFIX):
            names.append(_host_port(entry[len(DNS_PREFIX):]))
            continue
        parts = urlsplit("//" + entry)
        host, port = _host_port(parts.netloc)
        query = parse_qs(parts.query)
        mport = int(query["metrics"][0]) if "metrics" in query else metrics_port
        fixed.append(Target(_join(host, port),
                            f"http://{_join(host, mport)}/metrics" if mport else None))
    if not fixed and not names:
        raise ValueError(f"no triton endpoint in {spec!r}")
    return fixed, names


def addresses(name: str, port: int) -> list[str]:
    """Every address ``name`` has now (blocking: run it in a thread)."""
    infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def _targets(hosts: Iterable[str], port: int, metrics_port: int) -> list[Target]:
    return [Target(_join(h, port), f"http://{_join(h, metrics_port)}/metrics"
                   if metrics_port else None) for h in hosts]


class EndpointPool:
    def __init__(self, connect: Callable[[Target], Backend], fixed: Iterable[Target] = (),
                 names: Iterable[tuple[str, int]] = (), metrics_port: int = 0,
                 resolve_s: float = 5.0,
                 resolver: Callable[[str, int], list[str]] = addresses) -> None:
        self._connect = connect
        self._resolver = resolver
        self._fixed = list(fixed)
        self._names = list(names)
        self._metrics_port = metrics_port
        self._resolve_s = resolve_s
        self._resolved_at: float | None = None
        self.endpoints: dict[str, Endpoint] = {}
        self._closing: set[asyncio.Task[None]] = set()
        for target in self._fixed:
            self._add(target)

    @classmethod
    def from_spec(cls, spec: str, connect: Callable[[Target], Backend], metrics_port: int,
                  resolve_s: float = 5.0) -> EndpointPool:
        fixed, names = parse_targets(spec, metrics_port)
        return cls(connect, fixed, names, metrics_port, resolve_s)

    @classmethod
    def single(cls, backend: Backend, url: str = "local") -> EndpointPool:
        """A pool of one endpoint (unit tests, tools that hold one backend)."""
        return cls(lambda _: backend, [Target(url, None)])

    def _add(self, target: Target) -> None:
        self.endpoints[target.url] = Endpoint(target, self._connect(target))
        log.info("triton endpoint %s joined the pool", target.url)

    def backend(self, url: str) -> Backend:
        return self.endpoints[url].backend

    def first(self) -> Backend:
        """Any endpoint's backend (one that is up, if any)."""
        ups = [e for e in self.endpoints.values() if e.up]
        return (ups or list(self.endpoints.values()))[0].backend

    @property
    def any_up(self) -> bool:
        return any(e.up for e in self.endpoints.values())

    def placement(self) -> dict[str, list[str]]:
        """Model -> the endpoints that are up and have it ready."""
        out: dict[str, list[str]] = {}
        for endpoint in self.endpoints.values():
            for model in endpoint.ready_models():
                out.setdefault(model, []).append(endpoint.url)
        return out

    def states(self) -> dict[str, tuple[str, str]]:
        """Model -> (state, reason) across the pool: READY where any endpoint has it
        ready, else what the first endpoint that knows it says."""
        out: dict[str, tuple[str, str]] = {}
        for endpoint in self.endpoints.values():
            if not endpoint.up:
                continue
            for model, state in endpoint.index.items():
                if model not in out or (state[0] == "READY" and out[model][0] != "READY"):
                    out[model] = state
        return out

    def mark_down(self, url: str) -> None:
        """A call to ``url`` found it unreachable: route nothing more there until
        the watcher reads it again."""
        endpoint = self.endpoints.get(url)
        if endpoint is not None and endpoint.up:
            endpoint.up = False
            endpoint.report = endpoint.report_at = None
            log.warning("triton endpoint %s is unreachable: out of the pool", url)

    def model_gone(self, url: str, model: str) -> None:
        """``url`` answered that ``model`` is not loaded: not routed there until the
        watcher sees it ready again."""
        endpoint = self.endpoints.get(url)
        if endpoint is not None and model in endpoint.index:
            endpoint.index[model] = ("UNAVAILABLE", "not loaded at this endpoint")

    async def refresh(self) -> None:
        """Re-resolve DNS names when due; re-read every endpoint's repository index."""
        if self._names and (self._resolved_at is None
                            or time.monotonic() - self._resolved_at >= self._resolve_s):
            await self._re_resolve()
        await asyncio.gather(*(self._read_index(e) for e in list(self.endpoints.values())))

    async def _re_resolve(self) -> None:
        found: dict[str, Target] = {t.url: t for t in self._fixed}
        for name, port in self._names:
            try:
                hosts = await asyncio.to_thread(self._resolver, name, port)
                targets = _targets(hosts, port, self._metrics_port)
            except OSError as exc:  # keep what we had: a DNS hiccup is not a dead pod
                log.warning("cannot resolve %s: %s", name, exc)
                return
            found.update({t.url: t for t in targets})
        self._resolved_at = time.monotonic()
        for url in set(self.endpoints) - set(found):
            gone = self.endpoints.pop(url)
            log.info("triton endpoint %s left the pool (no longer resolved)", url)
            # Calls already sent there finish (or fail over) before it is closed.
            self._closing.add(asyncio.create_task(_close_later(gone.backend, CLOSE_AFTER_S)))
            self._closing = {t for t in self._closing if not t.done()}
        for url in set(found) - set(self.endpoints):
            self._add(found[url])

    async def _read_index(self, endpoint: Endpoint) -> None:
        try:
            endpoint.index = await endpoint.backend.repository_models()
        except Exception:  # an unreachable Triton is a state, not an error
            if endpoint.up:
                log.warning("triton endpoint %s is unreachable", endpoint.url)
            endpoint.up = False
            return
        if not endpoint.up:
            log.info("triton endpoint %s is up (%d models ready)", endpoint.url,
                     len([s for s, _ in endpoint.index.values() if s == "READY"]))
        endpoint.up = True

    async def poll_queues(self, timeout_s: float = 0.5) -> None:
        """Ask every endpoint that is up how many requests wait per model."""
        async def one(endpoint: Endpoint) -> None:
            if not endpoint.up or endpoint.target.metrics_url is None:
                return
            asked = time.monotonic()
            try:
                endpoint.report = await endpoint.backend.queued(
                    endpoint.target.metrics_url, timeout_s)
            except Exception:  # a server too busy to answer in time: keep the last
                return  # report, which ages out of use (the router's limit, 1 s)
            endpoint.report_at = asked

        await asyncio.gather(*(one(e) for e in list(self.endpoints.values())))

    def queues(self, max_age_s: float) -> Mapping[str, tuple[float, QueueReport]]:
        """Endpoint -> (when asked, its queue report), for fresh reports only."""
        now = time.monotonic()
        return {url: (e.report_at, e.report) for url, e in self.endpoints.items()
                if e.up and e.report is not None and e.report_at is not None
                and now - e.report_at <= max_age_s}

    async def close(self) -> None:
        for task in self._closing:
            task.cancel()
        for endpoint in self.endpoints.values():
            with contextlib.suppress(Exception):
                await endpoint.backend.close()

"""Several gateway processes behind one pair of ports (``TIERDET_WORKERS``).

One Python process spends 12-20 ms of CPU on a camera-sized JPEG (decode,
letterbox, HTTP or gRPC framing), so it feeds a device a few dozen images a
second and leaves the pod's other cores idle. Each worker is a whole gateway
(its own event loop, router, Triton clients, shared-memory regions) bound to
the same ports with SO_REUSEPORT, so the kernel spreads connections over them.
What must be one fact for all of them is shared:

- the device's queue: each router reads every Triton's queue
  (``TIERDET_TRITON_METRICS_PORT``), and that queue holds the other workers' work;
- metrics: prometheus-client's multiprocess files, read by whichever worker a
  scrape reaches;
- API-key rate limits: buckets in one mapped file (``security.SharedBuckets``).

The process that was started supervises: it restarts a worker that dies and
passes the stop on. A worker that exits before it ever served, on its first
start, is a failed start (a port taken, a bad setting): that stops the
gateway. Once a worker has served, its death (the OOM killer, a crash) is
always recovered from, however soon it comes. Workers are fresh interpreters
(not forks, ``tierdet.frontends.worker``), started with the multiprocess
variable already set: prometheus-client reads it at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from tierdet.serving.metrics import MULTIPROC_ENV
from tierdet.serving.settings import ConfigError, Settings

log = logging.getLogger("tierdet.workers")
JOB_ENV = "TIERDET_WORKER_JOB"  # a worker's Job, as JSON
MAX_BACKOFF_S = 30.0
POLL_S = 0.2
BACKLOG = 2048  # uvicorn's default


class Job(BaseModel):
    """What a worker is told: its place, the shared folder, the settings."""

    index: int
    count: int
    run_dir: Path
    settings: Settings

    @property
    def buckets(self) -> Path:
        return self.run_dir / "rate-buckets"

    def ready_file(self, pid: int) -> Path:
        return self.run_dir / f"ready-{pid}"

    def mark_ready(self, pid: int) -> None:
        """Called by the worker once both its servers accept connections."""
        self.ready_file(pid).touch()


def _address(host: str, port: int) -> tuple[socket.socket, tuple]:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return socket.socket(family, kind, proto), address


def listen_shared(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` that other processes of this user may
    also bind (SO_REUSEPORT: the kernel spreads new connections over them)."""
    sock, address = _address(host, port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.listen(BACKLOG)
    return sock


@contextlib.contextmanager
def _held_ports(settings: Settings) -> Iterator[Settings]:
    """Hold both ports for the workers, as one gateway's: a port something
    already listens on is refused here (SO_REUSEPORT alone would let these
    workers join another gateway's), and port 0 becomes one port every worker
    binds. The holding sockets are bound, never listening: they take no
    connections."""
    held: list[socket.socket] = []
    update: dict[str, int] = {}
    try:
        for name, host in (("http_port", settings.http_host), ("grpc_port", settings.grpc_host)):
            port = getattr(settings, name)
            if port:
                probe, address = _address(host, port)
                with probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        probe.bind(address)
                    except OSError as exc:
                        raise ConfigError(f"{host}:{port} is in use "
                                          f"(TIERDET_{name.upper()}): {exc.strerror}") from None
            sock, address = _address(host, port)
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAITs
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            update[name] = sock.getsockname()[1]
        yield settings.model_copy(update=update)
    finally:
        for sock in held:
            sock.close()


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    backoff_s: float = 1.0
    starts: int = field(default=0)


class Supervisor:
    def __init__(self, settings: Settings, run_dir: Path, grace_s: float) -> None:
        # The bound on requests at once is the gateway's: each worker holds its share.
        self.settings = settings.model_copy(
            update={"max_concurrency": settings.worker_concurrency()})
        self.run_dir = run_dir
        self.grace_s = grace_s
        self.metrics_dir = run_dir / "metrics"
        self.metrics_dir.mkdir()
        self.workers = [_Worker(i) for i in range(settings.workers)]

    def job(self, worker: _Worker) -> Job:
        return Job(index=worker.index, count=len(self.workers), run_dir=self.run_dir,
                   settings=self.settings)

    def start(self, worker: _Worker) -> None:
        env = {**os.environ, MULTIPROC_ENV: str(self.metrics_dir),
               JOB_ENV: self.job(worker).model_dump_json(), "TIERDET_GRACE_S": str(self.grace_s)}
        worker.process = subprocess.Popen([sys.executable, "-m", "tierdet.frontends.worker"],
                                          env=env)
        worker.started_at = time.monotonic()
        worker.starts += 1

    def check(self, now: float) -> None:
        """Restart workers that died (with backoff); a worker that exits before it
        ever served, on the gateway's start (a port taken, a bad setting), stops
        the gateway."""
        for worker in self.workers:
            process = worker.process
            if process is not None and process.poll() is not None:
                self._forget(process.pid)
                served = self.job(worker).ready_file(process.pid)
                if worker.starts == 1 and not served.exists():
                    raise RuntimeError(f"gateway worker {worker.index} exited at start "
                                       f"(code {process.returncode}); see its log above")
                served.unlink(missing_ok=True)
                if now - worker.started_at > 60.0:
                    worker.backoff_s = 1.0  # it ran a while: not a crash loop
                log.error("gateway worker %d (pid %d) exited with code %s; restarting in "
                          "%.0f s", worker.index, process.pid, process.returncode,
                          worker.backoff_s)
                worker.process = None
                worker.restart_at = now + worker.backoff_s
                worker.backoff_s = min(worker.backoff_s * 2, MAX_BACKOFF_S)
            if worker.process is None and now >= worker.restart_at:
                self.start(worker)

    def _forget(self, pid: int) -> None:
        """A dead worker's live gauges (requests in flight) stop counting; its
        counters stay, so nothing it answered is lost from the totals."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self.metrics_dir))

    async def stop(self) -> None:
        """SIGTERM every worker (each finishes its in-flight requests within the
        grace), then SIGKILL what is left."""
        live = [w.process for w in self.workers if w.process and w.process.poll() is None]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s + 5.0
        while any(p.poll() is None for p in live) and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        for process in live:
            if process.poll() is None:
                log.error("gateway worker pid %d did not stop in time: killed", process.pid)
                process.kill()
                process.wait()


async def run_workers(settings: Settings, stop: asyncio.Event, grace_s: float) -> None:
    """Serve with ``settings.workers`` processes until ``stop``."""
    run_dir = Path(tempfile.mkdtemp(prefix="tierdet-gateway-"))
    try:
        with _held_ports(settings) as concrete:
            supervisor = Supervisor(concrete, run_dir, grace_s)
            log.info("gateway: %d workers on http %s:%d, grpc %s:%d", concrete.workers,
                     concrete.http_host, concrete.http_port, concrete.grpc_host,
                     concrete.grpc_port)
            try:
                while not stop.is_set():
                    supervisor.check(time.monotonic())
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), POLL_S)
            finally:
                await supervisor.stop()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

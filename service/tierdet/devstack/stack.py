"""Start the real stack on loopback from Python: the one launcher.

``tierdet up`` (``tierdet.devstack.up``), the tests, the accuracy tools and
the benchmarks all start Triton through :func:`start_triton` and gateways
through :class:`GatewayProcess` (``tierdet serve`` in a child process), on
free ports, with handles to stop them; :func:`running_stack` does both.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tierdet.build.models import BuiltModel, assemble
from tierdet.devstack.triton import LocalTriton
from tierdet.registry.profile import LatencyProfile

log = logging.getLogger("tierdet.stack")


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on, never one this process handed out
    before: the kernel may give the same free port to two binds in a row (a
    Triton asked for HTTP and gRPC on one port fails to start)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None,
              ca_file: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` dies. ``ca_file``
    trusts a (self-signed) certificate for https URLs."""
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} while waiting for {url}")
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=context) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def stop_process(proc: subprocess.Popen, timeout_s: float = 20.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def start_triton(models: Iterable[BuiltModel], home: Path, workdir: Path,
                 threads: int = 0, timeout_s: float = 120.0,
                 ports: tuple[int, int, int] | None = None,
                 profile: LatencyProfile | None = None, partial: bool = False) -> LocalTriton:
    """tritonserver on loopback serving ``models`` (installed into ``home``'s
    cpu-local repository, queue delays tuned from ``profile``), on ``ports``
    (HTTP, gRPC, metrics; free ones by default), once every model has loaded
    or failed. A model that failed is an error, unless ``partial``: then it
    is logged and the others serve."""
    models = list(models)
    workdir.mkdir(parents=True, exist_ok=True)
    repository = assemble(models, home, "cpu-local", intra_op_threads=threads, profile=profile)
    http_port, grpc_port, metrics_port = ports or (free_port(), free_port(), free_port())
    server = LocalTriton(repository, workdir, http_port=http_port, grpc_port=grpc_port,
                         metrics_port=metrics_port, models=[m.spec.name for m in models],
                         log_path=workdir / "triton.log")
    server.start()
    try:
        states = server.wait_ready(timeout_s)
    except Exception:
        server.stop()
        raise
    failed = sorted(name for name, ready in states.items() if not ready)
    if failed and not partial:
        server.stop()
        raise RuntimeError(f"models not ready: {states}; see {server.log_path}")
    for name in failed:
        log.error("model %s failed to load; see %s", name, server.log_path)
    return server


@dataclass
class GatewayProcess:
    http: str
    grpc: str
    process: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, triton_url: str, log: Path, timeout_s: float = 60.0,
              **settings: str) -> GatewayProcess:
        """``tierdet serve`` in a child process; ``settings`` become TIERDET_* vars
        (with ``tls_cert_file`` set, the URLs are https and the cert is trusted)."""
        http_port, grpc_port = free_port(), free_port()
        cert = settings.get("tls_cert_file")
        env = {
            **os.environ,
            "TIERDET_TRITON_URL": triton_url,
            "TIERDET_HTTP_PORT": str(http_port),
            "TIERDET_GRPC_PORT": str(grpc_port),
            **{f"TIERDET_{k.upper()}": v for k, v in settings.items()},
        }
        proc = subprocess.Popen([sys.executable, "-m", "tierdet.cli", "serve"], env=env,
                                stdout=log.open("wb"), stderr=subprocess.STDOUT)
        scheme = "https" if cert else "http"
        gateway = cls(f"{scheme}://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", proc, log)
        try:
            wait_http(gateway.http + "/readyz", timeout_s, proc,
                      ca_file=Path(cert) if cert else None)
        except Exception:
            stop_process(proc)
            raise
        return gateway

    def stop(self) -> int:
        return stop_process(self.process)


@contextmanager
def running_stack(built: Iterable[BuiltModel], home: Path, workdir: Path, threads: int = 0,
                  timeout_s: float = 120.0, **settings: str
                  ) -> Iterator[tuple[LocalTriton, GatewayProcess]]:
    """Triton serving the ``built`` models and one gateway in front of it, stopped
    on exit; ``settings`` as for ``GatewayProcess.start``."""
    triton = start_triton(built, home, workdir, threads=threads, timeout_s=timeout_s)
    try:
        gateway = GatewayProcess.start(triton.endpoint, workdir / "gateway.log",
                                       timeout_s=timeout_s, **settings)
        try:
            yield triton, gateway
        finally:
            gateway.stop()
    finally:
        triton.stop()

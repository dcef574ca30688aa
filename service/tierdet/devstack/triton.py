"""Run the pip-installed tritonserver (from ``nvidia-pytriton``) as a child process.

The wheel carries a real ``tritonserver`` and the python backend, but it
needs help to run outside NVIDIA's container (see DESIGN.md):
- a backend folder holding ``python/`` with the backend library, its utils
  module and the stub for *this* Python version (the wheel keeps the stubs
  elsewhere);
- ``LD_LIBRARY_PATH`` with the wheel's bundled libs and this Python's
  ``lib/`` (without them the stub dies and the server hangs on zombies);
- ``PATH`` starting with this interpreter's folder, which is how the stub
  finds numpy and onnxruntime for model.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tierdet.serving.backend import QueueReport
from tierdet.serving.triton import (
    API_KEY_HEADER,
    GRPC_KEY_HEADER,
    queue_report,
    restricted_api_args,
)

# The local stack's key for Triton's restricted APIs, kept in this process's
# environment: every server and every gateway process started from one test
# run, benchmark or shell share it (a gateway reads it as a setting).
API_KEY_ENV = "TIERDET_TRITON_API_KEY"


class TritonError(RuntimeError):
    pass


def local_api_key() -> str:
    """``$TIERDET_TRITON_API_KEY``; unset, a new random key, set there for the
    gateways this process starts."""
    if not os.environ.get(API_KEY_ENV):
        os.environ[API_KEY_ENV] = secrets.token_urlsafe(24)
    return os.environ[API_KEY_ENV]


def _pytriton_root() -> Path:
    import pytriton

    return Path(pytriton.__file__).parent / "tritonserver"


def _bundled_libs() -> Path:
    import pytriton

    return Path(pytriton.__file__).parents[1] / "nvidia_pytriton.libs"


def prepare_backends(workdir: Path) -> Path:
    """Assemble the backend folder the binary needs; returns its path."""
    root = _pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonError(f"nvidia-pytriton has no python backend stub for Python {version}")
    python_dir = workdir / "backends" / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in (root / "backends/python/libtriton_python.so",
                root / "backends/python/triton_python_backend_utils.py", stub):
        dest = python_dir / src.name
        if not dest.exists() or dest.stat().st_size != src.stat().st_size:
            shutil.copy2(src, dest)
    return workdir / "backends"


def triton_env() -> dict[str, str]:
    env = dict(os.environ)
    libs = [str(_bundled_libs()), sysconfig.get_config_var("LIBDIR") or ""]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@dataclass
class LocalTriton:
    """A tritonserver child bound to ``host`` serving ``repository``."""

    repository: Path
    workdir: Path
    host: str = "127.0.0.1"
    http_port: int = 8010
    grpc_port: int = 8001
    metrics_port: int = 8002
    models: list[str] = field(default_factory=list)
    log_path: Path | None = None
    extra_args: list[str] = field(default_factory=list)  # e.g. --trace-config ...
    # Model control, shared memory, statistics...: only with this key (see
    # serving.triton); None opens them to anyone who reaches the ports.
    api_key: str | None = field(default_factory=local_api_key, repr=False)
    process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        binary = _pytriton_root() / "bin" / "tritonserver"
        cmd = [
            str(binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={prepare_backends(self.workdir)}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
            "--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0",
            # A model that fails to load is reported, the others still serve.
            "--model-control-mode=explicit", "--exit-on-error=false",
            "--strict-readiness=false", "--exit-timeout-secs=10",
            "--log-verbose=0",
        ]
        cmd += [f"--load-model={m}" for m in self.models]
        if self.api_key:
            cmd += restricted_api_args(self.api_key)
        return cmd + self.extra_args

    def start(self) -> None:
        if self.process and self.process.poll() is None:
            return
        if self.process is not None:
            self._reap_group()  # stubs of a crashed server would hold memory and shm
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            self.command(), env=triton_env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, not Triton
        )

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def endpoint(self) -> str:
        """This server as a gateway's ``TIERDET_TRITON_URL`` entry (metrics port too)."""
        return f"{self.grpc_url}?metrics={self.metrics_port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=1.0) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def model_ready(self, model: str) -> bool:
        return self._get(f"/v2/models/{model}/ready") == 200

    def queue(self) -> QueueReport:
        """What this server reports of its queue on its metrics page (what gateways
        read): requests waiting and requests taken in, per model."""
        with urllib.request.urlopen(self.metrics_url, timeout=2.0) as resp:
            return queue_report(resp.read().decode())

    def model_states(self) -> dict[str, str]:
        """Model -> Triton state (READY, UNAVAILABLE, LOADING, ...); {} if unreachable."""
        request = urllib.request.Request(self.http_url + "/v2/repository/index", data=b"{}",
                                         method="POST", headers=self.key_header())
        try:
            with urllib.request.urlopen(request, timeout=2.0) as resp:
                index = json.loads(resp.read())
        except (OSError, ValueError):
            return {}
        return {m["name"]: m.get("state", "") for m in index}

    def key_header(self) -> dict[str, str]:
        """The HTTP header Triton's restricted APIs want (none when they are open)."""
        return {API_KEY_HEADER: self.api_key} if self.api_key else {}

    def grpc_key_header(self) -> dict[str, str]:
        """The same over gRPC (tritonclient's ``headers=``)."""
        return {GRPC_KEY_HEADER: self.api_key} if self.api_key else {}

    def wait_ready(self, timeout_s: float = 120.0) -> dict[str, bool]:
        """Wait until the server is live and every model has loaded or failed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or not self.alive():
                code = self.process.returncode if self.process is not None else None
                raise TritonError(f"tritonserver exited with code {code}"
                                  + (f"; see {self.log_path}" if self.log_path else ""))
            if self._get("/v2/health/live") == 200:
                states = self.model_states()
                if all(states.get(m) in ("READY", "UNAVAILABLE") for m in self.models):
                    return {m: states[m] == "READY" for m in self.models}
            time.sleep(0.2)
        ready = {m: self.model_ready(m) for m in self.models}
        if not any(ready.values()) and self.models:
            raise TritonError(f"no model became ready within {timeout_s:.0f} s"
                              + (f"; see {self.log_path}" if self.log_path else ""))
        return ready

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process is None:
            return
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reap_group()

    def _reap_group(self) -> None:
        """Kill what is left of the server's process group (python stubs)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

"""One gateway worker process (started by ``workers.Supervisor``): the gateway
on the shared ports, with the shared state in its job's ``run_dir``.

Kept apart from ``workers`` so that the supervisor never imports the server
and the server imports only the supervisor: imports point one way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

from tierdet.frontends.server import serve
from tierdet.frontends.workers import JOB_ENV, Job


def _die_with_parent() -> None:
    """SIGTERM this worker when its supervisor dies, even by SIGKILL: an orphan
    would keep serving the ports, and the next start would find them taken."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the supervisor was gone before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    job = Job.model_validate_json(os.environ.pop(JOB_ENV))
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s "
                        f"[worker {job.index} of {job.count}]: %(message)s")
    asyncio.run(serve(job.settings, grace_s=float(os.environ.get("TIERDET_GRACE_S", "10")),
                      job=job))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``tierdet up``: build what is missing, run Triton as a supervised child, serve.

Triton is restarted if it dies (with backoff); the gateway notices by its
own readiness polling, so no request path knows about the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tierdet.build.models import ensure_built, ensure_cards
from tierdet.build.weights import WeightsSource
from tierdet.devstack.stack import start_triton
from tierdet.devstack.triton import LocalTriton
from tierdet.frontends.server import run_gateway
from tierdet.registry.profile import LatencyProfile
from tierdet.serving.settings import Settings

log = logging.getLogger("tierdet.devstack.up")


async def supervise(triton: LocalTriton, stop: asyncio.Event, max_backoff_s: float = 30.0) -> None:
    backoff = 1.0
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
        if stop.is_set() or triton.alive():
            backoff = 1.0 if triton.alive() else backoff
            continue
        log.error("tritonserver exited (code %s); restarting in %.0f s",
                  triton.process.returncode if triton.process else None, backoff)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), backoff)
        if stop.is_set():
            break
        triton.start()
        backoff = min(backoff * 2, max_backoff_s)


def _build(models: list[str], source: WeightsSource, home: Path, cards: Sequence[Path]) -> None:
    ensure_built(models, source, home)
    ensure_cards(cards, home)


def build_apart(models: list[str], source: WeightsSource, home: Path,
                cards: Sequence[Path]) -> None:
    """Build what is missing in a process of its own (a fresh interpreter), so the
    serving process never imports torch or ONNX: they would stay resident for the
    gateway's life (about 1 GB). A build error is raised here as it was there."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as child:
        child.submit(_build, models, source, home, cards).result()


async def run_stack(settings: Settings, models: list[str], source: WeightsSource, home: Path,
                    triton_ports: tuple[int, int, int], threads: int,
                    cards: Sequence[Path] = ()) -> None:
    await asyncio.to_thread(build_apart, models, source, home, cards)
    built = ensure_built(models, source, home) + ensure_cards(cards, home)  # all built now
    profile_path = settings.profile_file or home / "profile.json"
    profile = LatencyProfile.load(profile_path)
    if profile.models:
        log.info("latency profile: %s (%s)", profile_path, ", ".join(profile.models))
    else:
        log.info("no latency profile at %s: the router measures models at start "
                 "(run `tierdet profile` for per-batch figures)", profile_path)
    log.info("starting tritonserver (log: %s)", home / "triton" / "triton.log")
    triton = await asyncio.to_thread(start_triton, built, home, home / "triton", threads,
                                     ports=triton_ports, profile=profile, partial=True)
    stop = asyncio.Event()
    try:
        settings = settings.model_copy(update={
            "triton_url": triton.endpoint, "models": tuple(b.spec.name for b in built),
            "cards": tuple(cards),
            "profile_file": profile_path if profile.models else None})
        supervisor = asyncio.create_task(supervise(triton, stop))
        await run_gateway(settings, stop)
        stop.set()
        await supervisor
    finally:
        stop.set()
        await asyncio.to_thread(triton.stop)
        log.info("tritonserver stopped")

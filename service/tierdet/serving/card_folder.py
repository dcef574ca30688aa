"""A folder of cards served while they are in it (``TIERDET_CARDS_WATCH``): each
card file that appears is added, one that changes is replaced, one that goes is
retired, exactly as through the admin API (``changes``: the same checks, build,
load, measurement and drain; its cards name their graphs by path in the cards
folder, ``TIERDET_CARDS_DIR``). The folder is read every
``TIERDET_CARDS_WATCH_S`` seconds, and once at start: what it holds then is
added then. A volume mounted there (compose, Helm) is picked up the same way.

A card that fails is logged with its reason and shown in ``GET /admin/models``
(under its card's name, or its file's when it does not parse). It is tried
again when its file changes, or, when what failed may pass by itself (a graph
not there yet, copied after its card; a change or another file in the way;
Triton unreachable), after 1 s, 2 s, 4 s ... at most 5 min. A failed
replacement leaves the model serving as it was; a failed retirement is tried
again. A folder that is not there changes nothing (an unmount is no removal).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.serving.changes import ModelChanges

log = logging.getLogger("tierdet.cards")

SUFFIXES = (".yaml", ".yml", ".json")
# Failures that may pass without the card changing (a graph being copied, another
# change or file in the way, Triton away): tried again after 1 s, 2 s, ... 5 min.
PASSING = frozenset({ErrorCode.GRAPH_NOT_FOUND, ErrorCode.DIGEST_MISMATCH,
                     ErrorCode.CHANGE_IN_PROGRESS, ErrorCode.TRITON_UNAVAILABLE,
                     ErrorCode.MODEL_CONFLICT})
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 300.0


@dataclass(frozen=True)
class _Tried:
    digest: str  # the card file's sha256 when it was tried
    name: str = ""  # the card's name (its file's, when it did not parse)
    reason: str = ""  # why it failed ("" when it serves)
    again_at: float | None = None  # when to try it again unchanged (None: once changed)
    wait_s: float = 0.0  # the wait before that, doubled at each failure


class CardFolder:
    def __init__(self, folder: Path, changes: ModelChanges) -> None:
        self.folder = folder
        self.changes = changes
        self._tried: dict[Path, _Tried] = {}
        self._serving: dict[Path, str] = {}  # file -> the card it serves
        self._retiring: dict[Path, str] = {}  # file gone -> why its card serves on

    async def watch(self, every_s: float, stop: asyncio.Event) -> None:
        """Read the folder now and every ``every_s`` until ``stop``."""
        while not stop.is_set():
            try:
                await self.scan()
            except Exception:
                log.exception("reading the cards folder %s failed", self.folder)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)

    async def scan(self) -> None:
        """One reading: retire the cards whose files went, then add or replace. A
        folder that is not there (unmounted, being swapped) changes nothing."""
        files = await asyncio.to_thread(_card_files, self.folder)
        if files is None:
            return
        for path in [p for p in self._tried if p not in files]:
            if path in self._serving and not await self._retire(path):
                continue  # still serving: tried again at the next reading
            tried = self._tried.pop(path)
            if tried.reason:  # its failure goes with it
                self.changes.clear_failure(tried.name)
        now = time.monotonic()
        for path, body in sorted(files.items()):
            if body is None:
                continue  # unreadable now: as it was
            digest = hashlib.sha256(body).hexdigest()
            last = self._tried.get(path)
            if last is None or last.digest != digest or (
                    last.again_at is not None and now >= last.again_at):
                await self._put(path, body, digest)

    async def _put(self, path: Path, body: bytes, digest: str) -> None:
        name = _card_name(body)
        if not name:
            return self._failed(path, digest, path.name, ApiError(
                ErrorCode.INVALID_CARD, f"{path.name}: not a card (no name)"))
        other = next((p for p, n in self._serving.items() if n == name and p != path), None)
        if other is not None:
            return self._failed(path, digest, name, ApiError(
                ErrorCode.MODEL_CONFLICT, f"{path.name}: card {name!r} already comes from "
                f"{other.name}"))
        if path in self._serving and self._serving[path] != name \
                and not await self._retire(path):  # the file now holds another card
            return None
        try:
            models = await self.changes.put(name, body)
        except ApiError as exc:
            return self._failed(path, digest, name, exc)
        except Exception:  # the gateway's fault, not the card's: once, with its trace
            log.exception("cards folder: %s: the change of %s failed", path.name, name)
            self._tried[path] = _Tried(digest, name, "internal error")
            return None
        self._serving[path] = name
        self._tried[path] = _Tried(digest, name)
        log.info("cards folder: %s serves %s", path.name, ", ".join(m.name for m in models))

    async def _retire(self, path: Path) -> bool:
        """Retire the card ``path`` served; False if that failed (it serves on)."""
        name = self._serving[path]
        try:
            await self.changes.delete(name)
        except ApiError as exc:
            if exc.code != ErrorCode.UNKNOWN_MODEL:  # else retired already (admin API)
                if self._retiring.get(path) != exc.message:  # once, not every reading
                    log.warning("cards folder: %s went, retiring %s failed (trying again): "
                                "%s", path.name, name, exc.message)
                self._retiring[path] = exc.message
                return False
        self._retiring.pop(path, None)
        del self._serving[path]
        log.info("cards folder: %s went, %s retired", path.name, name)
        return True

    def _failed(self, path: Path, digest: str, name: str, exc: ApiError) -> None:
        before = self._tried.get(path)
        again_at, wait_s = None, 0.0
        if exc.code in PASSING:  # tried again unchanged, less and less often
            last = before.wait_s if before is not None and before.digest == digest else 0.0
            wait_s = min(MAX_RETRY_S, max(FIRST_RETRY_S, 2 * last))
            again_at = time.monotonic() + wait_s
        if before is None or before.reason != exc.message:  # once, not every reading
            log.error("cards folder: %s: %s (%s)%s", path.name, exc.message, exc.code.value,
                      "; trying again" if again_at else "; waiting for the file to change")
        self._tried[path] = _Tried(digest, name, exc.message, again_at, wait_s)
        self.changes.failed(name, f"{path.name}: {exc.message}")


def _card_files(folder: Path) -> dict[Path, bytes | None] | None:
    """The card files directly in ``folder`` (hidden ones skipped: editors' and
    Kubernetes' staging files) and their bytes (None: unreadable now); None when
    the folder is not there."""
    if not folder.is_dir():
        return None
    out: dict[Path, bytes | None] = {}
    for path in folder.iterdir():
        if path.suffix in SUFFIXES and not path.name.startswith(".") and path.is_file():
            try:
                out[path] = path.read_bytes()
            except OSError as exc:
                log.warning("cards folder: %s: %s", path.name, exc)
                out[path] = None
    return out


def _card_name(body: bytes) -> str:
    """The card's ``name``, or "" (the admin API's checks say what else is wrong)."""
    try:
        raw = yaml.safe_load(body.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        return ""
    name = raw.get("name") if isinstance(raw, dict) else None
    return name if isinstance(name, str) else ""

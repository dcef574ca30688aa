"""A folder of cards served while they are in it (``TIERDET_CARDS_WATCH``): each
card file that appears is added, one that changes is replaced, one that goes is
retired, exactly as through the admin API (``changes``: the same checks, build,
load, measurement and drain; its cards name their graphs by path in the cards
folder, ``TIERDET_CARDS_DIR``). The folder is read every
``TIERDET_CARDS_WATCH_S`` seconds, and once at start: what it holds then is
added then. A volume mounted there (compose, Helm) is picked up the same way.

A card that fails is logged with its reason and shown in ``GET /admin/models``
(under its card's name, or its file's when it does not parse). It is tried
again when its file changes, or at the next reading when what failed may pass
by itself: a graph not there yet (copied after its card), a change under way,
Triton unreachable. A failed replacement leaves the model serving as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.serving.changes import ModelChanges

log = logging.getLogger("tierdet.cards")

SUFFIXES = (".yaml", ".yml", ".json")
# Failures that may pass without the card changing.
PASSING = frozenset({ErrorCode.GRAPH_NOT_FOUND, ErrorCode.DIGEST_MISMATCH,
                     ErrorCode.CHANGE_IN_PROGRESS, ErrorCode.TRITON_UNAVAILABLE})


@dataclass(frozen=True)
class _Tried:
    digest: str  # the card file's sha256 when it was tried
    again: bool  # try it again at the next reading, unchanged
    name: str = ""  # the card's name (its file's, when it did not parse)
    reason: str = ""  # why it failed ("" when it serves)


class CardFolder:
    def __init__(self, folder: Path, changes: ModelChanges) -> None:
        self.folder = folder
        self.changes = changes
        self._tried: dict[Path, _Tried] = {}
        self._serving: dict[Path, str] = {}  # file -> the card it serves

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
        """One reading: retire the cards whose files went, then add or replace."""
        files = await asyncio.to_thread(_card_files, self.folder)
        for path in [p for p in self._tried if p not in files]:
            tried = self._tried.pop(path)
            if path in self._serving:
                await self._retire(path)
            elif tried.reason:  # it never served: its failure goes with it
                self.changes.clear_failure(tried.name)
        for path, body in sorted(files.items()):
            digest = hashlib.sha256(body).hexdigest()
            last = self._tried.get(path)
            if last is None or last.digest != digest or last.again:
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
        if path in self._serving and self._serving[path] != name:
            await self._retire(path)  # the file now holds another card
        try:
            models = await self.changes.put(name, body)
        except ApiError as exc:
            return self._failed(path, digest, name, exc)
        except Exception:  # the gateway's fault, not the card's: once, with its trace
            log.exception("cards folder: %s: the change of %s failed", path.name, name)
            self._tried[path] = _Tried(digest, False, name, "internal error")
            return None
        self._serving[path] = name
        self._tried[path] = _Tried(digest, again=False, name=name)
        log.info("cards folder: %s serves %s", path.name, ", ".join(m.name for m in models))

    async def _retire(self, path: Path) -> None:
        name = self._serving.pop(path)
        try:
            await self.changes.delete(name)
        except ApiError as exc:
            log.error("cards folder: %s went, retiring %s failed: %s", path.name, name,
                      exc.message)
            return
        log.info("cards folder: %s went, %s retired", path.name, name)

    def _failed(self, path: Path, digest: str, name: str, exc: ApiError) -> None:
        again = exc.code in PASSING
        before = self._tried.get(path)
        if before is None or before.reason != exc.message:  # once, not every reading
            log.error("cards folder: %s: %s (%s)%s", path.name, exc.message, exc.code.value,
                      "; trying again" if again else "; waiting for the file to change")
        self._tried[path] = _Tried(digest, again, name, exc.message)
        self.changes.failed(name, f"{path.name}: {exc.message}")


def _card_files(folder: Path) -> dict[Path, bytes]:
    """The card files directly in ``folder`` (hidden ones skipped: editors' and
    Kubernetes' staging files) and their bytes."""
    if not folder.is_dir():
        return {}
    return {p: p.read_bytes() for p in folder.iterdir()
            if p.suffix in SUFFIXES and not p.name.startswith(".") and p.is_file()}


def _card_name(body: bytes) -> str:
    """The card's ``name``, or "" (the admin API's checks say what else is wrong)."""
    try:
        raw = yaml.safe_load(body.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        return ""
    name = raw.get("name") if isinstance(raw, dict) else None
    return name if isinstance(name, str) else ""

"""Models that change while serving: add, replace and retire, behind the admin API.

A change is a card (``tierdet.registry.cards``) sent by the admin. Its graph
is read only from the cards folder (``TIERDET_CARDS_DIR``: a relative path
that stays inside it, links resolved) and must have the sha256 the card
states. Then, each step only once the one before succeeded:

    building   ``tierdet build --card --new-version`` in a child process at a
               lower priority (onnx and ONNX Runtime, no torch: about a second
               a size; the event loop keeps serving): the model goes into a
               new version folder of Triton's repository
    loading    Triton loads it on every endpoint (explicit model control, with
               the restricted-API key); a replaced model keeps answering on its
               old version until the new one is ready, and Triton unloads the
               old once the requests it holds are done
    serving    the catalog measures its latency, then ranks it: only now does
               the router send it traffic (a replacement is measured again)

Retiring stops routing to a model at once, waits until the requests already
routed to it are answered (``Catalog.using``/``drained``), then unloads it.
A malformed card, a path out of the folder, a missing graph, a wrong digest, a
failed build or load is an ``ApiError`` with its own code, and the serving set
(and Triton's repository) stays as it was. A replacement may not change what the
gateway prepares for the model (``card_intake.check_replaceable``).

A replacement may be staged as a canary (``put_canary``; its rule and state are
``canary``'s): added under a side name, judged on live figures, then promoted
(replaced, the side retired) or rolled back (the side retired).

Changes last while the gateway runs (a card meant to stay: ``TIERDET_CARDS``); each
gateway process keeps its own catalog, so changes need one worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import yaml

from tierdet.contract.errors import ApiError, ErrorCode
from tierdet.contract.results import ModelChange, State
from tierdet.registry.cards import ModelCard as Card
from tierdet.registry.cards import expand, spec_of
from tierdet.registry.specs import CARD_SPECS, lookup
from tierdet.serving import repository_files
from tierdet.serving.canary import Canaries, Verdict, side_name
from tierdet.serving.card_intake import (
    check_replaceable,
    checked_graphs,
    parse_card,
    write_card,
)
from tierdet.serving.catalog import Catalog
from tierdet.serving.pool import EndpointPool
from tierdet.serving.settings import Settings

log = logging.getLogger("tierdet.changes")

BUILD_TIMEOUT_S = 900.0  # a card's export: seconds here, minutes for a big graph
# A build shares the gateway's cores with serving: it runs at a lower priority,
# so the cores go to admitted requests first (a build takes a core for seconds).
BUILD_NICENESS = 10


class ModelChanges:
    def __init__(self, settings: Settings, pool: EndpointPool, catalog: Catalog,
                 canaries: Canaries) -> None:
        self.settings = settings
        self.pool = pool
        self.catalog = catalog
        self.canaries = canaries
        canaries.act = self._carry_out_logged  # the rule's decisions
        self._cards: dict[str, tuple[str, ...]] = {}  # card -> its models (admin-added)
        self._records: dict[str, ModelChange] = {}  # model -> its last change
        self._busy: set[str] = set()  # cards and models being changed now

    # -- what is served -----------------------------------------------------

    def models(self) -> tuple[ModelChange, ...]:
        """Every model the gateway serves or a change touched, with its state."""
        out = {name: self._from_catalog(name) for name in self.catalog.states}
        for name, rec in self._records.items():
            if name not in out or rec.state != "serving":
                out[name] = rec
            elif rec.reason:  # serving, after a replacement that failed
                out[name] = replace(out[name], reason=rec.reason)
        return tuple(replace(out[name], canary=self.canaries.info(name)) for name in sorted(out))

    def _from_catalog(self, name: str) -> ModelChange:
        state, card = self.catalog.states[name], self._card_of(name)
        if state.ready:
            return ModelChange(name, "serving", card=card)
        if state.status in ("LOADING", "READY"):  # READY: being measured
            return ModelChange(name, "loading", card=card)
        return ModelChange(name, "failed", state.reason or state.status, card)

    # -- add or replace -----------------------------------------------------

    async def put(self, name: str, body: bytes) -> tuple[ModelChange, ...]:
        """Add the card ``body`` (YAML or JSON) under ``name``, or replace the
        models it names; answers once they serve."""
        cards_dir, home = self._where()
        raw, card = parse_card(name, body)
        graphs = await asyncio.to_thread(checked_graphs, card, cards_dir)
        models = expand(card)
        names = tuple(m.name for m in models)
        replaced = [n for n in names if self.catalog.serves(n)]
        for model in models:
            self._check_replaceable(model)
        dropped = sorted(n for n in set(self._cards.get(name, ())) - set(names)
                         if self.catalog.serves(n))
        if dropped:  # they would serve on with no card; retired, they go with it
            raise ApiError(ErrorCode.MODEL_CONFLICT, f"{name}: the card no longer has "
                           f"{', '.join(dropped)}: retire the card first, or keep them")
        self._check_no_canary(*names)
        with self._holding(name, *names):
            was = await asyncio.to_thread(repository_files.before, self._repository(), names)
            specs, models_before = {n: CARD_SPECS.get(n) for n in names}, self._cards.get(name)
            for n in names:
                self._record(n, "building", card=name)
            try:
                card_file = write_card(home, raw, graphs)
                await self._build(card_file, home)
                for model in models:  # the gateway's view of them, from now on
                    CARD_SPECS[model.name] = spec_of(model)
                self._cards[name] = names
                for n in names:
                    self._record(n, "loading", card=name)
                await self._load(names, replaced)
            except BaseException as exc:  # whatever stopped it, the serving set goes back
                why = exc.message if isinstance(exc, ApiError) else \
                    f"{type(exc).__name__} (see the gateway's log)"
                await self._undo_add([n for n in names if n not in replaced])
                await asyncio.to_thread(repository_files.put_back, was)
                await self._reload(replaced)  # a new version loaded meanwhile: the old again
                CARD_SPECS.update({n: spec for n, spec in specs.items() if spec is not None})
                self._cards.pop(name, None)
                self._cards.update({name: models_before} if models_before else {})
                for n in names:  # a model replaced in vain serves its old version still
                    self._record(n, "serving" if n in replaced else "failed",
                                 f"the replacement failed: {why}" if n in replaced else why,
                                 card=name)
                raise
            for n in names:
                self._record(n, "serving", card=name)
            if name not in names:  # what a card of several sizes failed as before
                self.clear_failure(name)
        log.info("card %s: %s %s", name, "replaced" if replaced else "added", ", ".join(names))
        return tuple(self._from_catalog(n) for n in names)

    def _where(self) -> tuple[Path, Path]:
        if self.settings.cards_dir is None or self.settings.home is None:
            raise ApiError(ErrorCode.CHANGES_DISABLED, "models cannot change on this gateway: "
                           "it needs TIERDET_CARDS_DIR and TIERDET_HOME")
        if self.settings.workers > 1:
            raise ApiError(ErrorCode.CHANGES_DISABLED, "models cannot change on a gateway of "
                           "several workers (each keeps its own catalog): TIERDET_WORKERS=1")
        return self.settings.cards_dir, self.settings.home

    async def _build(self, card_file: Path, home: Path) -> None:
        """``tierdet build`` in a child process: its own interpreter, its own GIL."""
        command = [sys.executable, "-m", "tierdet.cli", "--home", str(home), "build",
                   "--card", str(card_file), "--target", self.settings.model_target,
                   "--new-version"]
        child = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        # Set from here rather than in the child (preexec_fn is unsafe beside threads);
        # the threads it starts later inherit it.
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, child.pid, BUILD_NICENESS)
            log.info("building %s: pid %d at niceness %d", card_file.name, child.pid,
                     os.getpriority(os.PRIO_PROCESS, child.pid))
        try:
            output, _ = await asyncio.wait_for(child.communicate(), BUILD_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            child.kill()
            await child.wait()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise ApiError(ErrorCode.BUILD_FAILED, f"the build took over {BUILD_TIMEOUT_S:.0f} "
                           "s") from None
        if child.returncode == 0:
            return
        text = output.decode(errors="replace").strip()
        log.error("build of %s failed (exit %s):\n%s", card_file, child.returncode, text)
        last = text.splitlines()[-1] if text else f"exit code {child.returncode}"
        # `tierdet build` exits 2 on a problem of the card (CardError): the admin's to fix.
        code = ErrorCode.INVALID_CARD if child.returncode == 2 else ErrorCode.BUILD_FAILED
        raise ApiError(code, last.removeprefix("error: "))

    async def _load(self, names: tuple[str, ...], replaced: list[str]) -> None:
        """Load (a replacement: reload) ``names`` on every endpoint, then have the
        catalog measure and rank them."""
        endpoints = [e for e in self.pool.endpoints.values() if e.up]
        if not endpoints:
            raise ApiError(ErrorCode.TRITON_UNAVAILABLE, "no Triton endpoint is up",
                           retry_after_s=1.0)
        for name in names:
            for endpoint in endpoints:
                await endpoint.backend.load_model(name)
            spec = lookup(name)
            assert spec is not None  # registered after the build
            self.catalog.add(name, spec.labels.name)
        await self.catalog.refresh()  # new ones: probed, then ranked
        for name in names:
            state = self.catalog.states.get(name)
            if state is None or not state.ready:
                reason = state.reason or state.status if state else "not in Triton's index"
                raise ApiError(ErrorCode.LOAD_FAILED, f"{name}: not ready after loading: "
                               f"{reason}")
            if name in replaced:
                state.spec = lookup(name) or state.spec
                await self.catalog.renew(name)

    async def _reload(self, names: list[str]) -> None:
        """Load ``names`` again wherever they are: Triton takes what the folder holds."""
        for endpoint in [e for e in self.pool.endpoints.values() if e.up]:
            for name in names:
                with contextlib.suppress(ApiError):  # that endpoint serves what it had
                    await endpoint.backend.load_model(name)

    async def _undo_add(self, names: list[str]) -> None:
        """Models a failed change would have added: unknown again, unloaded."""
        for name in names:
            self.catalog.added.discard(name)
            self.catalog.forget(name)
            CARD_SPECS.pop(name, None)
            await self._unload(name)

    async def _unload(self, name: str) -> None:
        """Unload ``name`` wherever Triton knows it."""
        await self.pool.refresh()
        for endpoint in list(self.pool.endpoints.values()):
            if endpoint.up and name in endpoint.index:
                try:
                    await endpoint.backend.unload_model(name)
                except ApiError as exc:  # that endpoint keeps it loaded, never routed to
                    log.error("%s", exc.message)

    # -- retire ---------------------------------------------------------------

    async def delete(self, name: str) -> tuple[ModelChange, ...]:
        """Retire the models of card ``name`` (or the one model ``name``): no new
        request goes to them, those routed finish, then Triton unloads them."""
        names = self._cards.get(name) or ((name,) if self.catalog.serves(name) else ())
        if not names:
            raise ApiError(ErrorCode.UNKNOWN_MODEL, f"{name!r} is neither a served model nor "
                           "a card the admin added")
        self._check_no_canary(*names)
        with self._holding(name, *names):
            for n in names:
                self._record(n, "draining", card=self._card_of(n))
                self.catalog.retire(n)
            drain_s = max(30.0, 3 * self.settings.request_timeout_s)
            for n in names:
                if not await self.catalog.drained(n, drain_s):
                    log.warning("model %s: requests still in flight after %.0f s; unloading",
                                n, drain_s)
                await self._unload(n)
                self.catalog.forget(n)
                if self._card_of(n):  # built here: gone, or a restarted Triton loads it
                    await asyncio.to_thread(repository_files.remove, self._repository() / n)
                self._record(n, "retired", card=self._card_of(n))
            self._cards.pop(name, None)
        log.info("retired %s", ", ".join(names))
        return tuple(self._records[n] for n in names)

    async def restore(self) -> None:
        """Load the models added here where an endpoint has them in its repository but
        not loaded (a Triton restarted, or joined the pool, since: it loads its own)."""
        names = [n for models in self._cards.values() for n in models]
        for endpoint in [e for e in self.pool.endpoints.values() if e.up]:
            for name in names:
                if endpoint.index.get(name, ("READY", ""))[0] not in ("UNAVAILABLE", "") \
                        or name in self._busy or not self.catalog.serves(name):
                    continue  # loaded, loading, not in that repository; or being changed
                log.info("model %s is not loaded at %s: loading it", name, endpoint.url)
                try:
                    await endpoint.backend.load_model(name)
                except ApiError as exc:
                    log.error("model %s at %s: %s", name, endpoint.url, exc.message)

    # -- canaries --------------------------------------------------------------

    async def put_canary(self, name: str, body: bytes, share: float
                         ) -> tuple[ModelChange, ...]:
        """Add the card ``body`` (a replacement of the served model ``name``) under
        its side name, then divert ``share`` of ``name``'s requests to it; answers
        once the side serves."""
        self._where()
        raw, card = parse_card(name, body)
        models = expand(card)
        if [m.name for m in models] != [name]:
            raise ApiError(ErrorCode.INVALID_CARD, "a canary replaces one model: its card "
                           "serves one input size, under the model's name")
        if not self.catalog.serves(name):
            raise ApiError(ErrorCode.UNKNOWN_MODEL, f"{name!r} is not a served model: a "
                           "canary replaces one (add a new model without canary)")
        self._check_replaceable(models[0])
        self._check_no_canary(name)
        side = side_name(name)
        # Never ranked: the router does not choose it, shadow scoring does not take it
        # for a reference; it answers only the requests diverted to it.
        self.catalog.unranked.add(side)
        try:
            await self.put(side, yaml.safe_dump({**raw, "name": side}).encode())
        except BaseException:
            self.catalog.unranked.discard(side)
            raise
        self.canaries.start(name, share, body)
        return tuple(m for m in self.models() if m.name in (name, side))

    async def decide(self, name: str, verdict: Verdict) -> tuple[ModelChange, ...]:
        """The admin's decision on ``name``'s running canary, carried out."""
        canary = self.canaries.running(name)
        if canary is None or canary.name != name:
            raise ApiError(ErrorCode.NO_CANARY, f"no canary of {name!r} is running")
        self.canaries.decide(name, verdict, "operator", "the admin's command")
        await self._carry_out(name, verdict)
        return tuple(m for m in self.models() if m.name in (name, canary.side))

    async def _carry_out(self, name: str, verdict: Verdict) -> None:
        """Promote (``name`` replaced by the canary's card) or roll back; either
        way the side is retired (drained first)."""
        canary = self.canaries.latest[name]
        try:
            if verdict == "promote":
                await self.put(name, canary.card)
            await self.delete(canary.side)
        except BaseException as exc:
            self.canaries.finished(name, exc.message if isinstance(exc, ApiError)
                                   else type(exc).__name__)
            if verdict == "promote" and self.catalog.serves(canary.side):
                await self.delete(canary.side)  # the old version serves on, alone
            raise
        finally:
            self.catalog.unranked.discard(canary.side)
        self.canaries.finished(name)

    async def _carry_out_logged(self, name: str, verdict: Verdict) -> None:
        """``_carry_out`` for the rule's decisions (nobody waits: a failure is
        logged, and shown in the canary's state)."""
        try:
            await self._carry_out(name, verdict)
        except Exception:
            log.exception("canary of %s: the %s failed", name, verdict)

    def _check_no_canary(self, *names: str) -> None:
        running = [n for n in names if self.canaries.running(n) is not None]
        if running:
            raise ApiError(ErrorCode.CHANGE_IN_PROGRESS, f"{', '.join(running)}: a canary is "
                           "running; promote it or roll it back first")

    # -- bookkeeping ------------------------------------------------------------

    @contextlib.contextmanager
    def _holding(self, *names: str) -> Iterator[None]:
        """Marks ``names`` as being changed for a ``with`` block."""
        busy = self._busy.intersection(names)
        if busy:
            raise ApiError(ErrorCode.CHANGE_IN_PROGRESS,
                           f"{', '.join(sorted(busy))}: another change is under way")
        self._busy.update(names)
        try:
            yield
        finally:
            self._busy.difference_update(names)

    def _record(self, name: str, state: State, reason: str = "", card: str = "") -> None:
        self._records[name] = ModelChange(name, state, reason, card)

    def failed(self, name: str, reason: str) -> None:
        """A card that failed before any change began (the cards folder's), shown
        under its name until a change of it succeeds; a served model keeps its own."""
        if not self.catalog.serves(name) and self._records.get(
                name, ModelChange(name, "failed")).state in ("failed", "retired"):
            self._record(name, "failed", reason)

    def clear_failure(self, name: str) -> None:
        """Forget a card's failure (its file went, or it serves now)."""
        if name in self._records and self._records[name].state == "failed":
            del self._records[name]

    def _repository(self) -> Path:
        """The folder Triton serves, where the builds go."""
        return self._where()[1] / "repository" / self.settings.model_target

    def _check_replaceable(self, card: Card) -> None:
        check_replaceable(card, lookup(card.name) if self.catalog.serves(card.name) else None)

    def _card_of(self, name: str) -> str:
        return next((c for c, models in self._cards.items() if name in models), "")

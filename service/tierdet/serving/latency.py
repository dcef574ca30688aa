"""The latency model: how long a request of each model takes on each endpoint.

A prediction is the work already on the endpoint's device plus the model's
service time. The backlog is the larger of this gateway's own work in flight
there and what Triton last reported queued (every gateway's work,
``observe_queues``) plus the work sent there since: this gateway's, and the
other gateways' at the rate Triton's counts show. Service times come from the
measured profile, corrected online per endpoint (devices behind one model
differ: ``corrections``) from Triton's own account of what the
device did between two queue reports (a ``DeviceWindow``): the time it spent
running the model says how fast the device runs now, so a device that slows
down is followed within a report or two, and waiting behind other clients'
work is not mistaken for a slow device. Where Triton reports no device time,
each answer less Triton's mean queue wait is read instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tierdet.registry.profile import LatencyProfile, ModelProfile
from tierdet.serving.backend import QueueReport, Served
from tierdet.serving.corrections import Corrections

# Prior for a model with no profile and no observation yet: slow enough that
# it is only chosen when nothing measured fits.
UNKNOWN_SERVICE_MS = 1000.0
# The endpoint of a router fed plain model lists (one backend, unit tests).
LOCAL = "local"
# Answers kept per model and endpoint until Triton's next report counts them.
MAX_PENDING_ANSWERS = 256
# A queue report older than this is not used: the poll has stopped or fails.
QUEUE_MAX_AGE_S = 1.0


@dataclass(frozen=True)
class DeviceWindow:
    """What one endpoint's Triton did with a model between two queue reports:
    the requests it answered, the mean time they waited in its queue, the mean
    batch (images per execution) they ran in, and the mean time the device ran
    the batch each was in (None: the server does not report it)."""

    queue_ms: float
    batch: float
    at: float  # time.monotonic() of the report that closed the window
    compute_ms: float | None
    requests: int
    foreign: bool  # other clients' requests arrived in it


@dataclass(frozen=True, eq=False)  # each ticket is its own: compared by identity
class Ticket:
    """An admitted request: what was predicted, and whether the device was idle."""

    model: str
    predicted_ms: float  # Triton time (queue + service) predicted at admission
    idle: bool  # nothing was in flight on the device when it was admitted
    ratio: float  # the model's correction at the endpoint used for that prediction
    endpoint: str = LOCAL
    admitted_at: float = 0.0  # time.monotonic()


@dataclass
class Dispatch:
    """Work on the device, from ``Router.dispatch``: say how long it took."""

    ticket: Ticket
    observed_ms: float | None = None  # None: it did not complete (nothing learned)

    def observe(self, ms: float) -> None:
        self.observed_ms = ms


@dataclass
class LatencyModel:
    """Predicts service time per model and endpoint; tracks admitted work
    (thread-safe).

    Where Triton reports no device time, learning is guarded against
    queueing: a model's own service time is learned at full weight only from
    requests admitted to an idle device, so a burst cannot inflate the
    estimate (and an inflated estimate sheds the very requests that would
    correct it); requests admitted behind others refine it slowly.
    """

    profile: LatencyProfile
    alpha: float = 0.2
    busy_alpha: float = 0.05
    decay_s: float = 60.0
    corrections: Corrections = field(init=False)  # per model and endpoint
    flight: set[Ticket] = field(default_factory=set)  # admitted, not finished
    # endpoint -> time.monotonic() its device finishes the work in flight there
    busy_until: dict[str, float] = field(default_factory=dict)
    # endpoint -> (time.monotonic() it was asked, requests queued at Triton per model)
    queues: dict[str, tuple[float, dict[str, int]]] = field(default_factory=dict)
    # endpoint -> device ms of work other clients send there per second (EWMA)
    others_rate: dict[str, float] = field(default_factory=dict)
    sent: dict[tuple[str, str], int] = field(default_factory=dict)  # (endpoint, model) -> ours
    # endpoint -> (asked, the high of Triton's arrivals less ours, per model) at the last report
    _last: dict[str, tuple[float, dict[str, int]]] = field(default_factory=dict)
    # (endpoint, model) -> Triton's cumulative counts at the last report
    _served: dict[tuple[str, str], Served] = field(default_factory=dict)
    # (endpoint, model) -> answers (observed ms, time.monotonic()) not yet counted
    _answers: dict[tuple[str, str], list[tuple[float, float]]] = field(default_factory=dict)
    # (endpoint, model) -> ms of a batch-1 answer spent outside the device's run
    # (transfer, Triton's input and output handling, the client)
    _outside: dict[tuple[str, str], float] = field(default_factory=dict)
    # endpoint -> time.monotonic() this gateway's last request there came back
    _returned: dict[str, float] = field(default_factory=dict)
    # endpoint -> time.monotonic() its last queue report was read (the scrape's reply)
    _read_at: dict[str, float] = field(default_factory=dict)
    # endpoints that left the pool with requests of ours still in flight there
    _gone: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.corrections = Corrections(self.decay_s, self.alpha)

    def measured(self, model: str, profile: ModelProfile) -> None:
        """A profile measured while serving (a model the profile file lacks, or a
        new version): what was read against the old one is read again."""
        with self._lock:
            self.profile.models[model] = profile
            self.corrections.forget(model)  # the profile is the device as it runs now
            self._forget_device(model)

    def forget(self, model: str) -> None:
        """A model retired: what was measured and learnt of it no longer holds (a
        model added again under its name is another build, measured again)."""
        with self._lock:
            self.profile.models.pop(model, None)
            self.corrections.forget(model)
            self._forget_device(model)

    def left(self, endpoint: str) -> None:
        """``endpoint`` left the pool (a pod gone): what was read of its device and
        counted of its work goes with it (a pod that comes back is read afresh)."""
        with self._lock:
            self.corrections.left(endpoint)
            for table in (self.busy_until, self.others_rate, self._last, self._returned,
                          self._read_at):
                table.pop(endpoint, None)
            if self._at(endpoint):  # its answers still to come are not read
                self._gone.add(endpoint)
            for keyed in (self.sent, self._served, self._answers, self._outside):
                for key in [k for k in keyed if k[0] == endpoint]:
                    del keyed[key]

    def _forget_device(self, model: str) -> None:
        for key in [k for k in self._outside if k[1] == model]:
            del self._outside[key]

    def base_ms(self, model: str, endpoint: str | None = None) -> float:
        """Profiled (or observed) batch-1 latency, before online correction."""
        prof = self.profile.models.get(model)
        if prof is not None:
            return prof.service_ms(1)
        return self.corrections.observed(model, endpoint) or UNKNOWN_SERVICE_MS

    def slowest_ms(self) -> float:
        """The slowest profiled model's current service time (the prior without one)."""
        return max((self.service_ms(m) for m in list(self.profile.models)),
                   default=UNKNOWN_SERVICE_MS)

    def marginal_ms(self, model: str, endpoint: str | None = None) -> float:
        prof = self.profile.models.get(model)
        return prof.marginal_ms() if prof is not None else self.base_ms(model, endpoint)

    def service_ms(self, model: str, endpoint: str | None = None) -> float:
        """One request's Triton time at batch 1 on ``endpoint``'s device (None: the
        mean of the model's endpoints)."""
        return self.base_ms(model, endpoint) * self.corrections.factor(model, endpoint)

    def cost_ms(self, model: str, endpoint: str | None = None) -> float:
        """Device time one more request of ``model`` adds when the device is busy."""
        return self.marginal_ms(model, endpoint) * self.corrections.factor(model, endpoint)

    def _at(self, endpoint: str) -> list[Ticket]:
        """This gateway's requests in flight at ``endpoint`` (a snapshot)."""
        return [t for t in list(self.flight) if t.endpoint == endpoint]

    def inflight(self, endpoint: str = LOCAL) -> int:
        """This gateway's requests in flight at ``endpoint``."""
        return len(self._at(endpoint))

    def _report(self, endpoint: str) -> tuple[float, dict[str, int]] | None:
        report = self.queues.get(endpoint)
        if report is None or time.monotonic() - report[0] > QUEUE_MAX_AGE_S:
            return None
        return report

    def own_ms(self, endpoint: str = LOCAL, now: float | None = None) -> float:
        """This gateway's work left on ``endpoint``'s device: a clock that each
        admission moves on (by a whole batch-1 service on an idle device: a new
        request cannot join the batch that is running; by the request's batched
        cost behind others) and each completion resets to the cost of what is
        still in flight; in between it runs down, so a request half done counts
        half (FIFO: work ahead only shrinks)."""
        here = self._at(endpoint)
        if not here:
            return 0.0
        now = time.monotonic() if now is None else now
        left = (self.busy_until.get(endpoint, now) - now) * 1e3
        # Overdue (the device is slower than predicted right now): something is still
        # running, progress unknown; expect half of it, not nothing.
        return max(left, 0.5 * max(self.service_ms(t.model, endpoint) for t in here))

    def backlog_ms(self, endpoint: str = LOCAL) -> float:
        """Work queued or running on ``endpoint``'s device: this gateway's own, or
        what Triton reported queued (all gateways', run down since) plus what was
        sent since, whichever is more. Triton's count leaves out the batch it is
        running, so one's own work is a floor."""
        mine = self._at(endpoint)
        own = self.own_ms(endpoint)
        report = self._report(endpoint)
        if report is None:
            return own
        asked, pending = report
        queued = sum(n * self.cost_ms(m, endpoint) for m, n in pending.items() if n > 0)
        waiting = [m for m, n in pending.items() if n > 0]
        if waiting:  # a batch is running ahead of them (not in the count): half of one
            queued += 0.5 * max(self.service_ms(m, endpoint) for m in waiting)
        now = time.monotonic()
        since_s = max(0.0, now - asked)
        # The device has worked on that queue since the report was read (polls come
        # up to a tenth of a second apart: as long as the queue itself, under load).
        read_s = max(0.0, now - self._read_at.get(endpoint, asked))
        shared = max(0.0, queued - read_s * 1e3)
        shared += sum(self.cost_ms(t.model, endpoint) for t in mine if t.admitted_at > asked)
        shared += self.others_rate.get(endpoint, 0.0) * since_s
        return max(own, shared)

    def others_share(self, endpoints: Iterable[str]) -> float:
        """The share of a device (summed over ``endpoints``) that other clients'
        work takes, from fresh reports only (a stale rate says nothing of now)."""
        return sum(self.others_rate.get(e, 0.0) for e in endpoints
                   if self._report(e) is not None) / 1e3

    def predict_ms(self, model: str, endpoint: str = LOCAL) -> float:
        """Triton time for a request admitted now (queue + service)."""
        return self.backlog_ms(endpoint) + self.service_ms(model, endpoint)

    def observe_queues(self, queues: Mapping[str, tuple[float, QueueReport]]) -> None:
        """What each endpoint's Triton reported (``EndpointPool.queues``): its queue,
        and from its arrival count less ours, the rate of other clients' work.

        Triton may count a request of ours later than we do (ours is counted
        when sent), so arrivals less ours dips while ours are in flight and
        recovers when they land: only a new high of it is other clients' work,
        or every dip and recovery would show as phantom load on that endpoint."""
        with self._lock:
            for url, (asked, report) in queues.items():
                ours = {m: n for (e, m), n in self.sent.items() if e == url}
                others = {m: n - ours.get(m, 0) for m, n in report.arrived.items()}
                last = self._last.get(url)
                if last is not None and asked > last[0]:
                    high = {m: max(n, last[1].get(m, n)) for m, n in others.items()}
                    work = sum(self.cost_ms(m, url) * (n - last[1].get(m, n))
                               for m, n in high.items())
                    rate = work / (asked - last[0])
                    prev = self.others_rate.get(url)
                    self.others_rate[url] = rate if prev is None else prev + 0.3 * (rate - prev)
                    foreign = {m for m, n in high.items() if n > last[1].get(m, n)}
                    others = high
                else:
                    foreign = set(others)  # nothing to compare with: assume some
                self._last[url] = (asked, others)
                self._observe_device(url, asked, report.served, foreign)
            self._read_at.update({url: time.monotonic() for url in queues})
            self._gone -= set(queues)  # it answers again: back in the pool
            self.queues = {url: (asked, dict(report.pending))
                           for url, (asked, report) in queues.items()}

    def _observe_device(self, url: str, asked: float, served: Mapping[str, Served],
                        foreign: set[str]) -> None:
        for model, now in served.items():
            before = self._served.get((url, model))
            self._served[url, model] = now
            if before is None or now.requests <= before.requests:
                continue  # nothing answered since: nothing to read
            if (now.queue_us < before.queue_us or now.images < before.images
                    or now.executions < before.executions or now.compute_us < before.compute_us):
                continue  # counters started again (the model was reloaded): a new start
            requests = now.requests - before.requests
            executions = now.executions - before.executions
            batch = (now.images - before.images) / executions if executions > 0 else 1.0
            compute_us = now.compute_us - before.compute_us
            window = DeviceWindow((now.queue_us - before.queue_us) / requests / 1e3,
                                  max(1.0, batch), asked,
                                  compute_us / requests / 1e3 if compute_us > 0 else None,
                                  requests, model in foreign)
            self._read_answers(url, model, window)

    def _read_answers(self, url: str, model: str, window: DeviceWindow) -> None:
        """The device's own account of the answers it counted in ``window``.
        (An answer is read with the window that closes after it, not the one
        before: at the start of a burst the one before knows nothing of the
        queue the answer waited in.)"""
        pending = self._answers.get((url, model), [])
        counted = [observed for observed, at in pending if at <= window.at]
        self._answers[url, model] = [(o, at) for o, at in pending if at > window.at]
        load, prof = self.corrections.at(model, url), self.profile.models.get(model)
        if prof is not None and window.compute_ms is not None:
            if window.batch <= max(prof.batch_ms):  # beyond it the profile is a guess
                self._read_device(url, model, window, window.compute_ms, counted)
            return
        # No device time reported: of each answer's time, Triton's mean queue wait
        # over the window was not service; the rest is one execution at the
        # window's mean batch. Every answer, idle or busy, reads the device.
        batch = max(1, round(window.batch))
        for observed in counted:
            served_ms = max(0.0, observed - window.queue_ms)
            if prof is not None:
                implied = served_ms / prof.service_ms(batch)
                self.corrections.learn(load, implied, self.alpha, window.at)
            else:  # no profile: take batches as a CPU runs them, image after image
                self.corrections.observe(load, served_ms / batch)

    def _read_device(self, url: str, model: str, window: DeviceWindow, run_ms: float,
                     answers: list[float]) -> None:
        """The device's speed from the time Triton says it ran the model: a batch-1
        answer is that run (``run_ms``: the window's mean per request), scaled to
        batch 1 by the profile, plus the time outside Triton's queue and the run,
        read from windows where every request answered was ours and no other
        client's arrived (until one: what the estimate leaves beside the first
        run). Each request the window counts moves the estimate as one answer
        did (``alpha``)."""
        load = self.corrections.at(model, url)
        prof = self.profile.models[model]
        one = prof.service_ms(1)
        run_1 = run_ms * one / prof.per_request_ms(window.batch)
        outside = self._outside.get((url, model))
        if outside is None:
            outside = max(0.0, one * self.corrections.ratio(load, window.at) - run_1)
        if answers and len(answers) == window.requests and not window.foreign:
            for observed in answers:
                # Bounded: one answer held up outside (a pause, a retransmit) is no trend.
                rest = min(observed - window.queue_ms - run_ms, one)
                outside += self.alpha * (max(0.0, rest) - outside)
        self._outside[url, model] = outside
        weight = 1.0 - (1.0 - self.alpha) ** window.requests
        self.corrections.learn(load, (outside + run_1) / one, weight, window.at)

    def idle(self, endpoint: str = LOCAL) -> bool:
        """Nothing of this gateway's in flight at ``endpoint``, and nothing queued
        there in Triton's last report (none recent: this gateway's work only)."""
        if self._at(endpoint):
            return False
        report = self._report(endpoint)
        # A report asked before our last request came back may count that request
        # queued: it says nothing of the device now.
        if report is None or report[0] <= self._returned.get(endpoint, 0.0):
            return True
        return not any(report[1].values())

    def admit(self, model: str, endpoint: str = LOCAL) -> Ticket:
        """Count a request as in flight at ``endpoint``."""
        with self._lock:
            now = time.monotonic()
            ticket = Ticket(model, self.predict_ms(model, endpoint), self.idle(endpoint),
                            self.corrections.factor(model, endpoint), endpoint, now)
            ahead = self.own_ms(endpoint, now)
            cost = (self.cost_ms(model, endpoint) if ahead > 0
                    else self.service_ms(model, endpoint))
            self.busy_until[endpoint] = now + (ahead + cost) / 1e3
            self.sent[endpoint, model] = self.sent.get((endpoint, model), 0) + 1
            self.flight.add(ticket)
            return ticket

    def finish(self, ticket: Ticket, observed_ms: float | None) -> None:
        """Release an admitted request; learn from its latency if it completed."""
        with self._lock:
            self.flight.discard(ticket)
            if ticket.endpoint in self._gone:  # sent before it left: nothing to keep
                if not self._at(ticket.endpoint):
                    self._gone.discard(ticket.endpoint)
                return
            left = sum(self.cost_ms(t.model, t.endpoint) for t in self._at(ticket.endpoint))
            self.busy_until[ticket.endpoint] = time.monotonic() + left / 1e3
            self._returned[ticket.endpoint] = time.monotonic()
            if observed_ms is None or ticket.predicted_ms <= 0:
                return
            load = self.corrections.at(ticket.model, ticket.endpoint)
            now = time.monotonic()
            prof = self.profile.models.get(ticket.model)
            key = (ticket.endpoint, ticket.model)
            if key in self._served:  # Triton reports this model: read it with the window
                answers = self._answers.setdefault(key, [])  # that will count this answer
                answers.append((observed_ms, now))
                del answers[:-MAX_PENDING_ANSWERS]
            elif prof is not None:
                implied = ticket.ratio * observed_ms / ticket.predicted_ms
                alpha = self.alpha if ticket.idle else self.busy_alpha
                self.corrections.learn(load, implied, alpha, now)
            elif ticket.idle:
                self.corrections.observe(load, observed_ms)

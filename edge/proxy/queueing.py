"""The wait at the edge: a request whose model has no host with room waits here, in a queue, with
nothing sent upstream, until a slot frees, its deadline passes or its client leaves.

Theory of operation: the decisions are `edge/routing/admission.py`'s (synchronous): who goes at
once, who is shed, who is next. This module holds each waiter's future and wakes it: when an
attempt on any host ends (`released`, the Attempts hook: this worker's own releases, at once),
on a short timer while anyone waits (`admission.recheck_ms`: other workers' releases reach this
worker through SharedLoad's shared in-flight counts, and engine readings change capacities), and
when a waiter leaves without using its grant. With --workers N the counts are live (each
attempt writes its start and end to the shared table, edge/app.py wires it) and a granted
waiter confirms, when it resumes, that another worker did not take the slot meanwhile. A waiter
leaves the queue in a `finally`, so a client that disconnects while queued (its task cancelled)
is out of the queue, and out of the queue-length gauge, at once.

Off costs nothing: with no capacity configured (`AdmissionSettings.enabled` false) no Queueing
exists; the proxy checks one attribute per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Final

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.access.auth import Principal
from edge.config import AdmissionSettings
from edge.errors import BadRequest, TooManyRequests
from edge.http.server import Request
from edge.observe.families import LATENCY_BUCKETS, Counter, Histogram, new_cells
from edge.routing.admission import (
    ADMITTED,
    MAX_PRIORITY,
    OUTCOMES,
    PRIORITY_NAMES,
    QUEUED,
    SHED_DEADLINE,
    SHED_DOWN,
    SHED_PRIORITY,
    WAITING,
    Admission,
    Capacity,
    Ticket,
    Waiter,
    down,
    shed,
)
from edge.routing.attempt import OK, Attempt
from edge.routing.engines import EngineLoad
from edge.routing.fleet import Fleet, Host

PRIORITY_HEADER: Final = "X-Edge-Priority"
DEADLINE_HEADER: Final = "X-Edge-Deadline-Ms"


class Queueing(Collector):
    """One worker's admission: capacity, the queues and their futures, and their metrics."""

    def __init__(self, settings: AdmissionSettings, fleet: Callable[[], Fleet]) -> None:
        self.settings = settings
        self.admission = Admission(settings)
        self.capacity: Capacity = self.admission.capacity
        self._fleet = fleet
        self._timer: asyncio.TimerHandle | None = None
        # model -> requests sent at once, per priority: admitted, waited 0 s (see `collect`).
        self._sent: dict[str, list[int]] = {}
        self.outcomes = Counter(
            "edge_admission", "Requests through admission, by outcome (admitted at once, "
            "queued then sent, shed_full, shed_priority, shed_deadline, shed_down).",
            ("model", "outcome"),
        )  # fmt: skip
        self.waits = Histogram(
            "edge_queue_wait_seconds", "Time a request waited in the edge's queue before it was "
            "sent (0 for one sent at once).", ("model", "priority"), LATENCY_BUCKETS,
        )  # fmt: skip

    def configure(self, settings: AdmissionSettings) -> None:
        """A reload: new settings; configured capacities are read again."""
        self.settings = self.admission.settings = self.capacity.settings = settings
        self.capacity.forget()

    # --- per request ----------------------------------------------------------------------

    def ticket(
        self, request: Request, principal: Principal | None, workspace: str, model: str
    ) -> Ticket:
        """The request's tenant, weight, priority and deadline (400 for a malformed header)."""
        s = self.settings
        key = principal.key_id if principal is not None else ""
        space = workspace or (principal.workspace if principal is not None else "")
        tenant = space or key or request.remote
        # Plans: the workspace's weight, else the key's (config first, then the key's own).
        weight = s.weights.get(space) if space else None
        if weight is None and key:
            weight = s.weights.get(key)
        if weight is None and principal is not None and principal.weight > 0:
            weight = principal.weight
        default, cap = s.default_priority, s.max_priority
        if principal is not None:
            if principal.priority >= 0:
                default = principal.priority
                cap = max(cap, default)
            if principal.max_priority >= 0:
                cap = principal.max_priority
        headers = request.headers
        raw = headers.get(PRIORITY_HEADER)
        priority = default if raw is None else min(_priority(raw), cap)
        deadline_s = self.admission.deadline_s(model)
        raw = headers.get(DEADLINE_HEADER)
        if raw is not None:
            deadline_s = min(_deadline_ms(raw), s.max_deadline_ms) / 1000.0
        return Ticket(tenant, float(weight or 1.0), priority, deadline_s)

    async def wait(self, model: str, hosts: Sequence[Host], ticket: Ticket) -> None:
        """Return when the request may be sent: at once while a host of `model` has room and
        nobody waits before it, else when the queue grants it a slot. Raises TooManyRequests
        (Unavailable: no host up) when it is shed; leaves the queue when cancelled."""
        adm, now = self.admission, time.monotonic()
        if adm.admit_now(model, hosts, now, ticket):
            # Counted as plain integers; the families read them at scrape time.
            sent = self._sent.get(model)
            if sent is None:
                sent = self._sent[model] = [0] * (MAX_PRIORITY + 1)
            sent[ticket.priority] += 1
            return
        try:
            waiter, evicted = adm.enqueue(model, hosts, ticket, now)
        except TooManyRequests as refused:
            self.outcomes.inc((model, refused.code or SHED_DEADLINE))
            raise
        if evicted is not None:
            retry_s = adm.retry_s(model, evicted.ticket.priority, now)
            self._refuse(evicted, shed(model, SHED_PRIORITY, retry_s))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiter.token = future
        deadline = loop.call_later(ticket.deadline_s, self._expire, waiter)
        self._pump(model)
        self._arm()
        used = False
        try:
            await future
            if self.capacity.shared is not None:  # --workers N: is the slot still there?
                await self._confirm(waiter, hosts)
            used = True  # the caller takes the slot now, before anything else runs
            self.outcomes.inc((model, QUEUED))
            self.waits.observe((model, str(ticket.priority)), time.monotonic() - now)
        finally:
            deadline.cancel()
            adm.leave(waiter)
            if not used and adm.waiting:
                self._pump(model)  # a grant this waiter did not use goes to the next

    async def _confirm(self, waiter: Waiter, hosts: Sequence[Host]) -> None:
        """Another worker may have taken the slot between this worker's grant and now (a loop
        turn): then the waiter is back at its place in the queue until the next grant."""
        loop = asyncio.get_running_loop()
        while not self.admission.confirm(waiter, hosts, time.monotonic()):
            future: asyncio.Future[None] = loop.create_future()
            waiter.token = future
            self._arm()
            await future

    def length(self, model: str) -> int:
        return self.admission.length(model)

    # --- hooks ------------------------------------------------------------------------------

    def released(self, attempt: Attempt) -> None:
        """Attempts' hook: an attempt ended, so its host has a slot again."""
        adm = self.admission
        if attempt.outcome == OK:
            adm.ended(attempt.model, attempt.ended_at - attempt.started)
        if adm.waiting:
            self._pump(attempt.model)
            self._pump_all()

    def engine(self, host: Host, reading: EngineLoad) -> None:
        """Scraper's hook: the engine's own queue and KV cache teach capacity."""
        self.capacity.engine(host, reading.queue, reading.kv)
        if self.admission.waiting:
            self._pump_all()

    # --- waking -------------------------------------------------------------------------------

    def _pump(self, model: str) -> None:
        for waiter in self.admission.dispatch(model, time.monotonic()):
            future = waiter.token
            if isinstance(future, asyncio.Future) and not future.done():
                future.set_result(None)

    def _pump_all(self) -> None:
        for model, queue in list(self.admission.queues.items()):
            if queue.count:
                self._pump(model)

    def _arm(self) -> None:
        if self._timer is None and self.admission.waiting:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.settings.recheck_ms / 1000.0, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._pump_all()
        self._arm()

    def _expire(self, waiter: Waiter) -> None:
        """The waiter's deadline passed while it waited: 429 (503 when no host is up)."""
        if waiter.state != WAITING:
            return
        adm, model, now = self.admission, waiter.model, time.monotonic()
        adm.leave(waiter)
        retry_s = adm.retry_s(model, waiter.ticket.priority, now)
        if adm.up(model, now):
            self._refuse(waiter, shed(model, SHED_DEADLINE, retry_s))
        else:
            waiter.shed = SHED_DOWN
            self._refuse(waiter, down(model, retry_s))

    def _refuse(self, waiter: Waiter, error: Exception) -> None:
        outcome = waiter.shed or (error.code if isinstance(error, TooManyRequests) else "")
        self.outcomes.inc((waiter.model, outcome or SHED_DEADLINE))
        future = waiter.token
        if isinstance(future, asyncio.Future) and not future.done():
            future.set_exception(error)

    # --- scrape time --------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        models = list(self._fleet().models)
        outcomes = Counter(self.outcomes.name, self.outcomes.doc, self.outcomes.labels)
        outcomes.values.update(self.outcomes.values)
        waits = Histogram(self.waits.name, self.waits.doc, self.waits.labels, self.waits.bounds)
        waits.values.update((k, list(v)) for k, v in self.waits.values.items())
        for model, sent in self._sent.items():
            outcomes.inc((model, ADMITTED), sum(sent))
            for priority, n in enumerate(sent):
                if n:
                    zeros = new_cells(LATENCY_BUCKETS)
                    zeros[0] = n  # 0 s: the first bucket
                    waits.add((model, str(priority)), zeros)
        yield outcomes.family([(m, o) for m in models for o in OUTCOMES])
        yield waits.family()
        gauge = GaugeMetricFamily(
            "edge_queue_length", "Requests waiting in the edge's queue, by model and priority.",
            labels=["model", "priority"],
        )  # fmt: skip
        seen: set[tuple[str, str]] = set()
        for model, queue in self.admission.queues.items():
            for priority, n in queue.by_priority.items():
                seen.add((model, str(priority)))
                gauge.add_metric([model, str(priority)], n)
        default = str(self.settings.default_priority)
        for model in models:
            if (model, default) not in seen:
                gauge.add_metric([model, default], 0)
        yield gauge

    def __repr__(self) -> str:
        return f"<Queueing {self.admission!r}>"


def _priority(raw: str) -> int:
    text = raw.strip().lower()
    named = PRIORITY_NAMES.get(text)
    if named is not None:
        return named
    if text.isdigit() and int(text) <= MAX_PRIORITY:
        return int(text)
    raise BadRequest(
        f"{PRIORITY_HEADER} must be 0..{MAX_PRIORITY} or one of: low, normal, high.",
        code="invalid_priority",
    )


def _deadline_ms(raw: str) -> int:
    text = raw.strip()
    if text.isdigit() and 0 < int(text) < 1 << 31:
        return int(text)
    raise BadRequest(
        f"{DEADLINE_HEADER} must be a positive integer (milliseconds).", code="invalid_deadline"
    )

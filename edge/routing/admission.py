"""Admission at the edge: how many requests each host runs at once, and who goes next when every
host of a model is full. Pure and synchronous: no I/O, no asyncio (edge/proxy/queueing.py waits).

Theory of operation
-------------------
Capacity. A host runs at most `Capacity.of(host, model)` attempts at once: from
`[admission.models.M] capacity` (each host of M), else the longest `[admission] servers` URL
prefix, else none (0: unlimited). With `engine_metrics`, a scraped engine that reports requests
waiting in its own queue, or its KV cache nearly full (`kv_full`), teaches a capacity: the edge's
load on it at that reading less the engine's queue (multiplicative decrease); a reading without
a queue raises it by one (additive increase). The load is the worker's in-flight count plus the
other workers', read live from SharedLoad's table (`Capacity.shared`: each attempt writes its
start and end there at once, so only two workers deciding within the same tens of microseconds
can both take a server's last slot; `Admission.confirm` closes the longer window of a queued
grant). With `replicas = N` each replica of the edge takes `capacity // N` of each host (at
least 1): a static share, no Redis round trip per request; the price is a share left idle while
a replica has nothing to send.

Queue. A request arriving while no routable host of its model has room, or while others of the
model wait already (no barging), joins the model's queue; nothing is sent upstream. The queue
is ordered by priority (higher first), then by start-time fair queueing among tenants: an arrival
of tenant t gets the start tag S = max(V, F[t]) and F[t] = S + 1/weight(t), where V is the start
tag of the last request dequeued. A tenant sending 100x more requests queues behind its own tags,
so tenants with waiting requests share the dispatches in proportion to their weights. Requests
sent at once count too (the tenant that filled the fleet before a queue formed waits behind the
others); the tags are forgotten whenever the queue is empty (no contention to remember).

When a slot frees (`dispatch`: an attempt ended, or the proxy's recheck timer), the next waiters
are granted, as many as there are free slots less the grants not yet used (a granted waiter
takes its slot when its task resumes, a loop turn later; `leave` releases the grant).

Bounds. `queue_length` waiters per model: a full queue sheds the arrival (shed_full), unless it
has a higher priority than the lowest waiting, whose youngest is shed instead (shed_priority).
A waiter whose deadline passes is shed (shed_deadline); an arrival whose expected wait (the
waiters of its priority or higher, over the model's slots, times the recent attempt duration)
exceeds its deadline is shed at once, not after waiting in vain.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from edge.config import AdmissionSettings
from edge.errors import TooManyRequests, Unavailable
from edge.routing.fleet import Host
from edge.routing.stats import SharedLoad

# Named priorities (X-Edge-Priority accepts these or an integer 0..MAX_PRIORITY).
PRIORITY_NAMES: Final = {"low": 0, "normal": 5, "high": 9}
MAX_PRIORITY: Final = 9

# edge_admission_total's outcomes.
ADMITTED: Final = "admitted"  # sent at once: a host had room
QUEUED: Final = "queued"  # waited in the edge, then sent
SHED_FULL: Final = "shed_full"  # the queue was full
SHED_PRIORITY: Final = "shed_priority"  # evicted by an arrival of higher priority
SHED_DEADLINE: Final = "shed_deadline"  # its deadline passed, or would have
SHED_DOWN: Final = "shed_down"  # no host of the model was up when its deadline passed
OUTCOMES: Final = (ADMITTED, QUEUED, SHED_FULL, SHED_PRIORITY, SHED_DEADLINE, SHED_DOWN)

# Waiter states.
WAITING: Final = 0
GRANTED: Final = 1
GONE: Final = 2

_UNLIMITED: Final = 1 << 30
_SERVICE_ALPHA: Final = 0.2  # EWMA weight of the newest attempt duration


@dataclass(frozen=True, slots=True)
class Ticket:
    """Who asks and how urgently: the tenant (workspace, key or client address), its weight,
    the request's priority (already capped) and how long it may wait."""

    tenant: str
    weight: float
    priority: int
    deadline_s: float


class Waiter:
    """One queued request. `token` is the waiting side's own (the proxy's future)."""

    __slots__ = ("ticket", "model", "seq", "tag", "arrived", "state", "token", "shed")

    def __init__(self, ticket: Ticket, model: str, seq: int, tag: float, arrived: float) -> None:
        self.ticket = ticket
        self.model = model
        self.seq = seq
        self.tag = tag  # start tag (virtual time)
        self.arrived = arrived
        self.state = WAITING
        self.token: object = None
        self.shed = ""  # the outcome it was shed with, if it was

    def __repr__(self) -> str:
        return f"<Waiter {self.model} p{self.ticket.priority} tag={self.tag:.2f} s={self.state}>"


class ModelQueue:
    """The waiters of one model: a heap by (-priority, start tag, arrival), removed lazily."""

    __slots__ = ("model", "hosts", "heap", "finish", "vtime", "count", "by_priority", "granted")

    def __init__(self, model: str, hosts: Sequence[Host]) -> None:
        self.model = model
        self.hosts = hosts  # the latest snapshot a waiter brought
        self.heap: list[tuple[int, float, int, Waiter]] = []
        self.finish: dict[str, float] = {}  # tenant -> finish tag of its last arrival
        self.vtime = 0.0
        self.count = 0  # waiters still WAITING
        self.by_priority: dict[int, int] = {}
        self.granted = 0  # granted, not yet resumed

    def push(self, waiter: Waiter) -> None:
        ticket = waiter.ticket
        heapq.heappush(self.heap, (-ticket.priority, waiter.tag, waiter.seq, waiter))
        self.count += 1
        p = ticket.priority
        self.by_priority[p] = self.by_priority.get(p, 0) + 1

    def pop(self) -> Waiter | None:
        heap = self.heap
        while heap:
            waiter = heapq.heappop(heap)[3]
            if waiter.state == WAITING:
                self._gone(waiter)
                self.vtime = waiter.tag
                return waiter
        return None

    def remove(self, waiter: Waiter) -> None:
        """Out of the queue now (counts at once; its heap entry is skipped later)."""
        if waiter.state == WAITING:
            self._gone(waiter)
            if len(self.heap) > 2 * self.count + 64:
                self.heap = [e for e in self.heap if e[3].state == WAITING]
                heapq.heapify(self.heap)

    def _gone(self, waiter: Waiter) -> None:
        waiter.state = GONE
        self.count -= 1
        p = waiter.ticket.priority
        self.by_priority[p] -= 1
        if not self.count and not self.granted:
            self.finish.clear()  # nobody waits: no contention to remember

    def tag(self, ticket: Ticket) -> float:
        """The start tag of `ticket`'s request, and its tenant's finish tag moved past it."""
        finish = self.finish
        tag = max(self.vtime, finish.get(ticket.tenant, 0.0))
        finish[ticket.tenant] = tag + 1.0 / ticket.weight
        return tag

    def ahead(self, priority: int) -> int:
        """Waiters that would go before a new arrival of `priority` (at most)."""
        return sum(n for p, n in self.by_priority.items() if p >= priority)

    def lowest(self) -> Waiter | None:
        """The youngest waiter of the lowest priority waiting (the first to shed)."""
        found: Waiter | None = None
        for entry in self.heap:
            w = entry[3]
            if w.state != WAITING:
                continue
            if found is None or (w.ticket.priority, -w.seq) < (found.ticket.priority, -found.seq):
                found = w
        return found

    def __repr__(self) -> str:
        return f"<ModelQueue {self.model} waiting={self.count} granted={self.granted}>"


class Capacity:
    """Requests each host may run at once, per model (0: unlimited)."""

    __slots__ = ("settings", "_cache", "learned", "shared")

    def __init__(self, settings: AdmissionSettings) -> None:
        self.settings = settings
        self._cache: dict[str, dict[str, int]] = {}  # model -> url -> configured capacity
        self.learned: dict[str, int] = {}  # url -> capacity taught by the engine's metrics
        # --workers N: the other workers' counts read live from the shared table (set by
        # edge/app.py, which also has every attempt write its start and end there at once).
        self.shared: SharedLoad | None = None

    def of(self, host: Host, model: str) -> int:
        per = self._cache.get(model)
        if per is None:
            per = self._cache[model] = {}
        cap = per.get(host.url)
        if cap is None:
            cap = per[host.url] = self._configured(host.url, model)
        learned = self.learned.get(host.url)
        if learned is not None and (cap == 0 or learned < cap):
            return learned
        return cap

    def _configured(self, url: str, model: str) -> int:
        s = self.settings
        rules = s.models.get(model)
        cap = rules.capacity if rules is not None else 0
        if not cap:
            best = -1
            for prefix, value in s.servers.items():
                if (prefix == "*" or url.startswith(prefix)) and len(prefix) > best:
                    best, cap = len(prefix), value
        if cap and s.replicas > 1:
            cap = max(1, cap // s.replicas)
        return cap

    def load(self, host: Host) -> int:
        """This worker's attempts on `host` plus the other workers': live when shared (a read
        per row of the table: two per worker), else as of SharedLoad's last publish (0 with one
        worker)."""
        shared = self.shared
        if shared is None:
            return host.inflight + host.stats.remote_inflight
        return host.inflight + shared.others(host.url)

    def has_room(self, host: Host, model: str) -> bool:
        cap = self.of(host, model)
        return cap == 0 or self.load(host) < cap

    def room(self, model: str, hosts: Sequence[Host]) -> Sequence[Host]:
        """The hosts of `hosts` below their capacity (`hosts` itself when all are: no list)."""
        for host in hosts:
            if not self.has_room(host, model):
                return [h for h in hosts if self.has_room(h, model)]
        return hosts

    def any_room(self, model: str, hosts: Sequence[Host], now: float) -> bool:
        """A routable host not held has room, or none is routable (the common case, found at
        the first host with room)."""
        up = False
        for host in hosts:
            if host.held_until > now or not host.routable_at(now):
                continue
            cap = self.of(host, model)
            if cap == 0 or self.load(host) < cap:
                return True
            up = True
        return not up

    def free(self, model: str, hosts: Sequence[Host], now: float) -> tuple[int, int, bool]:
        """(free slots, slots in all, any host up) over the routable hosts not held."""
        free = total = 0
        up = False
        for host in hosts:
            if not host.routable_at(now) or host.held_until > now:
                continue
            up = True
            cap = self.of(host, model)
            if cap == 0:
                return _UNLIMITED, _UNLIMITED, True
            total += cap
            free += max(0, cap - self.load(host))
        return free, total, up

    def engine(self, host: Host, queue: float, kv: float | None) -> None:
        """A scrape of `host`'s engine: a queue (or a full KV cache) teaches a lower capacity,
        a reading without one raises a taught capacity by one."""
        if not self.settings.engine_metrics:
            return
        saturated = queue > 0 or (kv is not None and kv >= self.settings.kv_full)
        learned = self.learned.get(host.url)
        if saturated:
            self.learned[host.url] = max(1, self.load(host) - int(queue))
        elif learned is not None:
            self.learned[host.url] = learned + 1

    def forget(self) -> None:
        """Settings or the fleet changed: configured capacities are read again."""
        self._cache.clear()

    def __repr__(self) -> str:
        return f"<Capacity models={len(self._cache)} learned={len(self.learned)}>"


class Admission:
    """Capacity and the per-model queues of one worker."""

    __slots__ = ("settings", "capacity", "queues", "waiting", "service", "_seq")

    def __init__(self, settings: AdmissionSettings) -> None:
        self.settings = settings
        self.capacity = Capacity(settings)
        self.queues: dict[str, ModelQueue] = {}
        self.waiting = 0  # waiters over every model
        self.service: dict[str, float] = {}  # model -> EWMA of an attempt's duration (s)
        self._seq = 0

    def admit_now(
        self, model: str, hosts: Sequence[Host], now: float, ticket: Ticket | None = None
    ) -> bool:
        """Whether a request of `model` goes at once: nobody waits before it and a routable host
        has a slot (or no host is routable: the plan then gives its own answer). A request sent
        at once still counts in its tenant's finish tag, so that a tenant who took the slots
        before a queue formed queues behind the others (until the queue is empty again)."""
        queue = self.queues.get(model)
        if queue is not None and (queue.count or queue.granted):
            free, _, up = self.capacity.free(model, hosts, now)
            admit = not up or (queue.count == 0 and free > queue.granted)
        else:
            admit = self.capacity.any_room(model, hosts, now)
        if admit and ticket is not None:
            if queue is None:
                queue = self.queues[model] = ModelQueue(model, hosts)
            queue.tag(ticket)
        return admit

    def enqueue(
        self, model: str, hosts: Sequence[Host], ticket: Ticket, now: float
    ) -> tuple[Waiter, Waiter | None]:
        """Queue a request; returns it and a waiter shed to make room (or None). Raises
        TooManyRequests when it is shed itself (queue full, or a wait past its deadline)."""
        queue = self.queues.get(model)
        if queue is None:
            queue = self.queues[model] = ModelQueue(model, hosts)
        queue.hosts = hosts
        expected = self.expected_wait(queue, ticket.priority, now)
        if expected > ticket.deadline_s:
            raise shed(model, SHED_DEADLINE, expected)
        evicted: Waiter | None = None
        if queue.count >= self._limit(model):
            low = queue.lowest()
            if low is None or low.ticket.priority >= ticket.priority:
                raise shed(model, SHED_FULL, expected)
            self.leave(low)
            low.shed = SHED_PRIORITY
            evicted = low
        tag = queue.tag(ticket)
        if len(queue.finish) > 2 * queue.count + 256:
            vtime = queue.vtime
            queue.finish = {t: f for t, f in queue.finish.items() if f > vtime}
        self._seq += 1
        waiter = Waiter(ticket, model, self._seq, tag, now)
        queue.push(waiter)
        self.waiting += 1
        return waiter, evicted

    def expected_wait(self, queue: ModelQueue, priority: int, now: float) -> float:
        """Seconds a new arrival of `priority` would wait: the waiters before it over the model's
        slots, times the recent attempt duration (0 while nothing was measured)."""
        service_s = self.service.get(queue.model, 0.0)
        if service_s <= 0.0:
            return 0.0
        _, total, _ = self.capacity.free(queue.model, queue.hosts, now)
        if total <= 0 or total >= _UNLIMITED:
            return 0.0
        rounds = math.floor((queue.ahead(priority) + queue.granted) / total) + 1
        return rounds * service_s

    def retry_s(self, model: str, priority: int, now: float) -> float:
        """When a shed request of `priority` may try again: the wait it would have now (at
        least a second: Retry-After counts whole seconds)."""
        queue = self.queues.get(model)
        return 1.0 if queue is None else max(1.0, self.expected_wait(queue, priority, now))

    def dispatch(self, model: str, now: float) -> list[Waiter]:
        """Grant the next waiters of `model` as many slots as are free (less grants unused)."""
        queue = self.queues.get(model)
        if queue is None or not queue.count:
            return []
        free, _, up = self.capacity.free(model, queue.hosts, now)
        if not up:
            return []  # nothing routable: waiters wait for a host or their deadline
        granted: list[Waiter] = []
        while free > queue.granted and queue.count:
            waiter = queue.pop()
            if waiter is None:
                break
            waiter.state = GRANTED
            queue.granted += 1
            self.waiting -= 1
            granted.append(waiter)
        return granted

    def confirm(self, waiter: Waiter, hosts: Sequence[Host], now: float) -> bool:
        """A granted waiter resumes (--workers N only): whether a host still has room, judged on
        live counts. The grant was this worker's alone, a loop turn ago: another worker may
        have taken the slot since. If so the waiter goes back to its place (its tag and arrival
        kept: first in line again) and True only comes with a later grant. What follows a True
        (the plan, the attempt's start) runs without awaiting, so the slot is written at once."""
        if self.capacity.any_room(waiter.model, hosts, now):
            return True
        queue = self.queues.get(waiter.model)
        if queue is None or waiter.state != GRANTED:
            return True  # not a grant this queue holds: nothing to give back
        queue.granted -= 1
        waiter.state = WAITING
        queue.push(waiter)
        self.waiting += 1
        return False

    def leave(self, waiter: Waiter) -> None:
        """The waiter's task resumed or ended: out of the queue, and its grant released."""
        queue = self.queues.get(waiter.model)
        if queue is None:
            return
        if waiter.state == WAITING:
            queue.remove(waiter)
            self.waiting -= 1
        elif waiter.state == GRANTED:
            waiter.state = GONE
            queue.granted -= 1

    def ended(self, model: str, duration_s: float) -> None:
        """An attempt of `model` ended well after `duration_s`: the service time estimate."""
        s = self.service.get(model)
        self.service[model] = duration_s if s is None else s + _SERVICE_ALPHA * (duration_s - s)

    def up(self, model: str, now: float) -> bool:
        """Whether any host of `model` is routable (a waiter shed at its deadline: 429 if so,
        503 if not)."""
        queue = self.queues.get(model)
        return queue is not None and any(h.routable_at(now) for h in queue.hosts)

    def _limit(self, model: str) -> int:
        rules = self.settings.models.get(model)
        return (rules.queue_length if rules is not None else 0) or self.settings.queue_length

    def deadline_s(self, model: str) -> float:
        rules = self.settings.models.get(model)
        ms = (rules.deadline_ms if rules is not None else 0) or self.settings.deadline_ms
        return ms / 1000.0

    def length(self, model: str) -> int:
        queue = self.queues.get(model)
        return queue.count if queue is not None else 0

    def __repr__(self) -> str:
        return f"<Admission waiting={self.waiting} queues={len(self.queues)}>"


def shed(model: str, outcome: str, retry_s: float) -> TooManyRequests:
    """The 429 (503 when no host of the model is up) a shed request gets, with Retry-After."""
    retry = str(max(1, math.ceil(retry_s)))
    reasons = {
        SHED_FULL: "the queue for this model is full",
        SHED_PRIORITY: "a request of higher priority took its place in the queue",
        SHED_DEADLINE: "it could not be served within its deadline (X-Edge-Deadline-Ms)",
    }
    text = f"Every server of model '{model}' is busy and {reasons.get(outcome, outcome)}."
    return TooManyRequests(text, {"Retry-After": retry}, code=outcome)


def down(model: str, retry_s: float) -> Unavailable:
    failed = Unavailable(f"No server of model '{model}' came up within the request's deadline.")
    failed.headers["Retry-After"] = str(max(1, math.ceil(retry_s)))
    return failed

"""Which host each attempt of one request goes to, and why the request failed when none is left.

Theory of operation: the first attempt goes where the request's `Decision` points (a pin, the
affinity target) or by policy; each retry goes by policy among the hosts that are routable, of the
best probe rank, and not tried yet (`health.candidates`). When no host of the model is routable,
one host out of rotation gets an early half-open trial (`health.fallback`, once per request,
never past a pin), so that a model whose every host is out is tried rather than refused. A retry
must be paid for from the retry budget, which keeps a failing fleet from multiplying its load;
a move off a host whose connection pool was full put no load on anyone and is free.

Retry-After: a host that answers 429 or 503 with one is held (`hold`: `Host.held_until`), so no
request of this worker picks it until then (a hold is busy, not broken: health is untouched).
When `next` finds no host, `wait` says how long until a held host of the model takes requests
again, within what the request may still wait; after that wait `next` names that host, tried or
not (a 429 is no failure of the host), paid from the retry budget like any retry. A pinned
request waits for its own host the same way and for no other.

Deadlines: `others_left` tells the proxy whether a slow attempt could move on (a host not tried,
or the early trial, and a retry in the budget), so that it cuts a slow first byte short only
when something else can take the request (edge/routing/stats.py's `first_byte_deadline`).

A plan is synchronous and does no I/O: the proxy (edge/proxy/forward.py) runs the attempts it
names, and a client library can run it the same way.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence

from edge.errors import Unavailable
from edge.routing.admission import Capacity
from edge.routing.balance import Balancer, Decision
from edge.routing.fleet import UP, Host
from edge.routing.health import RetryBudget, candidates, fallback, why


class Plan:
    """The hosts one request tries, in order, and the reasons each one failed."""

    __slots__ = (
        "model", "hosts", "decision", "balancer", "budget", "tried", "reasons", "denied",
        "waited", "_trialled", "_free", "_due", "_due_until", "capacity",
    )  # fmt: skip

    def __init__(
        self,
        model: str,
        hosts: Sequence[Host],
        decision: Decision | None,
        balancer: Balancer,
        budget: RetryBudget,
    ) -> None:
        self.model = model
        self.hosts = hosts
        self.decision = decision
        self.balancer = balancer
        self.budget = budget
        self.tried: list[Host] = []
        self.reasons: list[str] = []
        self.denied = False  # the last `next` found the retry budget spent
        self.waited = 0.0  # seconds `wait` had this request wait for held hosts, in all
        self._trialled = False
        self._free = False  # the last attempt sent nothing (a full pool): the next is no retry
        self._due: Host | None = None  # the held host the last `wait` was for
        self._due_until = 0.0  # ... and the end of its hold then (a later hold extends it)
        # [admission]: hosts at capacity are skipped while another has room (set by the caller).
        self.capacity: Capacity | None = None
        budget.deposit()

    def next(self) -> Host | None:
        """The host for the next attempt, or None when the request has no attempt left (or
        only a held host: see `wait`)."""
        host = self._resume() if self._due is not None else self._pick()
        if host is None:
            return None
        if self.tried and not self._free and not self.budget.withdraw():
            self.denied = True
            return None
        self.tried.append(host)
        return host

    def _pick(self) -> Host | None:
        decision = self.decision
        exclude: Collection[Host] = self.tried
        if decision is not None and (target := decision.target) is not None:
            if target.held_until and target.held_until > time.monotonic():
                if decision.pinned:
                    return None  # a pin waits for its own host (`wait`), never another
                exclude = [*self.tried, target]  # held since affinity chose it
        pool = candidates(self.model, self.hosts, self.tried)
        if self.capacity is not None:
            pool, exclude = self._room(self.capacity, pool, exclude)
        host = self.balancer.pick(pool, exclude, decision)
        if host is None and not self._trialled and not (decision and decision.pinned):
            host = fallback(self.hosts, self.tried)
            self._trialled = host is not None
        return host

    def _room(
        self, capacity: Capacity, pool: Sequence[Host], exclude: Collection[Host]
    ) -> tuple[Sequence[Host], Collection[Host]]:
        """Only the hosts below their capacity, while there is one (else all: the queue let
        this request through, or it is a retry); an affine target that is full is passed over
        like a held one. A pin goes to its host whatever its load."""
        roomy = capacity.room(self.model, pool)
        if not roomy:
            return pool, exclude
        decision = self.decision
        if decision is not None and (target := decision.target) is not None:
            if not decision.pinned and not capacity.has_room(target, self.model):
                exclude = [*exclude, target]
        return roomy, exclude

    def _resume(self) -> Host | None:
        """The host the last `wait` was for, unless it was held again since or left rotation.
        Judged at the end of the hold waited for, not by the clock: a sleep that wakes a hair
        early must not lose the host it waited for."""
        host, self._due = self._due, None
        if host is None or host.held_until > self._due_until:
            return self._pick()  # held again: none now, or another host while one is free
        decision = self.decision
        if (decision is None or not decision.pinned) and not host.routable_at(self._due_until):
            return self._pick()
        return host

    def hold(self, host: Host, seconds: float, now: float) -> None:
        """`host` sent Retry-After: it takes no new request for `seconds` from `now` (the caller
        bounds them by upstream.retry_after_max_s). A later hold never shortens an earlier one."""
        until = now + seconds
        if seconds > 0 and until > host.held_until:
            host.held_until = until

    def wait(self, now: float, limit_s: float) -> float | None:
        """After `next` returned None: how long until a held host of the model takes requests
        again (the soonest), if this request may still wait that long (`limit_s` in all, less
        what it `waited`) and the retry after it would be allowed; else None (it fails). Counts
        the wait; the next `next` names that host."""
        if self.denied or (self.tried and not self._free and not self.budget.peek()):
            return None
        host = self._soonest_held(now)
        if host is None:
            return None
        delay = host.held_until - now
        if delay > limit_s - self.waited:
            return None
        self.waited += delay
        self._due, self._due_until = host, host.held_until
        return delay

    def _soonest_held(self, now: float) -> Host | None:
        """The held host whose hold ends first and that takes requests then: the model's hosts
        routable once their hold ends, or the pinned host alone (a pin skips health)."""
        decision = self.decision
        if decision is not None and decision.pinned:
            target = decision.target
            return target if target is not None and target.held_until > now else None
        soonest: Host | None = None
        for host in self.hosts:
            until = host.held_until
            if until > now and host.routable_at(until):
                if soonest is None or until < soonest.held_until:
                    soonest = host
        return soonest

    def others_left(self) -> bool:
        """Should the attempt in flight fail, could another host take the request: one not tried
        yet, up and not held, or the early trial, with a retry left in the budget (peeked, not
        spent)? Never for a pin. A held host does not count: it is waited for only when nothing
        else is left. (The caller's own bound, upstream.max_attempts, is the caller's.)"""
        decision = self.decision
        if decision is not None and decision.pinned:
            return False
        tried, hosts = self.tried, self.hosts
        for host in hosts:  # the common case: a host up and free, found without the clock
            if host.state == UP and not host.held_until and host not in tried:
                return self.budget.peek()
        if candidates(self.model, hosts, tried):
            return self.budget.peek()
        if not self._trialled and fallback(hosts, tried) is not None:
            return self.budget.peek()
        return False

    def failed(self, host: Host, reason: str, free: bool = False) -> None:
        """An attempt on `host` failed; `free`: it sent nothing, so the next is no retry."""
        self.reasons.append(f"{host.url}: {reason}")
        self._free = free

    def hedge(self) -> Host | None:
        """A second host to race the first attempt with (balance.hedge_host), counted as tried."""
        if self.decision is None:
            return None
        host = self.balancer.hedge_host(self.hosts, self.tried, self.decision)
        if host is not None:
            self.tried.append(host)
        return host

    def unavailable(self) -> Unavailable:
        """The 503 naming every server: why each tried one failed, why the others were not."""
        note = "not tried: the retry budget is spent" if self.denied else "not tried"
        now = time.monotonic()
        untried = [h for h in self.hosts if h not in self.tried]
        lines = self.reasons + [
            f"{h.url}: {note if h.state == UP and h.held_until <= now else why(h, now)}"
            for h in untried
        ]
        if not lines:
            failed = Unavailable(f"No server is available for model '{self.model}'.")
        else:
            text = "\n".join(f"- {line}" for line in lines)
            failed = Unavailable(f"All servers failed for this model '{self.model}':\n{text}")
        failed.attempts = len(self.tried)
        return failed

    def __repr__(self) -> str:
        return (
            f"<Plan {self.model} tried={len(self.tried)} of {len(self.hosts)} "
            f"waited={self.waited:.1f}>"
        )

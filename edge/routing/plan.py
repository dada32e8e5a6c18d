"""Which host each attempt of one request goes to, and why the request failed when none is left.

Theory of operation: the first attempt goes where the request's `Decision` points (a pin, the
affinity target) or by policy; each retry goes by policy among the hosts that are routable, of the
best probe rank, and not tried yet (`health.candidates`). When no host of the model is routable,
one host out of rotation gets an early half-open trial (`health.fallback`, once per request,
never past a pin), so that a model whose every host is out is tried rather than refused. A retry
must be paid for from the retry budget, which keeps a failing fleet from multiplying its load;
a move off a host whose connection pool was full put no load on anyone and is free.

A plan is synchronous and does no I/O: the proxy (edge/proxy/forward.py) runs the attempts it
names, and a client library can run it the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

from edge.errors import Unavailable
from edge.routing.balance import Balancer, Decision
from edge.routing.fleet import UP, Host
from edge.routing.health import RetryBudget, candidates, fallback, why


class Plan:
    """The hosts one request tries, in order, and the reasons each one failed."""

    __slots__ = (
        "model", "hosts", "decision", "balancer", "budget", "tried", "reasons", "denied",
        "_trialled", "_free",
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
        self._trialled = False
        self._free = False  # the last attempt sent nothing (a full pool): the next is no retry
        budget.deposit()

    def next(self) -> Host | None:
        """The host for the next attempt, or None when the request has no attempt left."""
        decision = self.decision
        host = self.balancer.pick(
            candidates(self.model, self.hosts, self.tried), self.tried, decision
        )
        if host is None and not self._trialled and not (decision and decision.pinned):
            host = fallback(self.hosts, self.tried)
            self._trialled = host is not None
        if host is None:
            return None
        if self.tried and not self._free and not self.budget.withdraw():
            self.denied = True
            return None
        self.tried.append(host)
        return host

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
        untried = [h for h in self.hosts if h not in self.tried]
        lines = self.reasons + [f"{h.url}: {note if h.state == UP else why(h)}" for h in untried]
        if not lines:
            failed = Unavailable(f"No server is available for model '{self.model}'.")
        else:
            text = "\n".join(f"- {line}" for line in lines)
            failed = Unavailable(f"All servers failed for this model '{self.model}':\n{text}")
        failed.attempts = len(self.tried)
        return failed

    def __repr__(self) -> str:
        return f"<Plan {self.model} tried={len(self.tried)} of {len(self.hosts)}>"

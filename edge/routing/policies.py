"""The routing policies: which host, among those an attempt may use, gets it.

`Picker.pick` runs per attempt on a pool that is already routable and not yet tried (health's
`candidates`, and the balancer's exclusions): it weighs, it never filters for health.

- latency: power of two choices, cost = Peak-EWMA time to first byte x (in flight + 1 + the
  engine's own queue), as linkerd2-proxy and Finagle do (see stats.py for the score);
- throughput: power of two choices on measured decode rate per unit of load;
- least_inflight (a rotating start breaks ties), round_robin (a cursor per model), random;
- price: the cheapest configured servers only (`tier`), then latency among them.

The state a policy keeps (the random source, the round-robin cursors, least_inflight's start) is
one worker's, so the picks of a seeded `Picker` are reproducible.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from edge.routing.fleet import Host

NEUTRAL_TTFB_S: Final = 1.0  # the score of a fleet nobody has measured yet: only ratios matter


class Picker:
    """The policies of one worker, and the little state they keep between picks."""

    __slots__ = ("rng", "clock", "decay_s", "_cursors", "_tie")

    def __init__(self, rng: random.Random, clock: Callable[[], float], decay_s: float) -> None:
        self.rng = rng
        self.clock = clock
        self.decay_s = decay_s  # how fast a score drifts back to neutral (routing.decay_s)
        self._cursors: dict[str, int] = {}  # round robin, per model
        self._tie = 0  # least_inflight's rotating start

    def pick(
        self, policy: str, pool: Sequence[Host], model: str, prices: Mapping[str, float]
    ) -> Host:
        """The host `policy` chooses from `pool` (not empty)."""
        if policy == "latency":
            return self.latency(pool)
        if policy == "price":
            return self.latency(tier(pool, prices))
        if policy == "least_inflight":
            return self.least(pool)
        if policy == "round_robin":
            return self.round_robin(pool, model)
        if policy == "random":
            return pool[self.rng.randrange(len(pool))]
        return self.throughput(pool)

    def latency(self, pool: Sequence[Host]) -> Host:
        if len(pool) == 1:
            return pool[0]
        now, decay = self.clock(), self.decay_s
        neutral = median([h.stats.ttfb_ewma for h in pool if h.stats.samples]) or NEUTRAL_TTFB_S
        a, b = self._two(pool)
        return a if cost(a, now, neutral, decay) <= cost(b, now, neutral, decay) else b

    def throughput(self, pool: Sequence[Host]) -> Host:
        rates = [h.stats.rate_ewma for h in pool if h.stats.rate_samples]
        if len(pool) == 1 or not rates:
            return self.latency(pool)  # nothing measured yet: fastest to answer instead
        now, decay, neutral = self.clock(), self.decay_s, median(rates)
        a, b = self._two(pool)
        value_a = a.stats.rate(now, neutral, decay) / (load(a) + 1 + a.stats.queue(now))
        value_b = b.stats.rate(now, neutral, decay) / (load(b) + 1 + b.stats.queue(now))
        return a if value_a >= value_b else b

    def least(self, pool: Sequence[Host]) -> Host:
        # The rotating start breaks ties, so idle hosts share light traffic evenly.
        now = self.clock()
        start = self._tie = (self._tie + 1) % len(pool)
        best, best_load = pool[start], math.inf
        for i in range(len(pool)):
            host = pool[(start + i) % len(pool)]
            value = load(host) + host.stats.queue(now)
            if value < best_load:
                best, best_load = host, value
        return best

    def round_robin(self, pool: Sequence[Host], model: str) -> Host:
        cursor = self._cursors[model] = (self._cursors.get(model, -1) + 1) % len(pool)
        return pool[cursor]

    def _two(self, pool: Sequence[Host]) -> tuple[Host, Host]:
        i = self.rng.randrange(len(pool))
        j = self.rng.randrange(len(pool) - 1)
        return pool[i], pool[j + (j >= i)]

    def __repr__(self) -> str:
        return f"<Picker decay={self.decay_s}s cursors={len(self._cursors)}>"


def tier(pool: Sequence[Host], prices: Mapping[str, float]) -> Sequence[Host]:
    """The cheapest servers of `pool` by configured price (unpriced ones cost infinity, so they
    are used only when no priced one is left); `pool` itself when no price is configured."""
    if not prices or not pool:
        return pool
    cheapest = min(prices.get(h.url, math.inf) for h in pool)
    return [h for h in pool if prices.get(h.url, math.inf) == cheapest]


def load(host: Host) -> int:
    """Attempts in flight on `host` in this worker and (shared memory, approximate) the others."""
    return host.inflight + host.stats.remote_inflight


def cost(host: Host, now: float, neutral: float, decay_s: float) -> float:
    """Peak-EWMA cost: the TTFB score (or the wait of an attempt stuck without a first byte,
    whichever is larger) times the load an arrival would join."""
    stats = host.stats
    ttfb = max(stats.score(now, neutral, decay_s), stats.waited(now))
    return ttfb * (load(host) + 1 + stats.queue(now))


def median(values: list[float]) -> float:
    """The neutral score: a typical host's. A median, so one penalised host does not drag the
    neutral value (and with it its own way back) up to its penalty. Sorts `values` in place."""
    if not values:
        return 0.0
    values.sort()
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

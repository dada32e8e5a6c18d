"""Hedging: when a second host may race an attempt that is slow for its host, and how often.

An attempt on a model with hedging on waits `delay(host)` for its first byte (the host's recent
p95 time to first byte, see HostStats.p95, and never less than `hedge_min_delay_s`); when none
came, the forwarder asks the balancer for a second host, and the first to answer wins. A host
without enough samples for a p95 is not hedged yet; a consistently slow host is not hedged at
all (its p95 is its usual): the policy sends it less instead.

The budget is a token bucket: each request on a hedged model earns `hedge_budget` of a token
(capped, so a quiet spell cannot save up a burst), each hedge spends one. Hedges therefore stay
below that share of requests, so a slow fleet is not loaded further by its own hedges.
"""

from __future__ import annotations

from edge.config import RoutingSettings
from edge.routing.fleet import Host


class HedgeBudget:
    """The hedge token bucket of one worker, and the delay before a hedge."""

    __slots__ = ("tokens", "hedges", "_rate", "_cap", "_min_delay_s")

    def __init__(self, settings: RoutingSettings) -> None:
        self.tokens = 0.0
        self.hedges = 0  # hedges sent
        self.configure(settings)

    def configure(self, settings: RoutingSettings) -> None:
        """New settings (SIGHUP); the tokens earned so far are kept."""
        self._rate = settings.hedge_budget
        self._cap = max(1.0, 100 * settings.hedge_budget)
        self._min_delay_s = settings.hedge_min_delay_s

    def earn(self) -> None:
        """One request on a hedged model."""
        self.tokens = min(self.tokens + self._rate, self._cap)

    def delay(self, host: Host) -> float | None:
        """How long to wait for `host`'s first byte before hedging; None: do not hedge."""
        p95 = host.stats.p95()
        if p95 is None:
            return None
        return max(p95, self._min_delay_s)

    def ready(self) -> bool:
        """A hedge may go now (then `spend` once a host for it is found)."""
        return self.tokens >= 1.0

    def spend(self) -> None:
        self.tokens -= 1.0
        self.hedges += 1

    def __repr__(self) -> str:
        return f"<HedgeBudget tokens={self.tokens:.2f} hedges={self.hedges}>"

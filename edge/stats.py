"""Per-host routing statistics, fed by one observation per attempt (via metrics.py).

Only what the balancer reads lives here; Prometheus keeps its own histograms.
"""

from __future__ import annotations

import time

# A failed attempt counts as this much latency, so that a host answering 5xx in 1 ms does not
# look like the fastest host in the fleet.
FAILURE_PENALTY_S = 5.0


class HostStats:
    """An exponentially weighted moving average of time to first byte (seconds)."""

    __slots__ = ("ttfb_ewma", "updated", "samples")

    def __init__(self) -> None:
        self.ttfb_ewma = 0.0
        self.updated = time.monotonic()
        self.samples = 0

    def record(self, ttfb_s: float | None, failed: bool, now: float) -> None:
        value = FAILURE_PENALTY_S if failed else ttfb_s
        if value is None:
            return
        if self.samples == 0:
            self.ttfb_ewma = value
        else:
            self.ttfb_ewma += 0.3 * (value - self.ttfb_ewma)
        self.samples += 1
        self.updated = now

    def __repr__(self) -> str:
        return f"<HostStats ttfb_ewma={self.ttfb_ewma:.4f} samples={self.samples}>"

"""Per-key usage for Prometheus: requests, tokens and cost by key id, workspace and model.

As in `edge/observe/metrics.py`, the hot path only adds to plain dicts keyed by label tuples (one
worker, one loop: no locks) and the families are built at scrape time by this collector, registered
on the worker's `Metrics.registry` (so they are also shared across `--workers`).

Label sets stay bounded: a key id is only ever a label for a key found in the store, and a model
only for one the fleet serves (an unknown model is answered 404 before usage is counted). The
Redis state (reachability, fail-open admissions, lost settlements) is read from its owner at
scrape time too, costing nothing per request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.observe.record import Usage

Counts = dict[tuple[str, ...], float]


def price_table(prices: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """model -> (prompt, completion) price per token, from config's price per million tokens."""
    return {model: (float(p[0]) / 1e6, float(p[1]) / 1e6) for model, p in prices.items()}


class UsageMeter(Collector):
    def __init__(
        self,
        prices: Mapping[str, Any],
        redis_state: Callable[[], tuple[bool, int, int, int]] | None = None,
    ) -> None:
        self.prices = price_table(prices)
        # -> (Redis up, Redis failures, fail-open admissions, lost settlements)
        self._redis_state = redis_state
        self.requests: Counts = {}  # (code, key, model, workspace)
        self.tokens: Counts = {}  # (key, model, type, workspace)
        self.cost: Counts = {}  # (key, model, workspace)
        self.denials: Counts = {}  # (reason,)

    def record(
        self, key_id: str, workspace: str, model: str, status: int, usage: Usage | None
    ) -> None:
        _add(self.requests, (f"{status // 100}xx", key_id, model, workspace), 1)
        if usage is None:
            return
        _add(self.tokens, (key_id, model, "prompt", workspace), usage.prompt_tokens)
        _add(self.tokens, (key_id, model, "completion", workspace), usage.completion_tokens)
        cost = self.cost_of(model, usage)
        if cost is not None:
            _add(self.cost, (key_id, model, workspace), cost)

    def cost_of(self, model: str, usage: Usage) -> float | None:
        """The configured price of `usage` on `model` (None when the model has no price)."""
        price = self.prices.get(model)
        if price is None:
            return None
        return usage.prompt_tokens * price[0] + usage.completion_tokens * price[1]

    def denied(self, reason: str) -> None:
        _add(self.denials, (reason,), 1)

    def collect(self) -> Iterable[Metric]:
        yield _family(
            "edge_key_requests", "Requests per API key, model and workspace, by status class.",
            ("code", "key", "model", "workspace"), self.requests,
        )  # fmt: skip
        yield _family(
            "edge_key_tokens", "Tokens per API key, model and workspace, by type.",
            ("key", "model", "type", "workspace"), self.tokens,
        )  # fmt: skip
        yield _family(
            "edge_key_cost", "Cost from the configured prices, per API key, model and workspace.",
            ("key", "model", "workspace"), self.cost,
        )  # fmt: skip
        yield _family(
            "edge_auth_denied", "Requests refused at the door, by reason.", ("reason",),
            self.denials,
        )  # fmt: skip
        if self._redis_state is not None:
            yield from _redis_families(*self._redis_state())

    def __repr__(self) -> str:
        return f"<UsageMeter series={len(self.requests)} denied={sum(self.denials.values()):.0f}>"


def _add(counts: Counts, key: tuple[str, ...], amount: float) -> None:
    counts[key] = counts.get(key, 0.0) + amount


def _family(name: str, doc: str, labels: tuple[str, ...], counts: Counts) -> Metric:
    fam = CounterMetricFamily(name, doc, labels=labels)
    for key, value in counts.items():
        fam.add_metric(key, value)
    return fam


def _redis_families(up: bool, failures: int, degraded: int, lost: int) -> Iterable[Metric]:
    gauge = GaugeMetricFamily("edge_redis_up", "1 while the last Redis call succeeded.")
    gauge.add_metric([], 1.0 if up else 0.0)
    yield gauge
    for name, doc, value in (
        ("edge_redis_failures", "Redis calls that failed or timed out.", failures),
        ("edge_ratelimit_fail_open", "Requests admitted on local limits, Redis down.", degraded),
        ("edge_ratelimit_settle_lost", "Settlements (tokens, leases) Redis missed.", lost),
    ):
        fam = CounterMetricFamily(name, doc)
        fam.add_metric([], value)
        yield fam

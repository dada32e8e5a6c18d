"""The Prometheus families the edge exports from its own counts, and the per-request bundle
they are projected from at scrape time (edge/observe/metrics.py explains why: one dict lookup per
request instead of one locked update per family)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

# Not Final, though read per request: compiled, a Final tuple of floats read inside a
# method raised "value for final name was not set" (mypyc 2.0).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip
# The edge's own time per request is sub-millisecond when all is well.
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
RATE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 500.0)


class Counter:
    """A counter family: label tuple -> value."""

    __slots__ = ("name", "doc", "labels", "values")

    def __init__(self, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        values = self.values
        values[key] = values.get(key, 0.0) + amount

    def family(self, zeros: Iterable[tuple[str, ...]] = ()) -> Metric:
        """The family, with a zero sample for each key in `zeros` not yet counted: a series that
        exists from the start makes `rate()` see its first increase."""
        fam = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for key in zeros:
            if key not in self.values:
                fam.add_metric(key, 0.0)
        for key, value in self.values.items():
            fam.add_metric(key, value)
        return fam

    def __repr__(self) -> str:
        return f"<Counter {self.name} series={len(self.values)}>"


class Histogram:
    """A histogram family: label tuple -> [count per bucket..., count above the last, sum]."""

    __slots__ = ("name", "doc", "labels", "bounds", "_les", "values")

    def __init__(
        self, name: str, doc: str, labels: tuple[str, ...], bounds: tuple[float, ...]
    ) -> None:
        self.name, self.doc, self.labels, self.bounds = name, doc, labels, bounds
        self._les = [le_label(b) for b in bounds] + ["+Inf"]
        self.values: dict[tuple[str, ...], list[float]] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        cells = self.values.get(key)
        if cells is None:
            cells = self.values[key] = new_cells(self.bounds)
        put(cells, self.bounds, value)

    def add(self, key: tuple[str, ...], cells: list[float]) -> None:
        """Add the counts of another series (scrape time); a series that counted nothing is
        left out rather than exported as an all-zero histogram."""
        if not any(cells[:-1]):
            return
        mine = self.values.get(key)
        if mine is None:
            self.values[key] = list(cells)
        else:
            self.values[key] = [a + b for a, b in zip(mine, cells, strict=True)]

    def family(self) -> Metric:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for key, cells in self.values.items():
            running = 0.0
            buckets = []
            for le, count in zip(self._les, cells, strict=False):
                running += count
                buckets.append((le, running))
            fam.add_metric(key, buckets, cells[-1])
        return fam

    def __repr__(self) -> str:
        return f"<Histogram {self.name} series={len(self.values)}>"


def new_cells(bounds: tuple[float, ...]) -> list[float]:
    """[count per bucket..., count above the last bound, sum]."""
    return [0.0] * (len(bounds) + 2)


def put(cells: list[float], bounds: tuple[float, ...], value: float) -> None:
    cells[bisect_left(bounds, value)] += 1.0  # the first bucket whose bound >= value
    cells[-1] += value


class Requests:
    """Everything counted for the requests sharing one (model, route, server, status class).

    The hot path pays one dict lookup per request for all of it, instead of one per family;
    the families, each with its own labels, are projected from these at scrape time.
    """

    __slots__ = (
        "count", "bytes_in", "bytes_out", "prompt", "completion", "retries", "failovers",
        "disconnects", "affinity", "duration", "overhead", "ttfb", "stream", "decode",
    )  # fmt: skip

    def __init__(self) -> None:
        self.count = self.bytes_in = self.bytes_out = self.prompt = self.completion = 0
        self.retries = self.failovers = self.disconnects = 0
        self.affinity: dict[str, int] = {}
        self.duration = new_cells(LATENCY_BUCKETS)
        self.overhead = new_cells(OVERHEAD_BUCKETS)
        self.ttfb = new_cells(LATENCY_BUCKETS)
        self.stream = new_cells(LATENCY_BUCKETS)
        self.decode = new_cells(RATE_BUCKETS)

    def __repr__(self) -> str:
        return f"<Requests count={self.count}>"


class Families:
    """Every family the edge exports from its own observations. Those about requests are
    projected from the `Requests` bundles at scrape time (`project`); the others (attempts and
    events from other modules) count as they happen."""

    def __init__(self) -> None:
        c, h = Counter, Histogram
        self.requests = c(
            "edge_requests", "Requests answered, by model, serving server, route and status class.",
            ("code", "model", "route", "server"),
        )  # fmt: skip
        self.duration = h(
            "edge_request_duration_seconds", "Time from request arrival to its last byte sent.",
            ("model", "route", "server"), LATENCY_BUCKETS,
        )  # fmt: skip
        self.ttfb = h(
            "edge_time_to_first_byte_seconds",
            "Time from request arrival to the first body byte sent (an SSE stream's first event), "
            "retries included: the time to first token a streaming client sees.",
            ("model", "server"), LATENCY_BUCKETS,
        )  # fmt: skip
        self.stream = h(
            "edge_stream_duration_seconds", "Time from the upstream's first body byte to its last.",
            ("model", "server"), LATENCY_BUCKETS,
        )  # fmt: skip
        self.overhead = h(
            "edge_overhead_seconds",
            "Time each request spent in the edge itself: total minus time waiting on upstreams.",
            ("route",), OVERHEAD_BUCKETS,
        )  # fmt: skip
        self.bytes_in = c("edge_request_bytes", "Request body bytes received.", ("model", "route"))
        self.bytes_out = c(
            "edge_response_bytes", "Response body bytes relayed from upstreams.", ("model", "route")
        )
        self.tokens = c(
            "edge_tokens", "Tokens from upstream usage, by type (prompt, completion).",
            ("model", "type"),
        )  # fmt: skip
        self.decode = h(
            "edge_decode_rate_tokens_per_second",
            "Completion tokens per second after the first byte, per streamed request.",
            ("model", "server"), RATE_BUCKETS,
        )  # fmt: skip
        self.attempts = c(
            "edge_upstream_attempts", "Attempts on upstream servers, by outcome.",
            ("model", "outcome", "server"),
        )  # fmt: skip
        self._init_routing()

    def _init_routing(self) -> None:
        c = Counter
        self.retries = c("edge_retries", "Attempts after a request's first.", ("model",))
        self.failovers = c(
            "edge_failovers", "Requests answered by a server other than the first tried.",
            ("model",),
        )  # fmt: skip
        self.budget = c(
            "edge_retry_budget_exhausted", "Retries refused because the retry budget was spent.",
            ("model",),
        )  # fmt: skip
        self.disconnects = c(
            "edge_client_disconnects", "Requests the client abandoned before the end.", ("model",)
        )
        self.ejections = c(
            "edge_ejections", "Times a server was taken out of rotation.", ("server",)
        )
        self.affinity = c(
            "edge_affinity",
            "Routed requests by affinity result (cookie_hit, key_hit, moved, none).",
            ("model", "result"),
        )  # fmt: skip
        self.translated = c(
            "edge_translated_requests",
            "Requests sent to a server in OpenAI's dialect, translated from the client's.",
            ("from", "to"),
        )  # fmt: skip
        self.continuations = c(
            "edge_continuations",
            "Streams broken after their first byte and continued on another server, by outcome "
            "(ok: the continuation opened; failed: none did; refused: not continuable).",
            ("model", "outcome"),
        )  # fmt: skip
        self.fallbacks = c(
            "edge_model_fallbacks",
            "Requests moved to a fallback model, by reason (unavailable, context_length).",
            ("model", "to", "reason"),
        )  # fmt: skip
        self.held = c(
            "edge_retry_after_holds",
            "Times a server was held out of routing for the Retry-After it sent with a 429 or 503.",
            ("server",),
        )  # fmt: skip
        self.discovery = c(
            "edge_discovery_refreshes", "Discovery source reads, by outcome (ok, error).",
            ("outcome",),
        )  # fmt: skip

    def by_model(self) -> tuple[Counter, ...]:
        """Counters with one zero series per known model until they count something."""
        return (self.retries, self.failovers, self.budget, self.disconnects)

    def counters(self) -> tuple[Counter, ...]:
        return (
            self.requests, self.attempts, self.tokens, self.bytes_in, self.bytes_out,
            self.ejections, self.affinity, self.discovery, self.translated, self.continuations,
            self.fallbacks, self.held, *self.by_model(),
        )  # fmt: skip

    def histograms(self) -> tuple[Histogram, ...]:
        return (self.duration, self.ttfb, self.stream, self.overhead, self.decode)

    def project(self, requests: dict[tuple[str, str, str, str], Requests]) -> None:
        counters = (
            self.requests, self.bytes_in, self.bytes_out, self.tokens, self.retries,
            self.failovers, self.disconnects, self.affinity,
        )  # fmt: skip
        for counter in counters:
            counter.values.clear()
        for histogram in self.histograms():
            histogram.values.clear()
        for (model, route, server, code), r in requests.items():
            self.requests.inc((code, model, route, server), r.count)
            self.bytes_in.inc((model, route), r.bytes_in)
            self.bytes_out.inc((model, route), r.bytes_out)
            for kind, tokens in (("prompt", r.prompt), ("completion", r.completion)):
                if tokens:
                    self.tokens.inc((model, kind), tokens)
            for counter, value in (
                (self.retries, r.retries), (self.failovers, r.failovers),
                (self.disconnects, r.disconnects),
            ):  # fmt: skip
                if value:
                    counter.inc((model,), value)
            for result, count in r.affinity.items():
                self.affinity.inc((model, result), count)
            self.duration.add((model, route, server), r.duration)
            self.overhead.add((route,), r.overhead)
            self.ttfb.add((model, server), r.ttfb)
            self.stream.add((model, server), r.stream)
            self.decode.add((model, server), r.decode)


def le_label(bound: float) -> str:
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return text

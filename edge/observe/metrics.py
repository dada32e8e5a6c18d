"""Prometheus families for one worker: each ended attempt (`attempted`, the same report routing
reads, edge/routing/attempt.py) and each answered request (`finished`, edge/observe/record.py).

Theory of operation. The hot path pays one dict lookup per request: everything about the requests
that share (model, route, server, status class) accumulates in one `Requests` bundle of plain
numbers, updated without locks because everything of one worker runs on one event loop; each
family, with its own labels, is projected from the bundles at scrape time. prometheus-client's
metric objects take a lock per `inc`/`observe` and cost several times more
(loadtests/metrics_cost.py measures both), so they are used only at scrape time, for the text
format. Label names are in alphabetical order, as Prometheus stores them, and every label value is
bounded: models and servers the fleet names, or the fixed sets below; a model name the edge does
not serve is never a label.

Gauges that mirror live state (in-flight, health, routing score, servers known) are read from
the fleet at scrape time and cost nothing per request.

With `--workers N` each worker writes all of its samples (its own and any family another module
registered in `registry`) to `shared_dir` every `share_interval_s`, and again each time it answers
a scrape, and `/metrics` on any worker merges them (edge/observe/metricshare.py). Writing before
answering keeps every total monotonic whichever worker the next scrape reaches. Routing statistics
stay per worker: nothing read back from these files ever reaches the balancer.
"""

from __future__ import annotations

import asyncio
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from edge.config import MetricsSettings
from edge.observe.families import (
    LATENCY_BUCKETS,
    OVERHEAD_BUCKETS,
    RATE_BUCKETS,
    Families,
    Requests,
    put,
)  # fmt: skip
from edge.observe.metricshare import Shared
from edge.observe.record import RequestRecord
from edge.routing.attempt import Attempt
from edge.routing.fleet import Fleet, Host

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNKNOWN_MODEL = "(unknown)"  # a request that named no model the edge serves
NO_SERVER: Final = "(none)"  # a request answered by the edge itself (no host answered)
AFFINITY_RESULTS: Final = frozenset({"cookie_hit", "key_hit", "moved", "none"})
_CODES: Final = tuple(f"{i}xx" for i in range(10))


# edge_continuations_total's outcomes (edge/proxy/continuation.py).
CONTINUATION_OUTCOMES: Final = ("ok", "failed", "refused")


class Metrics(Collector):
    """Prometheus families for one worker, fed by `observe`; also the worker's registry."""

    def __init__(
        self,
        fleet: Callable[[], Fleet],
        settings: MetricsSettings | None = None,
        *,
        version: str = "0.1.0",
    ) -> None:
        self.settings = settings or MetricsSettings()
        self.enabled = self.settings.enabled
        self._fleet = fleet
        self._version = version
        self.f = Families()
        self._requests: dict[tuple[str, str, str, str], Requests] = {}
        self.observations = 0
        # Other modules may register their own collectors here; they are rendered (and shared
        # over workers) with these.
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._shared = Shared(self.settings.shared_dir) if self.settings.shared_dir else None

    # --- the hot path -------------------------------------------------------------------

    def attempted(self, attempt: Attempt) -> None:
        """An attempt ended (with a verdict: cancelled attempts are not reported)."""
        if self.enabled:
            self.f.attempts.inc((attempt.model or UNKNOWN_MODEL, attempt.outcome, attempt.host.url))

    def finished(self, record: RequestRecord) -> None:
        """A request was answered."""
        if not self.enabled:
            return
        self.observations += 1
        host = record.host
        server = NO_SERVER if host is None else host.url
        self._finished(record.model or UNKNOWN_MODEL, server, record)

    def _finished(self, model: str, server: str, obs: RequestRecord) -> None:
        key = (model, obs.route, server, _CODES[obs.status // 100 % 10])
        r = self._requests.get(key)
        if r is None:
            r = self._requests[key] = Requests()
        r.count += 1
        r.bytes_in += obs.bytes_in
        # Histograms updated inline (as in _put): a function call per family costs as much as
        # the update itself, and this runs for every request.
        duration = obs.duration_s
        cells = r.duration
        cells[bisect_left(LATENCY_BUCKETS, duration)] += 1.0
        cells[-1] += duration
        overhead = duration - obs.upstream_s
        if overhead < 0.0:  # clocks read in a different order on an error path
            overhead = 0.0
        cells = r.overhead
        cells[bisect_left(OVERHEAD_BUCKETS, overhead)] += 1.0
        cells[-1] += overhead
        if obs.attempts > 1:
            r.retries += obs.attempts - 1
        if obs.first_byte_s is not None:
            _answered(r, obs, obs.first_byte_s)
        elif obs.outcome == "client_disconnect":
            r.disconnects += 1

    # --- events from other modules ------------------------------------------------------

    def ejected(self, host: Host) -> None:
        """The health module took `host` out of rotation."""
        self.f.ejections.inc((host.url,))

    def retry_denied(self, model: str) -> None:
        """A retry was refused because the retry budget is spent."""
        self.f.budget.inc((model,))

    def translated(self, dialect: str) -> None:
        """A request in `dialect` went to a server translated to OpenAI's."""
        self.f.translated.inc((dialect, "openai"))

    def continued(self, model: str, outcome: str) -> None:  # one of CONTINUATION_OUTCOMES
        """A stream broke after its first byte: continued ("ok"), or not ("failed": no host
        took it; "refused": it could not be continued)."""
        self.f.continuations.inc((model, outcome))

    def fell_back(self, model: str, to: str, reason: str) -> None:
        """A request for `model` moved to the fallback model `to` ("unavailable",
        "context_length")."""
        self.f.fallbacks.inc((model, to, reason))

    def held(self, host: Host) -> None:
        """`host` sent Retry-After with a 429 or 503: held out of routing for that long."""
        self.f.held.inc((host.url,))

    def discovery_refreshed(self, ok: bool) -> None:
        """One source was read (ok) or failed (error)."""
        self.f.discovery.inc(("ok" if ok else "error",))

    # --- scrape time --------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        yield _build_info(self._version)
        if not self.enabled:
            return
        fleet = self._fleet()
        models = [(m,) for m in fleet.models]
        servers = list(dict.fromkeys((h.url,) for hosts in fleet.models.values() for h in hosts))
        f = self.f
        f.project(self._requests)
        zeros: dict[str, Iterable[tuple[str, ...]]] = {c.name: models for c in f.by_model()}
        zeros[f.ejections.name] = servers
        zeros[f.discovery.name] = [("ok",), ("error",)]
        zeros[f.translated.name] = [("anthropic", "openai"), ("gemini", "openai")]
        zeros[f.continuations.name] = [(m, o) for (m,) in models for o in CONTINUATION_OUTCOMES]
        zeros[f.held.name] = servers
        zeros[f.affinity.name] = [(m, r) for (m,) in models for r in sorted(AFFINITY_RESULTS)]
        for counter in f.counters():
            yield counter.family(zeros.get(counter.name, ()))
        for histogram in f.histograms():
            yield histogram.family()
        yield from self._live(fleet)

    def _live(self, fleet: Fleet) -> Iterator[Metric]:
        inflight = GaugeMetricFamily(
            "edge_inflight_requests", "Attempts in flight per server.", labels=["server"]
        )
        up = GaugeMetricFamily(
            "edge_server_up", "1 when the server takes traffic for the model, 0 when it is out "
            "(with N workers: the share of workers that consider it up).",
            labels=["model", "server"],
        )  # fmt: skip
        score = GaugeMetricFamily(
            "edge_server_score_seconds",
            "The server's routing score: Peak-EWMA of time to first byte (mean over workers).",
            labels=["server"],
        )
        known = GaugeMetricFamily(
            "edge_servers_known", "Servers known per model.", labels=["model"]
        )
        seen: set[str] = set()
        now = time.monotonic()
        for model, hosts in fleet.models.items():
            known.add_metric([model], len(hosts))
            for host in hosts:
                up.add_metric([model, host.url], 1.0 if host.routable_at(now) else 0.0)
                if host.url in seen:
                    continue
                seen.add(host.url)
                inflight.add_metric([host.url], host.inflight)
                if host.stats.samples:
                    score.add_metric([host.url], host.stats.ttfb_ewma)
        return iter((inflight, up, score, known))

    def render(self) -> bytes:
        """The text format: this worker's samples, summed with the other workers' when shared."""
        if self._shared is None:
            return generate_latest(self.registry)
        return generate_latest(self._shared.merged(self.registry.collect()))

    def share(self) -> None:
        """Write this worker's samples for the other workers (a no-op with one worker)."""
        if self._shared is not None:
            self._shared.write(self.registry.collect())

    async def share_forever(self) -> None:
        while self._shared is not None:
            await asyncio.sleep(self.settings.share_interval_s)
            self.share()

    def __repr__(self) -> str:
        series = len(self._requests) + len(self.f.attempts.values)
        shared = " shared" if self._shared is not None else ""
        return f"<Metrics observations={self.observations} series={series}{shared}>"


def _answered(r: Requests, obs: RequestRecord, first_byte_s: float) -> None:
    cells = r.ttfb
    cells[bisect_left(LATENCY_BUCKETS, first_byte_s)] += 1.0
    cells[-1] += first_byte_s
    r.bytes_out += obs.bytes_out
    affinity = obs.affinity if obs.affinity in AFFINITY_RESULTS else "none"
    r.affinity[affinity] = r.affinity.get(affinity, 0) + 1
    if obs.attempts > 1:
        r.failovers += 1
    stream_s = obs.stream_s
    if stream_s is not None:
        cells = r.stream
        cells[bisect_left(LATENCY_BUCKETS, stream_s)] += 1.0
        cells[-1] += stream_s
    usage = obs.usage
    if usage is None:
        return
    r.prompt += usage.prompt_tokens
    r.completion += usage.completion_tokens
    if obs.stream and stream_s is not None and stream_s >= 0.001 and usage.completion_tokens:
        put(r.decode, RATE_BUCKETS, usage.completion_tokens / stream_s)


def _build_info(version: str) -> Metric:
    info = GaugeMetricFamily(
        "edge_build_info", "Always 1; labels name the running build.", labels=["python", "version"]
    )
    info.add_metric([sys.version.split()[0], version], 1.0)
    return info

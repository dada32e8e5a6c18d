"""Load as the engines see it: each server's own Prometheus `/metrics`, read every few seconds.

The edge only knows its own in-flight requests; a server shared with other clients (or other
edges) may have a queue the edge never sees. vLLM, SGLang and llama.cpp publish theirs, and the
balancer adds the queue depth to its load term (balance.py); with `[admission] engine_metrics`
each reading also teaches the host's capacity (admission.py's `Capacity.engine`). Scraping is
optional and chosen per server URL prefix (`routing.scrape`); anything that is not one of the
known formats, or does not answer, changes nothing. A reading expires after three periods, so a
server that stops answering its /metrics does not keep a stale queue forever.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from edge.config import RoutingSettings
from edge.routing.fleet import FleetView, Host

log = logging.getLogger("edge.engines")

_PREFIXES = ("vllm:", "sglang:", "llamacpp:")
_QUEUE = frozenset(
    {"vllm:num_requests_waiting", "sglang:num_queue_reqs", "llamacpp:requests_deferred"}
)
_RUNNING = frozenset(
    {"vllm:num_requests_running", "sglang:num_running_reqs", "llamacpp:requests_processing"}
)
_KV = frozenset(
    {
        "vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc", "sglang:token_usage",
        "llamacpp:kv_cache_usage_ratio",
    }
)  # fmt: skip
_MAX_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What one scrape said: requests queued and running (summed over label sets), and the
    largest KV-cache usage ratio (0..1) reported, if any."""

    queue: float
    running: float
    kv: float | None


def parse_metrics(text: str) -> EngineLoad | None:
    """The load in a Prometheus text exposition, or None when no known engine metric is in it."""
    queue = running = 0.0
    kv: float | None = None
    seen = False
    for line in text.splitlines():
        if not line.startswith(_PREFIXES):
            continue
        name, value = _sample(line)
        if value is None:
            continue
        if name in _QUEUE:
            queue, seen = queue + value, True
        elif name in _RUNNING:
            running, seen = running + value, True
        elif name in _KV:
            kv = value if kv is None else max(kv, value)
    return EngineLoad(queue, running, kv) if seen else None


def _sample(line: str) -> tuple[str, float | None]:
    """(metric name, value) of one sample line: `name{labels} value [timestamp]`."""
    brace = line.find("{")
    if brace >= 0:
        name, rest = line[:brace], line[line.rfind("}") + 1 :]
    else:
        name, _, rest = line.partition(" ")
    fields = rest.split()
    if not fields:
        return name, None
    try:
        value = float(fields[0])
    except ValueError:
        return name, None
    return name, value if math.isfinite(value) and value >= 0 else None


def wanted(url: str, prefixes: tuple[str, ...]) -> bool:
    return any(p == "*" or url.startswith(p) for p in prefixes)


class Scraper:
    """Reads the engines' /metrics for the servers `routing.scrape` names, into HostStats."""

    def __init__(
        self,
        settings: RoutingSettings,
        view: FleetView,
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.view = view
        self.session = session
        self.clock = clock
        self.scrapes = 0
        self.readings = 0  # scrapes that found a known format
        # Admission's hook: each reading, so that an engine's queue teaches a host's capacity
        # (edge/routing/admission.py); None when [admission] engine_metrics is off.
        self.on_reading: Callable[[Host, EngineLoad], None] | None = None

    def targets(self) -> list[Host]:
        prefixes = self.settings.scrape
        unique = {h.url: h for hosts in self.view.fleet.models.values() for h in hosts}
        return [h for url, h in unique.items() if wanted(url, prefixes)]

    async def scrape_once(self) -> int:
        """Scrape every target once, concurrently; returns how many gave a reading."""
        results = await asyncio.gather(*(self._one(h) for h in self.targets()))
        self.scrapes += 1
        found = sum(results)
        self.readings += found
        return found

    async def _one(self, host: Host) -> bool:
        timeout = aiohttp.ClientTimeout(total=self.settings.scrape_timeout_s)
        try:
            async with self.session.get(host.url + "/metrics", timeout=timeout) as resp:
                if resp.status != 200:
                    return False
                body = await resp.content.read(_MAX_BYTES)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.debug("engine metrics of %s unavailable: %s", host.url, exc)
            return False
        reading = parse_metrics(body.decode("utf-8", "replace"))
        if reading is None:
            return False  # not an engine we know: ignored
        stats = host.stats
        stats.engine_queue, stats.engine_running = reading.queue, reading.running
        stats.engine_kv = reading.kv if reading.kv is not None else 0.0
        stats.engine_until = self.clock() + 3 * self.settings.scrape_interval_s
        if self.on_reading is not None:
            self.on_reading(host, reading)
        return True

    async def run(self) -> None:
        """Scrape every `scrape_interval_s`, jittered so that workers do not scrape in step."""
        if not self.settings.scrape:
            return
        while True:
            await self.scrape_once()
            period = self.settings.scrape_interval_s
            await asyncio.sleep(period * random.uniform(0.8, 1.2))

    def __repr__(self) -> str:
        return f"<Scraper targets={len(self.settings.scrape)} scrapes={self.scrapes} " + (
            f"readings={self.readings}>"
        )

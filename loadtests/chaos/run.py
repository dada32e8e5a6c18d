"""The chaos run: start everything, load it, break it phase after phase, measure, drain.

Timeline: a warm-up (not counted), a settle, the start figures of the edge's workers (sockets,
RSS); then the phases, each the same length, under one continuous load; the load stops, a settle,
the end figures; finally a few long streams and SIGTERM: they must finish and the edge exit 0.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from loadtests.chaos.fleet import Edge, Mock, Registry, peers
from loadtests.chaos.load import Load, stream_verdict
from loadtests.chaos.report import SOCKET_SLACK_PER_WORKER, figures
from tests.redis_server import RedisServer

# Hosts and the models each serves: chat-a on four, chat-b on two, solo on h1 alone (so that a
# fault of h1 leaves solo with no host: a 503 is then the right answer).
HOSTS = (
    ("h1", ("chat-a", "chat-b", "solo")),
    ("h2", ("chat-a", "chat-b")),
    ("h3", ("chat-a",)),
    ("h4", ("chat-a",)),
)
# The hosts close idle keep-alive connections after a second (uvicorn, under vLLM: 5 s), so the
# edge's pools hold no idle connection after the settle and its sockets compare start to end.
MOCK_ARGS = ("--ttft-ms", "15", "--chunk-ms", "10", "--tokens", "12", "--keepalive-s", "1")
DRAIN_S = 5.0
# Short enough that a stopped host costs seconds, not minutes.
CONFIG = """\
[server]
drain_timeout_s = {drain_s}
[upstream]
connect_timeout_s = 0.5
first_byte_timeout_s = 2.0
idle_timeout_s = 2.0
[discovery]
sources = ["{registry}"]
refresh_s = 0.5
timeout_s = 0.5
[health]
interval_s = 0.5
timeout_s = 0.5
unhealthy_threshold = 2
[outlier]
consecutive_failures = 3
max_ejection_s = 5.0
"""
KEYS = """\
[auth]
mode = "keys"
redis_url = "{redis}"
failure_policy = "fail_open"
"""
SETTLE_S = 2.5  # > the hosts' keep-alive: the pools' idle connections have closed


@dataclass(frozen=True, slots=True)
class Options:
    duration_s: float = 180.0  # all the phases together
    users: int = 16
    workers: int = 2
    deadline_s: float = 15.0  # a request not over by then is hung (the worst legitimate: ~11 s)
    redis: bool = True  # keys mode, key store and limits in Redis, and the Redis phase
    workdir: Path | None = None  # logs and config; a temporary directory (removed) if None
    seed: int = 1

    @classmethod
    def short(cls, **changes: Any) -> Options:
        return cls(**{"duration_s": 24.0, "users": 6, **changes})


class Chaos:
    """Every process of the run, and the faults as methods: each lasts `seconds` and leaves the
    fleet as it found it."""

    def __init__(self, opts: Options, work: Path) -> None:
        self.opts, self.work = opts, work
        self.hosts = {n: Mock(n, models, MOCK_ARGS, work / f"{n}.log") for n, models in HOSTS}
        self.registry = Registry(list(self.hosts.values()))
        self.redis = RedisServer() if opts.redis else None
        env = {"XDG_CACHE_HOME": str(work / "cache")}  # discovery's cache file, in the workdir
        self.edge = Edge(self.write_config(), opts.workers, work / "edge.log", env)
        self.key = "none"
        self.control: aiohttp.ClientSession | None = None

    def write_config(self) -> Path:
        text = CONFIG.format(drain_s=DRAIN_S, registry=self.registry.url)
        if self.redis is not None:
            text += KEYS.format(redis=self.redis.url)
        path = self.work / "edge.toml"
        path.write_text(text)
        return path

    async def start(self) -> None:
        if self.redis is not None:
            await asyncio.to_thread(self.redis.start)
            self.key = await asyncio.to_thread(_create_key, self.redis.url)
        for host in self.hosts.values():
            host.start()
        await asyncio.gather(*(h.ready(f"{h.url}/health") for h in self.hosts.values()))
        await self.registry.open()
        self.edge.start()
        await self.edge.up()
        self.control = aiohttp.ClientSession()

    async def close(self) -> None:
        self.edge.kill()
        for host in self.hosts.values():
            host.kill()
        await self.registry.close()
        if self.redis is not None:
            self.redis.close()
        if self.control is not None:
            await self.control.close()

    async def fault(self, host: str, **fields: Any) -> None:
        assert self.control is not None
        await self.hosts[host].fault(self.control, **fields)

    # --- the phases ---------------------------------------------------------------------------

    async def quiet(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def kill(self, seconds: float) -> None:
        self.hosts["h2"].kill()
        await asyncio.sleep(seconds)
        await self.hosts["h2"].restart()

    async def hang(self, seconds: float) -> None:
        self.hosts["h3"].signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.hosts["h3"].signal(signal.SIGCONT)

    async def slow(self, seconds: float) -> None:
        await self.fault("h4", ttft_ms=600, chunk_ms=40)
        await asyncio.sleep(seconds)
        await self.fault("h4")

    async def errors(self, seconds: float) -> None:
        await self.fault("h1", status=500, rate=0.7)
        await asyncio.sleep(seconds)
        await self.fault("h1")

    async def cut(self, seconds: float, partial: bool = False) -> None:
        cut = {"cut_after": 3, "partial": partial}
        await asyncio.gather(self.fault("h2", **cut), self.fault("h3", **cut))
        await asyncio.sleep(seconds)
        await asyncio.gather(self.fault("h2"), self.fault("h3"))

    async def cut_chunk(self, seconds: float) -> None:
        await self.cut(seconds, partial=True)

    async def flap(self, seconds: float) -> None:
        modes = ("drop:h4", "ok", "down", "drop:h3", "empty", "ok")
        step = max(0.6, seconds / len(modes))  # each mode outlives a discovery refresh (0.5 s)
        end, i = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            self.registry.mode = modes[i % len(modes)]
            i += 1
            await asyncio.sleep(min(step, max(0.0, end - time.monotonic())))
        self.registry.mode = "ok"

    async def redis_restart(self, seconds: float) -> None:
        if self.redis is None:
            await asyncio.sleep(seconds)
            return
        self.redis.kill()
        await asyncio.sleep(seconds / 3)
        await asyncio.to_thread(self.redis.start)  # empty: the edge keeps the keys it knows
        await asyncio.sleep(seconds * 2 / 3)

    async def sighup(self, seconds: float) -> None:
        for _ in range(2):
            self.edge.signal(signal.SIGHUP)
            await asyncio.sleep(seconds / 2)

    def phases(self) -> list[tuple[str, str, Callable[[float], Awaitable[None]]]]:
        redis = "Redis SIGKILLed, back (empty) a third into the phase"
        return [
            ("quiet", "nothing wrong", self.quiet),
            ("kill", "h2 SIGKILLed, started again at the end", self.kill),
            ("hang", "h3 SIGSTOPped, SIGCONT at the end", self.hang),
            ("slow", "h4: +600 ms to the first token, +40 ms per event", self.slow),
            ("5xx", "h1 answers 500 to 70% of requests", self.errors),
            ("cut", "h2 and h3 drop every stream after 3 events", self.cut),
            (
                "cut-chunk",
                "... with half of the 4th event's chunk sent (died mid-write)",
                self.cut_chunk,
            ),
            ("registry", "registry flaps: drops h4, 503, drops h3, lists nothing", self.flap),
            ("redis", redis if self.redis else "skipped (no Redis)", self.redis_restart),
            ("sighup", "SIGHUP to the edge, twice", self.sighup),
            ("after", "nothing wrong (recovery)", self.quiet),
        ]


def _create_key(url: str) -> str:
    from edge.access.keys import Limits, RedisBackend, create_key

    backend = RedisBackend(url)
    try:
        limits = Limits(rpm=10**6, tpm=10**10, concurrency=10**4)  # admitted, never refused
        return create_key(backend, "chaos", limits=limits)[1]
    finally:
        backend.client.close()


async def sample(chaos: Chaos) -> dict[str, Any]:
    """The workers' sockets (the least of five looks over a second: a health probe's connection
    opened for a moment is not a leak), whom they connect to, and the workers' RSS."""
    edge, counts = chaos.edge, []
    for _ in range(5):
        counts.append(edge.sockets())
        await asyncio.sleep(0.2)
    names = {h.port: h.name for h in chaos.hosts.values()} | {chaos.registry.port: "registry"}
    if chaos.redis is not None:
        names[chaos.redis.port] = "redis"
    pids = edge.worker_pids()
    return {
        "sockets": min(counts), "peers": peers(pids, names, edge.port), "fds": edge.fds(),
        "rss": edge.rss(), "workers": pids,
    }  # fmt: skip


async def drain(edge: Edge, key: str, streams: int = 6) -> dict[str, Any]:
    """Streams of ~1.5 s in flight, then SIGTERM: they finish, the edge exits 0 in time."""
    headers = {"Authorization": f"Bearer {key}", "X-Mock-Chunk-Ms": "150", "X-Mock-Tokens": "10"}
    doc = {"model": "chat-a", "stream": True, "messages": [{"role": "user", "content": "bye"}]}

    async def one(session: aiohttp.ClientSession) -> str:
        try:
            async with session.post(f"{edge.url}/v1/chat/completions", json=doc) as resp:
                if resp.status != 200:
                    return f"status {resp.status}"
                return stream_verdict(await resp.read(), anthropic=False)
        except aiohttp.ClientError as exc:
            return f"connection error ({type(exc).__name__})"

    async with aiohttp.ClientSession(headers=headers) as session:
        tasks = [asyncio.create_task(one(session)) for _ in range(streams)]
        await asyncio.sleep(0.5)
        edge.signal(signal.SIGTERM)
        sent = time.monotonic()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), DRAIN_S + 10)
        code = await edge.wait(DRAIN_S + 10)
    return {"streams": outcomes, "exit_code": code, "seconds": round(time.monotonic() - sent, 2)}


async def continuations(url: str) -> dict[str, int]:
    """edge_continuations_total by outcome, summed over models and workers: streams broken
    after their first byte and continued on another host (ok), or not (failed, refused)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/metrics") as resp:
            text = await resp.text()
    found = {"ok": 0, "failed": 0, "refused": 0}
    for line in text.splitlines():
        if line.startswith("edge_continuations_total{"):
            outcome = line.partition('outcome="')[2].partition('"')[0]
            found[outcome] = found.get(outcome, 0) + int(float(line.rpartition(" ")[2]))
    return found


def scan_log(path: Path) -> dict[str, Any]:
    """Tracebacks and ERROR lines of the edge's log, the messages without their timestamps."""
    text = path.read_text(errors="replace") if path.exists() else ""
    errors = [line.split(" ERROR ", 1)[1] for line in text.splitlines() if " ERROR " in line]
    return {"tracebacks": text.count("Traceback"), "errors": sorted(set(errors))[:10]}


async def run(opts: Options) -> dict[str, Any]:
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="edge-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    chaos = Chaos(opts, work)
    try:
        await chaos.start()
        load = Load(chaos.edge.url, chaos.key, opts.users, opts.deadline_s, opts.seed)
        load.start()
        await asyncio.sleep(2.0)  # warm-up: pools, Redis connections, lazy imports
        await load.stop()
        await asyncio.sleep(SETTLE_S)
        start = await sample(chaos)
        timeline = await _phases(chaos, load, opts.duration_s)
        await load.stop()
        await asyncio.sleep(SETTLE_S)
        end = await sample(chaos)
        continued = await continuations(chaos.edge.url)
        drained = await drain(chaos.edge, chaos.key)
    finally:
        await chaos.close()
    report = figures(load, timeline, start, end, drained, scan_log(chaos.edge.log))
    report["continuations"] = continued
    report["settings"] = {
        "duration_s": opts.duration_s, "users": opts.users, "workers": opts.workers,
        "deadline_s": opts.deadline_s, "keys_mode_redis": opts.redis,
        "socket_slack": SOCKET_SLACK_PER_WORKER * opts.workers, "workdir": str(work),
    }  # fmt: skip
    if opts.workdir is None and report["goals_met"]:
        shutil.rmtree(work, ignore_errors=True)
    return report


async def _phases(chaos: Chaos, load: Load, duration_s: float) -> list[dict[str, Any]]:
    phases = chaos.phases()
    each = duration_s / len(phases)
    timeline = []
    load.start()
    began = time.monotonic()
    for name, what, act in phases:
        load.phase = name
        at = time.monotonic()
        await act(each)
        timeline.append({"phase": name, "fault": what, "at_s": round(at - began, 1),
                         "seconds": round(time.monotonic() - at, 1)})  # fmt: skip
    return timeline

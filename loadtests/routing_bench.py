"""Routing benchmark: client-observed time to first token per policy, and session stickiness.

    .venv/bin/python loadtests/routing_bench.py     # under 2 minutes; prints markdown tables

Four upstreams in one child process, each a small SSE server with its own speed (idle; each
request already running adds 25% to a new request's time to first token, as batching does):

    fast   first token after  50 ms, a token every 15 ms
    mid    first token after 100 ms, a token every  5 ms  (the fastest decoder)
    slow   first token after 400 ms, a token every 10 ms  (the cheapest, for `price`)
    stall  first token after  50 ms, a token every 10 ms, but for 1 s of every 4 s it sends
           nothing (requests arriving then wait for the stall to end)

Each keeps a small "KV cache" of conversations it has served (keyed by the first user message):
a turn of a conversation it has seen starts 3x sooner, as prefix caching does in vLLM/SGLang.

Three `edge serve` processes (one worker each): affinity off; affinity off with hedging; affinity
on. After a 1 s warm-up each, 12 concurrent clients stream chat completions (a new conversation
per request) for `RUN_SECONDS` per policy, the policy chosen per request with X-Edge-Route. Then
multi-turn runs (5 turns per conversation, growing history) measure how often a turn lands on
the server that served the conversation's previous turn: affinity off (round robin, latency),
prefix affinity (no cookies), and the affinity cookie (a cookie-jar client).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench-model"
CONCURRENCY = 12
RUN_SECONDS = float(os.environ.get("ROUTING_BENCH_SECONDS", "8"))  # two stall cycles
TURNS = 5
TOKENS = 20


@dataclass(frozen=True)
class Spec:
    name: str
    ttft_ms: float
    chunk_ms: float
    price: float  # input + output per million tokens
    stall_every_s: float = 0.0
    stall_for_s: float = 0.0


SPECS = (
    Spec("fast", 50, 15, price=3.0),
    Spec("mid", 100, 5, price=1.0),
    Spec("slow", 400, 10, price=0.5),
    Spec("stall", 50, 10, price=1.0, stall_every_s=4.0, stall_for_s=1.0),
)


# --- the upstreams (child process) ------------------------------------------------------------


class Upstream:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.started = time.monotonic()
        self.cache: dict[str, None] = {}  # conversation keys, oldest first (bounded)
        self.inflight = 0

    async def delay(self, key: str) -> None:
        # Prefill shares the engine with the requests already running (batching): +25% each.
        spec, ttft = self.spec, self.spec.ttft_ms / 1000 * (1 + (self.inflight - 1) / 4)
        if spec.stall_every_s:
            phase = (time.monotonic() - self.started) % spec.stall_every_s
            if phase < spec.stall_for_s:
                ttft += spec.stall_for_s - phase
        if key in self.cache:
            ttft /= 3  # the prefix is cached: only the new turn is prefilled
        else:
            self.cache[key] = None
            if len(self.cache) > 10_000:
                del self.cache[next(iter(self.cache))]
        await asyncio.sleep(ttft)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        first_user = next(m["content"] for m in doc["messages"] if m["role"] == "user")
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Mock-Server": self.spec.name}
        )
        await response.prepare(request)
        self.inflight += 1
        try:
            await self.delay(first_user)
            for i in range(TOKENS):
                if i:
                    await asyncio.sleep(self.spec.chunk_ms / 1000)
                delta = {"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
                await response.write(b"data: " + json.dumps(delta).encode() + b"\n\n")
            usage = {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": TOKENS}}
            await response.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            pass  # the edge cancelled this attempt: a hedge won
        finally:
            self.inflight -= 1
        return response

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})


def serve_upstreams(conn: Connection) -> None:
    async def main() -> None:
        runners, ports = [], {}
        for spec in SPECS:
            upstream = Upstream(spec)
            app = web.Application()
            app.router.add_post("/v1/chat/completions", upstream.chat)
            app.router.add_get("/health", upstream.health)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            ports[spec.name] = runner.addresses[0][1]
            runners.append(runner)
        conn.send(ports)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
        for runner in runners:
            await runner.cleanup()

    asyncio.run(main())


# --- the edges (subprocesses) -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Edge:
    proc: subprocess.Popen[bytes]
    url: str


def launch(urls: dict[str, str], routing: str, workdir: Path, index: int) -> Edge:
    """An `edge serve` process with this [routing] table; not waited for (see `ready`)."""
    config = workdir / f"edge-{index}.toml"
    prices = "\n".join(f'"{urls[s.name]}" = {{ input = 0, output = {s.price} }}' for s in SPECS)
    servers = ", ".join(f'"{u}"' for u in urls.values())
    config.write_text(
        f"[routing]\n{routing}\n\n"
        f'[routing.models."{MODEL}".prices]\n{prices}\n\n'
        f'[models."{MODEL}"]\nservers = [{servers}]\n'
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    return Edge(proc, f"http://127.0.0.1:{port}")


def ready(edge: Edge, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(edge.url + "/ready", timeout=1):
                return
        except OSError:
            if edge.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("an edge did not start") from None
            time.sleep(0.05)


def stop(edge: Edge) -> None:
    if edge.proc.poll() is None:
        edge.proc.terminate()
    try:
        edge.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        edge.proc.kill()
        edge.proc.wait(timeout=10)


# --- the clients ------------------------------------------------------------------------------


@dataclass
class Run:
    label: str  # in every prompt: no run meets another run's conversations in a cache
    headers: dict[str, str] = field(default_factory=dict)  # X-Edge-Route, per request
    ttfts: list[float] = field(default_factory=list)
    servers: Counter[str] = field(default_factory=Counter)
    turns: int = 0  # turns after a conversation's first
    same: int = 0  # of those, on the previous turn's server
    errors: int = 0

    def over(self, seconds: float) -> int:
        return sum(t > seconds for t in self.ttfts)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.ttfts)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


async def stream(session: aiohttp.ClientSession, url: str, messages: list[Any], run: Run) -> str:
    """One streamed completion; returns the upstream that answered ("" on an error)."""
    body = {"model": MODEL, "messages": messages, "stream": True, "max_tokens": TOKENS}
    started = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            run.errors += 1
            await resp.read()
            return ""
        first = True
        async for _chunk in resp.content.iter_any():
            if first:
                run.ttfts.append(time.perf_counter() - started)
                first = False
        server = resp.headers.get("X-Mock-Server", "?")
    run.servers[server] += 1
    return server


def opening(run: Run, worker: int, n: int) -> list[Any]:
    return [
        {"role": "system", "content": "You are a benchmark."},
        {"role": "user", "content": f"{run.label}: worker {worker}, conversation {n}"},
    ]


async def single_turns(url: str, run: Run, stop_at: float, worker: int, cookies: bool) -> None:
    jar = aiohttp.DummyCookieJar()
    async with aiohttp.ClientSession(cookie_jar=jar, headers=run.headers) as session:
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            await stream(session, url, opening(run, worker, n), run)


async def conversations(url: str, run: Run, stop_at: float, worker: int, cookies: bool) -> None:
    n = 0
    while time.monotonic() < stop_at:
        n += 1
        jar: aiohttp.abc.AbstractCookieJar = (
            aiohttp.CookieJar(unsafe=True) if cookies else aiohttp.DummyCookieJar()
        )
        async with aiohttp.ClientSession(cookie_jar=jar, headers=run.headers) as session:
            messages, previous = opening(run, worker, n), ""
            for turn in range(TURNS):
                server = await stream(session, url, messages, run)
                if turn and server:
                    run.turns += 1
                    run.same += server == previous
                previous = server
                messages = messages + [
                    {"role": "assistant", "content": "t0 t1 t2"},
                    {"role": "user", "content": f"follow-up {turn}"},
                ]


Client = Callable[[str, Run, float, int, bool], Awaitable[None]]


async def drive(
    url: str,
    label: str,
    client: Client,
    cookies: bool = False,
    policy: str = "",
    seconds: float = 0,
) -> Run:
    run = Run(label, {"X-Edge-Route": policy} if policy else {})
    stop_at = time.monotonic() + (seconds or RUN_SECONDS)
    await asyncio.gather(*(client(url, run, stop_at, w, cookies) for w in range(CONCURRENCY)))
    return run


# --- the report -------------------------------------------------------------------------------


def policy_row(name: str, run: Run) -> str:
    total = sum(run.servers.values()) or 1
    shares = " / ".join(f"{100 * run.servers[s.name] / total:.0f}" for s in SPECS)
    return (
        f"| {name} | {len(run.ttfts)} | {run.percentile(0.5):.0f} | {run.percentile(0.99):.0f} "
        f"| {run.over(0.5)} | {shares} | {run.errors} |"
    )


def sticky_row(name: str, run: Run) -> str:
    share = 100 * run.same / run.turns if run.turns else 0.0
    return (
        f"| {name} | {run.turns} | {share:.1f}% | {run.percentile(0.5):.0f} "
        f"| {run.percentile(0.99):.0f} | {run.errors} |"
    )


# Three edges: policies are chosen per request (X-Edge-Route) on the first two.
EDGES = {
    "plain": 'policy = "latency"\naffinity = false',
    "hedging": 'policy = "latency"\naffinity = false\nhedging = true\nhedge_budget = 0.1',
    "affinity": 'policy = "latency"',
}
POLICY_RUNS = [  # (row, edge, X-Edge-Route)
    *((p, "plain", p) for p in ("round_robin", "random", "least_inflight")),
    *((p, "plain", p) for p in ("latency", "throughput", "price")),
    ("latency + hedging (10% budget)", "hedging", "latency"),
]
STICKY_RUNS = [  # (row, edge, X-Edge-Route, the client keeps cookies)
    ("round robin, affinity off", "plain", "round_robin", False),
    ("latency, affinity off", "plain", "latency", False),
    ("latency + prefix affinity (no cookies)", "affinity", "latency", False),
    ("latency + affinity cookie", "affinity", "latency", True),
]
WARM_UP_S = 1.0
STICKY_SECONDS = 6.0


async def bench(urls: dict[str, str], workdir: Path) -> list[str]:
    # Started together: an edge takes seconds to import and start on a busy machine.
    edges = {name: launch(urls, table, workdir, i) for i, (name, table) in enumerate(EDGES.items())}
    try:
        for edge in edges.values():
            await asyncio.to_thread(ready, edge)
        for name, edge in edges.items():  # statistics to start from, and connections
            await drive(edge.url, f"warm-up {name}", single_turns, seconds=WARM_UP_S)
        return await measure({name: edge.url for name, edge in edges.items()})
    finally:
        for edge in edges.values():
            stop(edge)


async def measure(edges: dict[str, str]) -> list[str]:
    lines = [
        f"Policies: {CONCURRENCY} concurrent streaming clients for {RUN_SECONDS:.0f} s each (two "
        "stall cycles), a new conversation per request, affinity off. TTFT: client-observed, ms.",
        "",
        "| policy | requests | p50 TTFT | p99 TTFT | TTFT > 0.5 s | share % fast / mid / slow "
        "/ stall | errors |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for name, edge, policy in POLICY_RUNS:
        run = await drive(edges[edge], name, single_turns, policy=policy)
        lines.append(policy_row(name, run))
        print(lines[-1], file=sys.stderr, flush=True)
    lines += [
        "",
        f"Stickiness: {CONCURRENCY} concurrent clients, conversations of {TURNS} turns (growing "
        "history); turns 2..5 counted. An upstream answers a conversation it has seen 3x sooner.",
        "",
        "| routing | turns | same server as previous turn | p50 TTFT | p99 TTFT | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, edge, policy, cookies in STICKY_RUNS:
        run = await drive(edges[edge], name, conversations, cookies, policy, STICKY_SECONDS)
        lines.append(sticky_row(name, run))
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main() -> int:
    started = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    upstreams = ctx.Process(target=serve_upstreams, args=(child,), daemon=True)
    upstreams.start()
    try:
        ports = parent.recv()
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        with tempfile.TemporaryDirectory() as tmp:
            lines = asyncio.run(bench(urls, Path(tmp)))
    finally:
        parent.send("stop")
        upstreams.join(timeout=10)
        if upstreams.is_alive():
            upstreams.kill()
    print("\n".join(lines))
    command = f".venv/bin/python {Path(__file__).relative_to(ROOT)}"
    print(f"\n(`{command}` took {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

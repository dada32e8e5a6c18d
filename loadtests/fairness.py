"""Many tenants on one saturated fleet: the light tenant's time to first token, with the edge's
queueing (`[admission]`) and without it (today's behaviour), and the fleet's throughput both ways.

    .venv/bin/python loadtests/fairness.py [--hosts 2] [--slots 16] [--seconds 15]

The fleet: `--hosts` engines with `--slots` slots each (an in-process imitation of vLLM's
scheduler: a request beyond the slots waits in the engine's own FIFO queue; each one then takes
`--ttft-ms` to its first token, then 1 to 2 x `--tokens` tokens `--chunk-ms` apart), in a child
process. The edge runs as `edge serve` (one worker) in front of it, once without [admission]
and once with `servers = {"*" = slots}`. Two tenants, each a workspace (`/api/{id}/v1`): the
heavy one keeps 5x the fleet's slots streaming at once (closed loop), the light one sends at 10%
of the fleet's capacity (open loop, Poisson). Printed: the light tenant's p50/p99 time to first
token unloaded (alone), under load without queueing and with it, and the completed requests per
second.

The bar (issue 20): the light tenant's p99 within 1.5x of its unloaded value with queueing, and
throughput not lower than without it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.procs import free_port, wait_http  # noqa: E402

HEAVY, LIGHT = "a" * 24, "b" * 24
MODEL = "m"


# --- the engines (child process) -------------------------------------------------------------


class Engine:
    """One engine with `slots` slots and a FIFO queue for the requests beyond them."""

    def __init__(self, slots: int, ttft_s: float, chunk_s: float, tokens: int) -> None:
        self.slots = asyncio.Semaphore(slots)
        self.ttft_s, self.chunk_s, self.tokens = ttft_s, chunk_s, tokens

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        async with self.slots:  # asyncio's semaphore wakes waiters first in, first out
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await asyncio.sleep(self.ttft_s)
            # Answers of different lengths (as real ones are): slots free at random moments,
            # not in lockstep batches.
            for i in range(random.randint(1, 2 * self.tokens - 1)):
                delta = {"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
                await response.write(b"data: " + json.dumps(delta).encode() + b"\n\n")
                await asyncio.sleep(self.chunk_s)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})


async def _engines(
    ports: list[int], slots: int, ttft_s: float, chunk_s: float, tokens: int
) -> None:
    runners = []
    for port in ports:
        engine = Engine(slots, ttft_s, chunk_s, tokens)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", engine.chat)
        app.router.add_get("/health", engine.health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for runner in runners:
        await runner.cleanup()


# --- the load --------------------------------------------------------------------------------


async def stream(session: aiohttp.ClientSession, base: str, workspace: str) -> float | None:
    """One streamed request; its time to first token (None: it failed)."""
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    started = time.monotonic()
    url = f"{base}/api/{workspace}/v1/chat/completions"
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            await resp.read()
            return None
        first: float | None = None
        async for _ in resp.content.iter_any():
            if first is None:
                first = time.monotonic() - started
        return first


async def run(base: str, seconds: float, heavy: int, light_rate: float) -> tuple[list[float], int]:
    """The heavy tenant's `heavy` closed loops and the light tenant's Poisson arrivals for
    `seconds`: (the light tenant's TTFTs, requests completed in all)."""
    done = 0
    light: list[float] = []
    end = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def loop() -> None:
            nonlocal done
            while time.monotonic() < end:
                if await stream(session, base, HEAVY) is not None and time.monotonic() < end:
                    done += 1

        async def one() -> None:
            nonlocal done
            ttft = await stream(session, base, LIGHT)
            if ttft is not None:
                light.append(ttft)
                # Throughput counts answers completed within the window only: the requests
                # still in flight at its end (far more without queueing, where the light
                # tenant's pile up in the engines' queues) would otherwise count as done.
                done += time.monotonic() < end

        tasks = [asyncio.create_task(loop()) for _ in range(heavy)]
        singles = []
        while time.monotonic() < end:
            await asyncio.sleep(random.expovariate(light_rate))
            singles.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks, *singles)
    return light, done


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_edge(
    urls: list[str], slots: int, queueing: bool, work: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = work / f"edge-{queueing}.toml"
    servers = json.dumps(urls)
    text = (
        f"[server]\nport = {port}\nworkers = 1\n[health]\nenabled = false\n"
        "[upstream]\nmax_connections_per_server = 4096\n"
        f'[models."{MODEL}"]\nservers = {servers}\n'
    )
    if queueing:
        text += f'[admission]\nservers = {{ "*" = {slots} }}\n'
    config.write_text(text)
    edge = str(Path(sys.executable).with_name("edge"))
    proc = subprocess.Popen([edge, "serve", "--config", str(config)], stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/ready", timeout=30.0, proc=proc)
    return proc, base


async def phase(
    urls: list[str], args: argparse.Namespace, queueing: bool, load: bool, work: Path
) -> tuple[list[float], float]:
    proc, base = start_edge(urls, args.slots + args.headroom, queueing, work)
    try:
        slots = args.hosts * args.slots
        service_s = (args.ttft_ms + args.tokens * args.chunk_ms) / 1000.0
        light_rate = 0.1 * slots / service_s  # 10% of the fleet's capacity
        heavy = 5 * slots if load else 0
        await run(base, 2.0, heavy, light_rate)  # warm up (connections, estimates)
        light, done = await run(base, args.seconds, heavy, light_rate)
        return light, done / args.seconds
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--ttft-ms", type=float, default=200.0)
    parser.add_argument("--chunk-ms", type=float, default=30.0)
    parser.add_argument("--tokens", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=15.0)
    # The edge's capacity per engine above its slots: requests the engine may queue itself.
    parser.add_argument("--headroom", type=int, default=0)
    parser.add_argument("--engines", help=argparse.SUPPRESS)  # the child: ports, comma-separated
    args = parser.parse_args()
    if args.engines:
        ports = [int(p) for p in args.engines.split(",")]
        asyncio.run(
            _engines(ports, args.slots, args.ttft_ms / 1000, args.chunk_ms / 1000, args.tokens)
        )
        return 0
    ports = [free_port() for _ in range(args.hosts)]
    engines = [
        sys.executable, __file__, "--engines", ",".join(map(str, ports)), "--slots",
        str(args.slots), "--ttft-ms", str(args.ttft_ms), "--chunk-ms", str(args.chunk_ms),
        "--tokens", str(args.tokens),
    ]  # fmt: skip
    child = subprocess.Popen(engines)
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for url in urls:
            wait_http(f"{url}/health", timeout=30.0, proc=child)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            results = {}
            for name, queueing, load in (
                ("unloaded", False, False), ("without queueing", False, True),
                ("with queueing", True, True),
            ):  # fmt: skip
                light, rate = asyncio.run(phase(urls, args, queueing, load, work))
                results[name] = (light, rate)
                print(
                    f"{name:>17}: light tenant TTFT p50 {1000 * statistics.median(light):6.0f} ms"
                    f"  p99 {1000 * p(light, 0.99):6.0f} ms  ({len(light)} requests)"
                    f"   fleet throughput {rate:6.1f} req/s",
                    flush=True,
                )
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=30)
    base_p99 = p(results["unloaded"][0], 0.99)
    with_q, without = results["with queueing"], results["without queueing"]
    ratio = p(with_q[0], 0.99) / base_p99
    print(
        f"light p99 with queueing / unloaded: {ratio:.2f}x (bar 1.5x); "
        f"throughput with / without: {with_q[1] / without[1]:.3f} (bar >= 1)"
    )
    return 0 if ratio <= 1.5 and with_q[1] >= 0.98 * without[1] else 1


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark's aiohttp client for what wrk cannot do: a fixed request rate, SSE streams whose
every byte is checked, and thousands of idle open streams. Prints one JSON object.

    python -m loadtests.bench.client rate --url URL --rate 300 --seconds 5
    python -m loadtests.bench.client streams --url URL --streams 50 --chunks 200 --pid P
    python -m loadtests.bench.client held --url URL --streams 1000 --release URL --pid P
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
import uvloop

from loadtests.bench.procfs import cpu_seconds, rss_bytes
from loadtests.bench.upstream import stream_body, stream_tag

JSON_HEADERS = {"Content-Type": "application/json"}
PLAIN_BODY = b'{"model":"bench","messages":[{"role":"user","content":"Say hello."}],"max_tokens":8}'


def stream_request(chunks: int, chunk_ms: float, hold: bool) -> bytes:
    tag = stream_tag(chunks, chunk_ms, hold)
    doc = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": tag}]}
    return json.dumps(doc, separators=(",", ":")).encode()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120),
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent",),
    )


async def fixed_rate(url: str, rate: float, seconds: float) -> dict[str, Any]:
    """Open loop: requests start on schedule whatever the earlier ones are doing."""
    latencies: list[float] = []
    errors: list[str] = []

    async def one(record: bool) -> None:
        started = time.perf_counter()
        try:
            async with http.post(url, data=PLAIN_BODY, headers=JSON_HEADERS) as resp:
                await resp.read()
                if resp.status != 200:
                    errors.append(f"status {resp.status}")
                    return
        except (aiohttp.ClientError, TimeoutError) as exc:
            errors.append(repr(exc))
            return
        if record:
            latencies.append(time.perf_counter() - started)

    gc.disable()  # a collection mid-run would show up as the client's own p99
    async with session(256) as http:
        warm = int(rate * 0.5)
        total = warm + int(rate * seconds)
        tasks: list[asyncio.Task[None]] = []
        start = time.perf_counter()
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i >= warm)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    ms = [x * 1000 for x in latencies]
    return {
        "requests": len(ms), "errors": len(errors), "first_error": errors[:1],
        "rate": round(total / elapsed, 1), "p50_ms": pct(ms, 0.5), "p99_ms": pct(ms, 0.99),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
    }  # fmt: skip


async def read_stream(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, bytes]:
    """(seconds to the first body bytes, the whole body); raises on a non-200 answer."""
    started = time.perf_counter()
    async with http.post(url, data=body, headers=JSON_HEADERS) as resp:
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}: {(await resp.read())[:200]!r}")
        first = await resp.content.readany()
        ttfc = time.perf_counter() - started
        return ttfc, first + await resp.content.read()


async def streams(url: str, n: int, chunks: int, chunk_ms: float, pid: int) -> dict[str, Any]:
    expected, body = stream_body(chunks), stream_request(chunks, chunk_ms, hold=False)
    async with session(0) as http:
        await read_stream(http, url, stream_request(2, 0, False))  # connect, warm
        cpu0, start = cpu_seconds(pid) if pid else 0.0, time.perf_counter()
        results = await asyncio.gather(
            *(read_stream(http, url, body) for _ in range(n)), return_exceptions=True
        )
        wall, cpu = time.perf_counter() - start, (cpu_seconds(pid) - cpu0) if pid else 0.0
    good = [r for r in results if not isinstance(r, BaseException)]
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    ttfc = [t * 1000 for t, _ in good]
    return {
        "streams": n, "completed": len(good), "intact": sum(b == expected for _, b in good),
        "errors": len(errors), "first_error": errors[:1], "chunks": n * chunks,
        "cpu_s": cpu, "wall_s": wall, "ttfc_p50_ms": pct(ttfc, 0.5), "ttfc_p99_ms": pct(ttfc, 0.99),
    }  # fmt: skip


async def held(url: str, n: int, release: str, pid: int, open_timeout: float) -> dict[str, Any]:
    """n streams held open after their first event; memory measured while all are open."""
    expected, body = stream_body(4), stream_request(4, 0, hold=True)
    gate = asyncio.Semaphore(256)  # connections being opened at once: no SYN storm
    settled, all_settled = 0, asyncio.Event()

    def settle() -> None:
        nonlocal settled
        settled += 1
        if settled == n:
            all_settled.set()

    async def one() -> bool:
        try:
            async with gate:
                resp = await http.post(url, data=body, headers=JSON_HEADERS)
                first = await resp.content.readany() if resp.status == 200 else b""
        except (aiohttp.ClientError, TimeoutError):
            settle()
            raise
        settle()
        try:
            return resp.status == 200 and first + await resp.content.read() == expected
        finally:
            resp.release()

    async with session(0) as http:
        rss_idle = rss_bytes(pid)
        tasks = [asyncio.create_task(one()) for _ in range(n)]
        start = time.perf_counter()
        opened_all = await _wait(all_settled.wait(), open_timeout)
        open_s = time.perf_counter() - start
        await asyncio.sleep(0.5)  # let the proxy finish its own per-stream allocations
        rss_open = rss_bytes(pid)
        async with http.get(release) as resp:
            released = (await resp.json())["released"]
        done, pending = await asyncio.wait(tasks, timeout=60)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        completed = sum(1 for t in done if t.exception() is None and t.result())
    return {
        "streams": n, "opened_all": opened_all, "open_s": open_s, "held": released,
        "completed": completed, "rss_idle": rss_idle, "rss_open": rss_open,
        "unfinished": len(pending),
    }  # fmt: skip


async def _wait(waiting: Awaitable[Any], limit_s: float) -> bool:
    try:
        await asyncio.wait_for(waiting, limit_s)
    except TimeoutError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("rate", "streams", "held"):
        p = sub.add_parser(mode)
        p.add_argument("--url", required=True)
        p.add_argument("--pid", type=int, default=0, help="proxy process (tree) to measure")
    sub.choices["rate"].add_argument("--rate", type=float, default=300)
    sub.choices["rate"].add_argument("--seconds", type=float, default=5)
    sub.choices["streams"].add_argument("--streams", type=int, default=50)
    sub.choices["streams"].add_argument("--chunks", type=int, default=200)
    sub.choices["streams"].add_argument("--chunk-ms", type=float, default=5)
    sub.choices["held"].add_argument("--streams", type=int, default=1000)
    sub.choices["held"].add_argument("--release", required=True)
    sub.choices["held"].add_argument("--open-timeout", type=float, default=60)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runs: dict[str, Callable[[], Coroutine[Any, Any, dict[str, Any]]]] = {
        "rate": lambda: fixed_rate(args.url, args.rate, args.seconds),
        "streams": lambda: streams(args.url, args.streams, args.chunks, args.chunk_ms, args.pid),
        "held": lambda: held(args.url, args.streams, args.release, args.pid, args.open_timeout),
    }
    result: dict[str, Any] = uvloop.run(runs[args.mode]())
    json.dump(result, sys.stdout)
    print(flush=True)


if __name__ == "__main__":
    main()

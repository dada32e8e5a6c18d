"""What the key check and the rate limit cost per request, in-process and with Redis, side by
side in one run.

    .venv/bin/python loadtests/auth_cost.py [--rounds 4] [--seconds 2] [--concurrency 16]

Two parts:
1. The door alone, in this process (no HTTP): microseconds per request for the key check, the
   key check plus in-process limits (admit + release), and the key check plus Redis limits
   against a real `redis-server` (admit + settle: one script each), one at a time (latency) and
   `--concurrency` at a time (throughput).
2. End to end: three edges on the same mock, loaded in alternating rounds by one aiohttp client:
   `passthrough` (no auth), `keys-local` (key file + in-process limits) and `keys-redis` (keys and
   limits in Redis). Per edge: its CPU per request (from /proc), requests/s and median latency;
   Redis's own CPU per request for the Redis edge. The edges sit on core 0, the client, mock and
   Redis on the other cores (when there are any).
Results: printed, and bench-results/auth_cost.json. The key used has limits far above the load,
so every request passes every check (the cost measured is the common case, not refusals).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.access.auth import Gate, Keyring  # noqa: E402
from edge.access.keys import FileBackend, FileKeys, Limits, RedisBackend, create_key  # noqa: E402
from edge.access.metering import UsageMeter  # noqa: E402
from edge.access.ratelimit import LocalLimiter, RedisLimiter  # noqa: E402
from edge.access.redisconn import RedisLink  # noqa: E402
from edge.config import AuthSettings  # noqa: E402
from edge.dialects import OPENAI  # noqa: E402
from edge.http.server import Connection, Fields, Request  # noqa: E402
from edge.observe.record import Usage  # noqa: E402
from edge.proxy.route import ProxyRequest  # noqa: E402
from edge.routing.fleet import HostTable  # noqa: E402
from loadtests.bench.closedloop import closed_loop  # noqa: E402
from loadtests.bench.procfs import cpu_ns, split_cores, start_edge  # noqa: E402
from tests.procs import free_port  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

DOC = {
    "model": "m",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "what does it cost?"}],
}
BODY = json.dumps(DOC).encode()
HIGH = Limits(rpm=10**9, tpm=10**12, concurrency=10**6)
EDGES = ("passthrough", "keys-local", "keys-redis")


# --- part 1: the door alone ------------------------------------------------------------------


def _gate(keyring: Keyring, limiter: LocalLimiter | RedisLimiter) -> Gate:
    return Gate(AuthSettings(mode="keys"), keyring, limiter, UsageMeter({}))


async def door_cost(work: Path, redis_url: str, n: int, concurrency: int) -> dict[str, float]:
    """Microseconds per request for each stage of the door, measured in this process."""
    path = str(work / "bench-keys.json")
    _, key = create_key(FileBackend(path), "bench", limits=HIGH)
    watcher = FileKeys(path)
    await watcher.refresh()
    keyring = Keyring(watcher)
    # A request as edge/http/server.py parses it; the gate reads only its headers.
    raw = [(b"Authorization", f"Bearer {key}".encode())]
    conn, fields = cast(Connection, None), Fields(tuple(raw))
    request = Request(conn, "POST", "/v1/chat/completions", fields, None, "1.1", True, 1)
    hosts = HostTable().build({"m": ["http://127.0.0.1:9"]}).models["m"]
    usage = Usage(20, 64)

    def preq() -> ProxyRequest:
        return ProxyRequest(OPENAI, "chat", "m", False, BODY, "/v1/chat/completions", DOC)

    async def one(gate: Gate) -> None:
        principal = gate.identify(request)
        adm = await gate.admit(principal, preq(), hosts)
        gate.release(adm, "m", 200, usage)

    out: dict[str, float] = {}
    began = time.perf_counter()
    for _ in range(n):
        keyring.find(key)
    out["key_check_us"] = (time.perf_counter() - began) / n * 1e6

    local = _gate(keyring, LocalLimiter())
    began = time.perf_counter()
    for _ in range(n):
        await one(local)
    out["key_check_local_limits_us"] = (time.perf_counter() - began) / n * 1e6

    link = RedisLink(redis_url, 1.0)
    limiter = RedisLimiter(link, 900, None)
    remote = _gate(keyring, limiter)
    m = max(n // 10, 1000)
    for _ in range(200):  # connect, load the scripts
        await one(remote)
    began = time.perf_counter()
    for _ in range(m):
        await one(remote)
        await limiter.close()  # wait for the settlement too: two round trips, one request
    out["key_check_redis_limits_serial_us"] = (time.perf_counter() - began) / m * 1e6

    async def worker(count: int) -> None:
        for _ in range(count):
            await one(remote)

    began = time.perf_counter()
    await asyncio.gather(*(worker(m // concurrency) for _ in range(concurrency)))
    await limiter.close()
    done = (m // concurrency) * concurrency
    out["key_check_redis_limits_concurrent_us"] = (time.perf_counter() - began) / done * 1e6
    await link.close()
    return out


# --- part 2: end to end ----------------------------------------------------------------------


async def load(base: str, key: str, seconds: float, concurrency: int) -> tuple[int, float]:
    """Closed-loop load for `seconds`: (requests completed, median latency in ms)."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    return await closed_loop(f"{base}/v1/chat/completions", BODY, headers, seconds, concurrency)


async def rounds(
    edges: dict[str, tuple[str, int]], key: str, redis_pid: int, args: argparse.Namespace
) -> dict[str, Any]:
    for base, _ in edges.values():  # warm every edge: connections, scripts, first imports
        await load(base, key, 1.0, args.concurrency)
    per: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in edges}
    for i in range(args.rounds):
        for name in EDGES if i % 2 == 0 else EDGES[::-1]:
            base, pid = edges[name]
            before, redis_before = cpu_ns(pid), cpu_ns(redis_pid)
            done, p50 = await load(base, key, args.seconds, args.concurrency)
            used, redis_used = cpu_ns(pid) - before, cpu_ns(redis_pid) - redis_before
            per[name].append(
                (used / done / 1000, done / args.seconds, p50, redis_used / done / 1000)
            )
    return {
        name: {
            "cpu_us_per_request": statistics.median(r[0] for r in runs),
            "requests_per_s": statistics.median(r[1] for r in runs),
            "latency_p50_ms": statistics.median(r[2] for r in runs),
            "redis_cpu_us_per_request": statistics.median(r[3] for r in runs),
        }
        for name, runs in per.items()
    }


def start_edges(
    work: Path, mock: str, redis_url: str, key_file: str, cores: set[int]
) -> tuple[dict[str, tuple[str, int]], list[subprocess.Popen[bytes]]]:
    auth = {
        "passthrough": "",
        "keys-local": f'[auth]\nmode = "keys"\nkey_store = "{key_file}"\n',
        "keys-redis": f'[auth]\nmode = "keys"\nredis_url = "{redis_url}"\n',
    }
    edges, procs = {}, []
    for name in EDGES:
        config = work / f"{name}.toml"
        config.write_text(f'{auth[name]}\n[models."m"]\nservers = ["{mock}"]\n')
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = start_edge(
            ["serve", "--config", str(config), "--port", str(port)], f"{base}/health", cores
        )
        procs.append(proc)
        edges[name] = (base, proc.pid)
    return edges, procs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds per edge (alternating)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--calls", type=int, default=20_000, help="in-process calls per stage")
    args = parser.parse_args()
    edge_cores, load_cores = split_cores()
    work = Path(tempfile.mkdtemp(prefix="edge-auth-cost-"))
    redis = RedisServer().start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if load_cores and redis.proc is not None:
            os.sched_setaffinity(redis.proc.pid, load_cores)
        door = asyncio.run(door_cost(work, redis.url, args.calls, args.concurrency))
        key_file = str(work / "keys.json")
        _, key = create_key(FileBackend(key_file), "bench", limits=HIGH)
        # The same key in Redis: the Redis edge checks it against its own store.
        record = FileBackend(key_file).records()
        backend = RedisBackend(redis.url)
        for rec in record.values():
            backend.put(rec)
        backend.client.close()
        mock_port = free_port()
        mock = f"http://127.0.0.1:{mock_port}"
        cmd = ["mock", "--port", str(mock_port), "--model", "m"]
        procs.append(start_edge(cmd, f"{mock}/health", load_cores))
        edges, edge_procs = start_edges(work, mock, redis.url, key_file, edge_cores)
        procs += edge_procs
        assert redis.proc is not None
        results = asyncio.run(rounds(edges, key, redis.proc.pid, args))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
        redis.close()
    results["door_us"] = door
    report(results, args)


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    door = results["door_us"]
    print("the door alone, in-process, microseconds per request")
    print("| stage | us/request |")
    print("| --- | --- |")
    for name, label in (
        ("key_check_us", "key check (id lookup + SHA-256 + constant-time compare)"),
        ("key_check_local_limits_us", "key check + in-process limits (admit, release, usage)"),
        ("key_check_redis_limits_serial_us", "key check + Redis limits, one at a time"),
        (
            "key_check_redis_limits_concurrent_us",
            f"key check + Redis limits, {args.concurrency} at a time",
        ),
    ):
        print(f"| {label} | {door[name]:.1f} |")
    base = results["passthrough"]["cpu_us_per_request"]
    print(f"\nend to end, medians of {args.rounds} alternating rounds of {args.seconds} s")
    print("| edge | CPU us/request | over passthrough | Redis CPU us/req | requests/s | p50 ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in EDGES:
        r = results[name]
        redis_cpu = r["redis_cpu_us_per_request"] if name == "keys-redis" else 0.0
        print(
            f"| {name} | {r['cpu_us_per_request']:.1f} | {r['cpu_us_per_request'] - base:+.1f} "
            f"| {redis_cpu:.1f} | {r['requests_per_s']:.0f} | {r['latency_p50_ms']:.2f} |"
        )
    results["settings"] = vars(args)
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "auth_cost.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

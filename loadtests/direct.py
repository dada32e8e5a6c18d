"""Time to first token and CPU per request: edge.direct in the client's process versus through an
`edge serve`, against the same mock fleet, one run side by side.

    .venv/bin/python loadtests/direct.py [--requests 1000] [--hosts 3] [--ttft-ms 0]

Three mock servers (subprocesses) serve one model; one `edge serve` (one worker) lists them from
the same fleet file the library reads. One client thread sends streamed chat requests one after
another (each with its own X-Session-ID, so affinity places each), through:
- `direct, no routing`: a plain httpx2 client to one host (the floor: the client's own cost);
- `edge.direct`: the library's sync transport in the same httpx2 client;
- `edge serve`: the plain httpx2 client to the edge.
Printed per path: TTFT (send to the first body byte of the stream) p50 and p99, the client
process's CPU per request, the edge process's CPU per request, and their sum.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx2  # noqa: E402

import edge.direct  # noqa: E402
from tests.procs import Procs, free_port, write_fleet  # noqa: E402

MODEL = "bench"


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(client: httpx2.Client, n: int) -> list[float]:
    """TTFTs in ms of `n` streamed requests, one after another."""
    ttfts = []
    for i in range(n):
        body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
        headers = {"X-Session-ID": f"s{i}"}
        start = time.perf_counter()
        with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            chunks = r.iter_raw()
            next(chunks)
            ttfts.append((time.perf_counter() - start) * 1000)
            for _ in chunks:
                pass
    return ttfts


def measure(
    name: str, make: Callable[[], httpx2.Client], n: int, edge_pid: int | None
) -> list[str]:
    with make() as client:
        run(client, min(100, n))  # warm: connections, the first view, code paths
        client_cpu, edge_cpu, wall = time.process_time(), 0.0, time.perf_counter()
        if edge_pid is not None:
            edge_cpu = cpu_s(edge_pid)
        ttfts = run(client, n)
        client_us = (time.process_time() - client_cpu) / n * 1e6
        edge_us = (cpu_s(edge_pid) - edge_cpu) / n * 1e6 if edge_pid is not None else 0.0
        wall = time.perf_counter() - wall
    q = statistics.quantiles(ttfts, n=100)
    return [
        name, f"{q[49]:.2f}", f"{q[98]:.2f}", f"{client_us:.0f}", f"{edge_us:.0f}",
        f"{client_us + edge_us:.0f}", f"{n / wall:.0f}",
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    args = parser.parse_args()
    procs = Procs()
    work = Path(tempfile.mkdtemp(prefix="edge-direct-bench-"))
    os.environ["XDG_CACHE_HOME"] = str(work)  # the discovery cache files stay in here
    try:
        extra = ("--ttft-ms", str(args.ttft_ms), "--tokens", "8")
        urls = [
            procs.mock(free_port(), MODEL, name=f"b{i}", extra=extra) for i in range(args.hosts)
        ]
        fleet = write_fleet(work / "fleet.json", {MODEL: urls})
        port = free_port()
        edge_proc = procs.edge(port, "--models", str(fleet))
        transport = edge.direct.transport(sources=[str(fleet)])
        rows = [
            measure(
                "direct, no routing", lambda: httpx2.Client(base_url=urls[0]), args.requests, None
            ),
            measure(
                "edge.direct",
                lambda: httpx2.Client(transport=transport, base_url="http://direct"),
                args.requests,
                None,
            ),
            measure(
                "edge serve",
                lambda: httpx2.Client(base_url=f"http://127.0.0.1:{port}"),
                args.requests,
                edge_proc.pid,
            ),
        ]
        transport.close()
    finally:
        procs.stop_all()
    head = ["path", "ttft p50 ms", "ttft p99 ms", "client us/req", "edge us/req", "sum", "req/s"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    print(f"({args.requests} streamed requests each, {args.hosts} mock hosts, one client thread)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the metrics cost per request: an edge with metrics on and one with metrics off, side by
side in one run, plus the in-process cost of one `Metrics.observe` call.

    .venv/bin/python loadtests/metrics_cost.py [--rounds 6] [--seconds 3] [--concurrency 16]

Both edges serve the same mock fleet and are loaded in alternating rounds (on, off, off, on, ...)
by the same aiohttp client, so drift on a shared machine hits both alike. Per round: requests
completed, the edge's CPU time (summed over its threads from /proc, nanosecond resolution) per
request, and the client's median latency. The figures are medians over rounds; the difference of
the CPU medians is the metrics' cost per request. The edges sit on core 0, the client and the
mock on the other cores (when there are any). Results: printed, and bench-results/metrics_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge.config import HealthSettings, OutlierSettings  # noqa: E402
from edge.observe.families import LATENCY_BUCKETS  # noqa: E402
from edge.observe.metrics import Metrics  # noqa: E402
from edge.observe.record import RequestRecord, Usage  # noqa: E402
from edge.routing.attempt import OK, Attempts  # noqa: E402
from edge.routing.fleet import FleetView, HostTable  # noqa: E402
from edge.routing.health import Health  # noqa: E402
from loadtests.bench.closedloop import closed_loop  # noqa: E402
from loadtests.bench.procfs import cpu_ns, split_cores, start_edge  # noqa: E402
from tests.procs import free_port  # noqa: E402

BODY = json.dumps(
    {"model": "m", "messages": [{"role": "user", "content": "how much do metrics cost?"}]}
).encode()


async def load(base: str, seconds: float, concurrency: int) -> tuple[int, float]:
    """Closed-loop load for `seconds`: (requests completed, median latency in ms)."""
    headers = {"Content-Type": "application/json"}
    return await closed_loop(f"{base}/v1/chat/completions", BODY, headers, seconds, concurrency)


async def rounds(edges: dict[str, tuple[str, int]], args: argparse.Namespace) -> dict[str, Any]:
    for base, _ in edges.values():  # warm both: connections, caches, first-time imports
        await load(base, 1.0, args.concurrency)
    per: dict[str, list[tuple[float, float, float]]] = {name: [] for name in edges}
    order = ["on", "off"]
    for i in range(args.rounds):
        for name in order if i % 2 == 0 else order[::-1]:
            base, pid = edges[name]
            before = cpu_ns(pid)
            done, p50 = await load(base, args.seconds, args.concurrency)
            used = cpu_ns(pid) - before
            per[name].append((used / done / 1000, done / args.seconds, p50))
    return {
        name: {
            "cpu_us_per_request": statistics.median(r[0] for r in runs),
            "requests_per_s": statistics.median(r[1] for r in runs),
            "latency_p50_ms": statistics.median(r[2] for r in runs),
            "rounds": [
                {"cpu_us_per_request": r[0], "requests_per_s": r[1], "latency_p50_ms": r[2]}
                for r in runs
            ],
        }
        for name, runs in per.items()
    }


def _per_call_ns(call: Callable[[], None], n: int = 20_000) -> float:
    """CPU (not wall) time per call, best of five: other processes on a shared machine do not
    count, preemption does not either."""
    return min(timeit.repeat(call, number=n, repeat=5, timer=time.process_time)) / n * 1e9


def observe_cost() -> dict[str, float]:
    """Nanoseconds of CPU per answered request: its attempt (started, answered, finished: the
    report that health, routing statistics and metrics read) and its record (every field set).
    Metrics on, metrics off (the attempt's report to routing only), and the same updates made
    through prometheus-client's own metric objects (labelled children cached), for scale."""
    view = FleetView()
    view.fleet = HostTable().build({"m": ["http://a", "http://b"]})
    host = view.fleet.models["m"][0]
    record = RequestRecord(
        "m", host, "chat", 200, "ok", 0.5, 1200, Usage(20, 100), attempts=1, bytes_in=300,
        stream=True, first_byte_s=0.1, stream_s=0.4, upstream_s=0.49,
    )  # fmt: skip
    out = {}
    for name, enabled in (("on", True), ("off", False)):
        metrics = Metrics(lambda: view.fleet)
        metrics.enabled = enabled
        attempts = Attempts(Health(HealthSettings(), OutlierSettings()), metrics.attempted)

        def answered(metrics: Metrics = metrics, attempts: Attempts = attempts) -> None:
            attempt = attempts.start(host, "m")
            attempt.answered(attempt.started + 0.1)
            attempt.finish(OK, attempt.started + 0.5, 100)
            metrics.finished(record)

        out[name] = _per_call_ns(answered)
    out["prometheus_client"] = _per_call_ns(_library_updates()) + out["off"]
    return out


def _library_updates() -> Callable[[], None]:
    r = CollectorRegistry()
    counters = [
        Counter(f"c{i}", "", ["model", "server"], registry=r).labels("m", "s") for i in range(8)
    ]
    hists = [
        Histogram(f"h{i}", "", ["model", "server"], registry=r, buckets=LATENCY_BUCKETS).labels(
            "m", "s"
        )
        for i in range(5)
    ]

    def update() -> None:
        for counter in counters:  # requests, attempts, bytes in/out, 2 x tokens, affinity, ...
            counter.inc(3)
        for hist in hists:  # duration, overhead, ttfb, stream, decode rate
            hist.observe(0.3)

    return update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds per edge (alternating)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one round")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    edge_cores, load_cores = split_cores()
    work = Path(tempfile.mkdtemp(prefix="edge-metrics-cost-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        mock_port = free_port()
        mock = f"http://127.0.0.1:{mock_port}"
        procs.append(
            start_edge(
                ["mock", "--port", str(mock_port), "--model", "m"], f"{mock}/health", load_cores
            )
        )
        edges = {}
        for name, enabled in (("on", "true"), ("off", "false")):
            config = work / f"{name}.toml"
            config.write_text(
                f'[metrics]\nenabled = {enabled}\n\n[models."m"]\nservers = ["{mock}"]\n'
            )
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            cmd = ["serve", "--config", str(config), "--port", str(port)]
            proc = start_edge(cmd, f"{base}/health", edge_cores)
            procs.append(proc)
            edges[name] = (base, proc.pid)
        results = asyncio.run(rounds(edges, args))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    results["observe_ns"] = observe_cost()
    report(results, args)


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    on, off = results["on"], results["off"]
    cost = on["cpu_us_per_request"] - off["cpu_us_per_request"]
    results["metrics_cost_us_per_request"] = cost
    # Rounds i of "on" and "off" ran back to back: their differences cancel slow drift.
    pairs = zip(on["rounds"], off["rounds"], strict=True)
    paired = statistics.median(a["cpu_us_per_request"] - b["cpu_us_per_request"] for a, b in pairs)
    spread = [r["cpu_us_per_request"] for r in on["rounds"] + off["rounds"]]
    results["paired_cost_us_per_request"] = paired
    results["settings"] = vars(args)
    print(f"edge CPU per request, medians of {args.rounds} alternating rounds of {args.seconds} s")
    print("| metrics | CPU us/request | requests/s | latency p50 ms |")
    print("| --- | --- | --- | --- |")
    for name, r in (("on", on), ("off", off)):
        print(
            f"| {name} | {r['cpu_us_per_request']:.1f} | {r['requests_per_s']:.0f} "
            f"| {r['latency_p50_ms']:.2f} |"
        )
    share = cost / off["cpu_us_per_request"] * 100
    print(f"metrics cost: {cost:.1f} us of CPU per request ({share:.1f}% of the edge's)")
    print(
        f"median of the paired (back-to-back) round differences: {paired:.1f} us; "
        f"rounds ranged {min(spread):.0f}-{max(spread):.0f} us"
    )
    ns = results["observe_ns"]
    print(
        f"one Metrics.observe (final observation, every field), CPU: {ns['on']:.0f} ns on, "
        f"{ns['off']:.0f} ns off (routing statistics only); the same updates through "
        f"prometheus-client objects: {ns['prometheus_client']:.0f} ns"
    )
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "metrics_cost.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""What tracing costs per request: the edge's CPU with tracing off, on at 1% and on at 100%,
side by side in one run.

    .venv/bin/python loadtests/tracing_cost.py [--rounds 5] [--seconds 3] [--concurrency 16]
    .venv/bin/python loadtests/tracing_cost.py --hotpath [--requests 20000] [--rounds 5]

Three `edge serve` processes on one mock, loaded in alternating rounds by one aiohttp client
(closed loop): `off` (no [tracing]), `1%` ([tracing] sample_ratio = 0.01) and `100%`. Each traced
edge exports over OTLP/HTTP to a receiver process on loopback that decodes every request (the
protocol's own protobuf code) and counts the spans, so the export is real: the edge's CPU
counts its batch thread's encoding and sending as well as the request path (every thread of
the process, from /proc). The edges sit on core 0, the client, mock and receiver on the others
(when there are any). Per edge: CPU microseconds per request, requests/s, median latency, and
the spans the receiver got per request (2 for a traced request: the request and its attempt).
Results: printed, and bench-results/tracing_cost.json.

--hotpath: the same three settings in loadtests/hotpath.py's harness instead (a whole worker in
this process, no sockets: the interpreter's work alone, far less noisy than the end-to-end run),
alternated round by round; the spans are encoded as for export (edge/observe/otlp.py) and
dropped instead of posted. The process's CPU time includes the batch thread's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests.bench.closedloop import closed_loop  # noqa: E402
from loadtests.bench.procfs import cpu_ns, split_cores, start_edge  # noqa: E402
from tests.procs import free_port, wait_http  # noqa: E402

EDGES = {"off": None, "1%": 0.01, "100%": 1.0}  # name -> [tracing] sample_ratio (None: off)
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "trace me"}]}).encode()
HEADERS = {"Content-Type": "application/json"}


# --- the receiver (its own process: `tracing_cost.py --receive PORT`) ---------------------


def receive(port: int) -> None:
    """An OTLP/HTTP receiver: decodes each export and counts spans; GET /count reports them."""
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    spans = 0
    reply = ExportTraceServiceResponse().SerializeToString()

    async def traces(request: web.Request) -> web.Response:
        nonlocal spans
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        spans += sum(len(s.spans) for r in message.resource_spans for s in r.scope_spans)
        return web.Response(body=reply, content_type="application/x-protobuf")

    async def count(_: web.Request) -> web.Response:
        return web.json_response({"spans": spans})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/count", count)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


async def spans_received(receiver: str) -> int:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{receiver}/count") as resp:
            return int((await resp.json())["spans"])


# --- --hotpath: the in-process harness -----------------------------------------------------


def hotpath(args: argparse.Namespace) -> None:
    import uvloop

    from edge.observe import otlp
    from loadtests import hotpath as harness

    class Dropped:
        """Encodes each batch as the OTLP exporter does, then drops it (no collector here)."""

        def export(self, spans: Any) -> Any:
            from opentelemetry.sdk.trace.export import SpanExportResult

            otlp.export_request(spans, resource, scope)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

        def force_flush(self, timeout_millis: int = 0) -> bool:
            return True

    resource, scope = otlp.resource({"service.name": "edge"}), otlp.scope("edge", "0")
    otlp.exporter = lambda *_: Dropped()
    plain = vars(harness)["from_mapping"]  # the config the harness builds, tracing added
    per: dict[str, list[float]] = {name: [] for name in EDGES}
    for i in range(args.rounds):
        names = list(EDGES) if i % 2 == 0 else list(EDGES)[::-1]
        for name in names:
            ratio = EDGES[name]
            extra = {} if ratio is None else {"tracing": {"enabled": True, "sample_ratio": ratio}}
            setattr(harness, "from_mapping", lambda raw, **kw: plain({**raw, **extra}, **kw))  # noqa: B010, B023
            per[name] += uvloop.run(harness.run(args.requests, 1, False))
    base = statistics.median(per["off"])
    print(f"in-process, medians of {args.rounds} alternating rounds of {args.requests} requests")
    print("| tracing | CPU us/request | vs off | rounds |")
    print("| --- | --- | --- | --- |")
    for name, runs in per.items():
        cpu = statistics.median(runs)
        shown = " ".join(f"{v:.1f}" for v in runs)
        print(f"| {name} | {cpu:.1f} | {(cpu - base) / base * 100:+.1f}% | {shown} |")


# --- the load ------------------------------------------------------------------------------


async def rounds(
    edges: dict[str, tuple[str, int]], receiver: str, args: argparse.Namespace
) -> dict[str, Any]:
    for base, _ in edges.values():  # warm every edge: connections, first imports
        await closed_loop(f"{base}/v1/chat/completions", BODY, HEADERS, 1.0, args.concurrency)
    await asyncio.sleep(args.settle)  # the warm-up's spans exported before the first round
    names = list(edges)
    per: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in edges}
    for i in range(args.rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            base, pid = edges[name]
            await asyncio.sleep(0.5)  # the previous edge's batch exported (not billed here)
            spans_before, before = await spans_received(receiver), cpu_ns(pid)
            url = f"{base}/v1/chat/completions"
            done, p50 = await closed_loop(url, BODY, HEADERS, args.seconds, args.concurrency)
            # Its last batch goes out within the schedule delay: billed to this round.
            await asyncio.sleep(args.settle)
            used = cpu_ns(pid) - before
            spans = await spans_received(receiver) - spans_before
            per[name].append((used / done / 1000, done / args.seconds, p50, spans / done))
    return {
        name: {
            "cpu_us_per_request": statistics.median(r[0] for r in runs),
            "requests_per_s": statistics.median(r[1] for r in runs),
            "latency_p50_ms": statistics.median(r[2] for r in runs),
            "spans_per_request": statistics.median(r[3] for r in runs),
            "rounds_cpu_us": [round(r[0], 2) for r in runs],
        }
        for name, runs in per.items()
    }


def start_edges(
    work: Path, mock: str, receiver: str, cores: set[int], delay_s: float
) -> tuple[dict[str, tuple[str, int]], list[subprocess.Popen[bytes]]]:
    edges: dict[str, tuple[str, int]] = {}
    procs: list[subprocess.Popen[bytes]] = []
    for name, ratio in EDGES.items():
        tracing = ""
        if ratio is not None:
            tracing = (
                f'[tracing]\nenabled = true\nsample_ratio = {ratio}\nendpoint = "{receiver}"\n'
                f"schedule_delay_s = {delay_s}\n"
            )
        config = work / f"edge-{len(edges)}.toml"
        config.write_text(f'{tracing}\n[models."m"]\nservers = ["{mock}"]\n')
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
    parser.add_argument("--rounds", type=int, default=5, help="rounds per edge (alternating)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--delay", type=float, default=0.5, help="the batch's schedule delay, s")
    parser.add_argument("--hotpath", action="store_true", help="the in-process harness instead")
    parser.add_argument("--requests", type=int, default=20000, help="per round, with --hotpath")
    parser.add_argument("--receive", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receive:
        receive(args.receive)
        return
    if args.hotpath:
        hotpath(args)
        return
    args.settle = args.delay + 0.3
    edge_cores, load_cores = split_cores()
    work = Path(tempfile.mkdtemp(prefix="edge-tracing-cost-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        port = free_port()
        receiver = f"http://127.0.0.1:{port}"
        procs.append(
            subprocess.Popen([sys.executable, __file__, "--receive", str(port)], cwd=ROOT)
        )  # load cores: this process's affinity, inherited
        wait_http(f"{receiver}/count", 20, procs[-1])
        mock_port = free_port()
        mock = f"http://127.0.0.1:{mock_port}"
        cmd = ["mock", "--port", str(mock_port), "--model", "m"]
        procs.append(start_edge(cmd, f"{mock}/health", load_cores))
        edges, edge_procs = start_edges(work, mock, receiver, edge_cores, args.delay)
        procs += edge_procs
        began = time.monotonic()
        results = asyncio.run(rounds(edges, receiver, args))
        results["wall_s"] = round(time.monotonic() - began, 1)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=15)
    report(results, args)


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    base = results["off"]["cpu_us_per_request"]
    users = args.concurrency
    print(f"medians of {args.rounds} alternating rounds of {args.seconds} s, {users} users")
    print("| tracing | CPU us/request | vs off | spans/request | requests/s | p50 ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in EDGES:
        r = results[name]
        cpu = r["cpu_us_per_request"]
        print(
            f"| {name} | {cpu:.1f} | {(cpu - base) / base * 100:+.1f}% "
            f"| {r['spans_per_request']:.3f} | {r['requests_per_s']:.0f} "
            f"| {r['latency_p50_ms']:.2f} |"
        )
    results["settings"] = {k: v for k, v in vars(args).items() if k != "receive"}
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "tracing_cost.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

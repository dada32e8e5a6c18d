"""`make bench`: the edge side by side with a direct connection, nginx and vllm-router, in one run.

Each proxy runs on core 0 alone; the load (wrk, the aiohttp client) and the upstreams share
core 1. The figures (the issue's F1-F5):

- F1  non-streaming requests/s at saturation: wrk, 64 connections. Every proxy is started at
      once (each on core 0, idle but for the one under load) and the targets take turns, one
      5 s wrk round each, for F1_ROUNDS rounds after a warm-up: the medians are reported, so a
      drift of the machine's speed hits every target alike. Proxy CPU per request =
      utime+stime of its process tree over a round / its requests.
- F2  latency at a fixed 300 requests/s (open loop), p50 and p99, minus the direct ones; in
      turns like F1 (F2_ROUNDS rounds of 5 s each), medians over the rounds reported.
- F3  50 concurrent SSE streams x 200 events of 180 bytes, 5 ms apart, each its own upstream
      write: proxy CPU per relayed event, time to first chunk, every byte compared; in turns
      (F3_ROUNDS rounds), medians reported.
- F4  proxy RSS after start, then with 1,000 and ~10,000 idle open streams, which must all
      complete once released.
- F5  F1 with `edge serve --workers 2` against `--workers 1`, in turns: each worker pinned to a
      core of its own and held to F5_SHARE of it by a CPU quota (loadtests/bench/quota.py), so
      two workers, wrk and the upstream fit on a 2-core machine; and, for information,
      `--workers 2` unbounded on both cores (the second sharing core 1 with the load).

Non-streaming requests go to an nginx `return 200` upstream (faster than any Python server, so
it never limits a proxy); streams go to loadtests/bench/upstream.py. Results: bench-results/
bench.md (the table, also printed) and bench-results/bench.json.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.bench import quota, report  # noqa: E402
from loadtests.bench.procfs import core_busy_seconds, cpu_seconds, rss_bytes  # noqa: E402
from loadtests.bench.targets import (  # noqa: E402
    LOAD_CORE,
    PROXY_CORE,
    ROOT,
    Launcher,
    Proc,
    edge,
    ensure_debian_tools,
    ensure_vllm_router,
    nginx_proxy,
    nginx_static_upstream,
    pinned,
    python_upstream,
    tool_version,
    vllm_router,
)
from loadtests.bench.wrk import PATH  # noqa: E402
from loadtests.bench.wrk import wrk as wrk_round  # noqa: E402

OUT = ROOT / "bench-results"
# BENCH_QUICK=1: a smoke run of every phase in about a minute (figures too short to quote).
QUICK = os.environ.get("BENCH_QUICK") == "1"
F1_SECONDS, F1_WARM_SECONDS, F1_CONNECTIONS = (2, 1, 64) if QUICK else (5, 2, 64)
F1_ROUNDS = 1 if QUICK else 5
F2_RATE, F2_SECONDS, F2_ROUNDS = 300, 1 if QUICK else 5, 1 if QUICK else 3
F3_ROUNDS = 1 if QUICK else 3
F3_STREAMS, F3_CHUNKS, F3_CHUNK_MS = 50, 200, 5
F4_SMALL, F4_BIG = 1000, 2000 if QUICK else 10000
F5_SHARE = 0.5  # of a core, per worker: wrk and the upstream need ~0.2 core at that load


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wrk(url: str, seconds: int) -> dict[str, Any]:
    return wrk_round(url, seconds, F1_CONNECTIONS)


def client(mode: str, *args: str, timeout_s: float = 180) -> dict[str, Any]:
    cmd = pinned(LOAD_CORE, sys.executable, "-m", "loadtests.bench.client", mode, *args)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-500:]}
    result: dict[str, Any] = json.loads(done.stdout)
    return result


class Core0:
    """CPU the proxy used, and what other processes took of its core, over one phase."""

    def __init__(self, proxy: Proc | None) -> None:
        self.proxy = proxy
        self.cpu0 = cpu_seconds(proxy.pid) if proxy else 0.0
        self.busy0, self.start = core_busy_seconds(int(PROXY_CORE)), time.monotonic()

    def done(self) -> tuple[float, float]:
        """(proxy CPU seconds, % of core 0 that others used) since construction."""
        busy = core_busy_seconds(int(PROXY_CORE)) - self.busy0
        wall = time.monotonic() - self.start
        cpu = cpu_seconds(self.proxy.pid) - self.cpu0 if self.proxy else 0.0
        return cpu, min(100.0, max(0.0, busy - cpu) / wall * 100)


Targets = dict[str, tuple[Proc | None, str]]  # name -> (proxy, or None for direct; its URL)
Round = Callable[[Proc | None, str], dict[str, Any]]
_FAILED = (RuntimeError, OSError, subprocess.SubprocessError, ValueError)


def in_turns(targets: Targets, rounds: int, label: str, measure: Round) -> dict[str, Any]:
    """`measure` on every target, in turns: round r of each before round r+1 of any, so a drift
    of the machine's speed hits every target alike. Each target's rounds merged by `merge`."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    for r in range(rounds):
        for name, (proxy, url) in targets.items():
            log(f"{label} round {r + 1}/{rounds}: {name}")
            try:
                runs[name].append(measure(proxy, url))
            except _FAILED as exc:
                runs[name].append({"error": str(exc)[:500]})
                log(f"{name}: {exc}")
    return runs


def merge(
    rounds: list[dict[str, Any]], medians: tuple[str, ...], sums: tuple[str, ...]
) -> dict[str, Any]:
    """One figure per target from its rounds: the median of each of `medians` (with its
    per-round values under runs_KEY), the total of each of `sums`; a target none of whose
    rounds ran gives its last error."""
    whole = [r for r in rounds if "error" not in r]
    if not whole:
        return rounds[-1]
    out: dict[str, Any] = {key: sum(int(r.get(key, 0)) for r in whole) for key in sums}
    out["first_error"] = next((r["first_error"] for r in whole if r.get("first_error")), [])
    for key in medians:
        values = [float(r[key]) for r in whole if key in r]
        if values:
            out[key] = statistics.median(values)
            out["runs_" + key] = [r.get(key) for r in whole]
    return out


def f1_round(proxy: Proc | None, url: str) -> dict[str, Any]:
    core = Core0(proxy)
    result = wrk(url, F1_SECONDS)
    cpu, result["core0_others_pct"] = core.done()
    if proxy and result["requests"]:
        result["cpu_us_per_req"] = cpu / result["requests"] * 1e6
    return result


def f1(targets: Targets) -> dict[str, dict[str, Any]]:
    """F1 for every target, F1_ROUNDS rounds in turns after a warm-up."""
    for _proxy, url in targets.values():
        wrk(url, F1_WARM_SECONDS)
    runs = in_turns(targets, F1_ROUNDS, "F1", f1_round)
    figures = ("rps", "cpu_us_per_req", "core0_others_pct")
    return {name: merge(rounds, figures, ("errors", "requests")) for name, rounds in runs.items()}


def f2_round(proxy: Proc | None, url: str) -> dict[str, Any]:
    core = Core0(proxy)
    args = ["--url", url + PATH, "--rate", str(F2_RATE), "--seconds", str(F2_SECONDS)]
    result = client("rate", *args)
    _, result["core0_others_pct"] = core.done()
    return result


def f2(targets: Targets) -> dict[str, dict[str, Any]]:
    """F2 for every target, in turns as F1: a p99 is the few slowest requests of a round, so
    one stall of the shared machine moves a single round's figure a lot."""
    runs = in_turns(targets, F2_ROUNDS, f"F2 ({F2_RATE}/s)", f2_round)
    figures = ("p50_ms", "p99_ms", "core0_others_pct")
    return {name: merge(rounds, figures, ("errors", "requests")) for name, rounds in runs.items()}


def f3(proxy: Proc | None, url: str) -> dict[str, Any]:
    args = ["--url", url + PATH, "--streams", str(F3_STREAMS), "--chunks", str(F3_CHUNKS)]
    result = client(
        "streams", *args, "--chunk-ms", str(F3_CHUNK_MS), "--pid", str(proxy.pid if proxy else 0)
    )
    if proxy and result.get("chunks"):
        result["cpu_us_per_chunk"] = result["cpu_s"] / result["chunks"] * 1e6
    return result


def f3_rounds(targets: Targets) -> dict[str, dict[str, Any]]:
    """F3 for every target, F3_ROUNDS rounds in turns; the streams and bytes checked summed."""
    runs = in_turns(targets, F3_ROUNDS, f"F3 ({F3_STREAMS} streams)", f3)
    figures = ("cpu_us_per_chunk", "ttfc_p50_ms", "ttfc_p99_ms")
    checked = ("streams", "completed", "intact", "errors", "chunks")
    return {name: merge(rounds, figures, checked) for name, rounds in runs.items()}


def f4(proxy: Proc, url: str, release: str, big: int) -> dict[str, Any]:
    result: dict[str, Any] = {"rss_start": rss_bytes(proxy.pid)}
    for n in (F4_SMALL, big):
        args = ["--url", url + PATH, "--streams", str(n), "--release", release]
        args += ["--pid", str(proxy.pid)]
        result[str(n)] = client("held", *args, "--open-timeout", "90", timeout_s=240)
    return result


def f5(launch: Launcher, work: Path, plain: str) -> dict[str, Any]:
    """F1 for `--workers 1` and `--workers 2` in turns, every worker held to F5_SHARE of a core
    of its own; {"error": why} where CPU quotas cannot be set."""
    why = quota.unavailable()
    if why:
        return {"error": why, "share": F5_SHARE}
    held = quota.Quota("f5")
    one = edge(launch, work, plain, workers=1, tag="-f5-1")
    two = edge(launch, work, plain, workers=2, tag="-f5-2")
    try:
        held.hold(one.pid, F5_SHARE, int(PROXY_CORE))
        for core, pid in enumerate(quota.workers(two.pid)):
            held.hold(pid, F5_SHARE, core)
        targets: Targets = {"--workers 1": (one, one.url), "--workers 2": (two, two.url)}
        return {**f1(targets), "share": F5_SHARE, "throttled_periods": held.throttled()}
    finally:
        one.stop()
        two.stop()
        held.close()


def start_all(
    targets: dict[str, Callable[[str, str], Proc | None]], upstream: str, tag: str,
    results: dict[str, dict[str, Any]],
) -> Targets:  # fmt: skip
    """Every target started in front of `upstream`; one that fails to start has its error in
    `results` and is left out."""
    started: Targets = {}
    for name, start in targets.items():
        try:
            proxy = start(upstream, tag)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            results[name]["error"] = str(exc)[:500]
            log(f"{name}: {exc}")
            continue
        started[name] = (proxy, proxy.url if proxy else upstream)
    return started


def stop_all(started: Targets) -> None:
    for proxy, _ in started.values():
        if proxy:
            proxy.stop()


def run_streams(
    targets: dict[str, Callable[[str, str], Proc | None]], streams: Proc, big: int
) -> dict[str, dict[str, Any]]:
    """F3 (in turns) and F4 for every target, all started in front of the streaming upstream."""
    results: dict[str, dict[str, Any]] = {name: {} for name in targets}
    started = start_all(targets, streams.url, "streams", results)
    try:
        for name, f3_result in f3_rounds(started).items():
            results[name]["f3"] = f3_result
        for name, (proxy, url) in started.items():
            if proxy is None:
                continue
            log(f"{name}: F4 (idle streams)")
            try:
                results[name]["f4"] = f4(proxy, url, streams.url + "/release", big)
            except _FAILED as exc:
                results[name]["f4"] = {"error": str(exc)[:500]}
                log(f"{name}: {exc}")
            proxy.stop()  # F4's streams leave a proxy large; the next one starts level
    finally:
        stop_all(started)
    return results


def run_plain(
    targets: dict[str, Callable[[str, str], Proc | None]], plain: str
) -> dict[str, dict[str, Any]]:
    """F1 (in turns) and F2 for every target, all started in front of the plain upstream."""
    results: dict[str, dict[str, Any]] = {name: {} for name in targets}
    started = start_all(targets, plain, "plain", results)
    try:
        for name, f1_result in f1(started).items():
            results[name]["f1"] = f1_result
        for name, f2_result in f2(started).items():
            results[name]["f2"] = f2_result
    finally:
        stop_all(started)
    return results


def main() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # A relayed stream holds two sockets in the proxy; what fits under the open-file limit with
    # room for the proxy's own files and idle keep-alive pools (nginx keeps 256 upstream ones).
    big = min(F4_BIG, (hard - 1000) // 2)
    OUT.mkdir(exist_ok=True)
    work = OUT / "work"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    began = time.monotonic()
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg()[0], "f4_big": big, "nofile": hard, "quick": QUICK,
    }  # fmt: skip
    log("checking tools (nginx-light, wrk, vllm-router)")
    missing = ensure_debian_tools()
    router_exe, router_info = ensure_vllm_router()
    meta.update(
        missing=missing, vllm_router=router_info, nginx=tool_version(["nginx", "-v"]),
        wrk=tool_version(["wrk", "--version"]),
    )  # fmt: skip
    if "wrk" in missing:
        log("wrk is missing: no benchmark")
        return 1
    launch = Launcher(work / "logs")
    results: dict[str, Any] = {}
    try:
        streams = python_upstream(launch)
        plain = streams.url if "nginx" in missing else nginx_static_upstream(launch, work).url
        meta["plain_upstream"] = "python" if "nginx" in missing else "nginx return 200"

        targets: dict[str, Callable[[str, str], Proc | None]] = {
            "direct": lambda up, tag: None,
            "edge": lambda up, tag: edge(launch, work, up, tag=f"-{tag}"),
        }
        if "nginx" not in missing:
            targets["nginx"] = lambda up, tag: nginx_proxy(launch, work, up, tag=f"-{tag}")
        if router_exe is not None:
            targets["vllm-router"] = lambda up, tag: vllm_router(
                launch, router_exe, up, tag=f"-{tag}"
            )
        results.update(run_plain(targets, plain))
        for name, result in run_streams(targets, streams, big).items():
            results[name].update(result)
        log(f"F5: --workers 1 and 2, each worker held to {F5_SHARE} of a core")
        results["edge, quota"] = {"f5": f5(launch, work, plain)}
        log("F5: edge --workers 2 unbounded")
        two = edge(launch, work, plain, workers=2, tag="-workers2")
        results["edge --workers 2"] = {
            "f1": f1({"edge --workers 2": (two, two.url)})["edge --workers 2"]
        }
        two.stop()
    finally:
        launch.stop_all()
    meta["loadavg_end"] = os.getloadavg()[0]
    meta["seconds"] = round(time.monotonic() - began)
    document = {"meta": meta, "results": results}
    (OUT / "bench.json").write_text(json.dumps(document, indent=2))
    table = report.markdown(document)
    (OUT / "bench.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What mid-stream continuation costs when nothing breaks: CPU per relayed chunk, on versus off.

    .venv/bin/python loadtests/continuation_cost.py [--rounds 6] [--streams 50] [--chunks 200]

Two edges on core 0 (`make bench`'s proxy core), the same config but `routing.continuation`, in
front of the same streaming upstream (loadtests/bench/upstream.py) on core 1. Each model has a
second server that the price policy never picks, so that a stream can be continued: with it on,
the edge keeps the bytes the client got (bounded) and looks for an error event in each piece.
The client (`make bench`'s F3: 50 streams x 200 events of 180 bytes, 5 ms apart) drives each
edge in turn, the order alternating each round. Printed: each edge's median CPU per relayed
chunk, with real sockets, and the median of the round-by-round ratios (on / off). The bar
(issue 18): within 5%. `loadtests/hotpath.py --stream --spare [--no-continuation]` gives the
same comparison for the edge's Python work alone, the sockets taken out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.bench.targets import (  # noqa: E402
    LOAD_CORE,
    PROXY_CORE,
    ROOT,
    Launcher,
    Proc,
    free_port,
    pinned,
    python_upstream,
)

SPARE = "http://127.0.0.1:9"  # listed, never picked (the price policy), never connected to


def start(launch: Launcher, name: str, upstream: str, continuation: bool, work: Path) -> Proc:
    port = free_port()
    config = work / f"{name}.toml"
    flag = "true" if continuation else "false"
    config.write_text(
        f"[server]\nport = {port}\nworkers = 1\n"
        "[upstream]\nmax_connections_per_server = 20000\n"
        "[health]\nenabled = false\n"
        f"[routing]\ncontinuation = {flag}\n"
        '[routing.models."bench"]\npolicy = "price"\n'
        f'[routing.models."bench".prices]\n"{upstream}" = {{ input = 0.1 }}\n'
        f'"{SPARE}" = {{ input = 1.0 }}\n'
        f'[models."bench"]\nservers = ["{upstream}", "{SPARE}"]\n'
    )
    edge_exe = str(Path(sys.executable).with_name("edge"))
    cmd = pinned(PROXY_CORE, edge_exe, "serve", "--config", str(config))
    return launch.start(name, cmd, f"http://127.0.0.1:{port}", "/ready")


def streams(proc: Proc, count: int, chunks: int) -> dict[str, float]:
    args = ["--url", proc.url + "/v1/chat/completions", "--streams", str(count)]
    args += ["--chunks", str(chunks), "--chunk-ms", "5", "--pid", str(proc.pid)]
    cmd = pinned(LOAD_CORE, sys.executable, "-m", "loadtests.bench.client", "streams", *args)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, check=True)
    result: dict[str, float] = json.loads(done.stdout)
    if result["intact"] != count:
        raise RuntimeError(f"{proc.name}: {result['intact']}/{count} streams intact: {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--chunks", type=int, default=200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-continuation-"))
    launch = Launcher(work)
    per: dict[str, list[float]] = {"on": [], "off": []}
    try:
        upstream = python_upstream(launch)
        procs = {
            "on": start(launch, "edge-on", upstream.url, True, work),
            "off": start(launch, "edge-off", upstream.url, False, work),
        }
        for proc in procs.values():
            streams(proc, args.streams, 20)  # warm-up
        for r in range(args.rounds):
            order = list(procs.items()) if r % 2 == 0 else list(reversed(procs.items()))
            for name, proc in order:
                result = streams(proc, args.streams, args.chunks)
                per[name].append(result["cpu_s"] / result["chunks"] * 1e6)
    finally:
        launch.stop_all()
    ratios = [on / off for on, off in zip(per["on"], per["off"], strict=True)]
    for name, values in per.items():
        shown = " ".join(f"{v:.2f}" for v in values)
        print(f"continuation {name:>3}: {statistics.median(values):.2f} us CPU per relayed chunk"
              f" (rounds: {shown})")  # fmt: skip
    print(f"on / off: {statistics.median(ratios):.3f} (median of the round-by-round ratios)")


if __name__ == "__main__":
    main()

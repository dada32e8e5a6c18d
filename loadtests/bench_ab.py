"""This checkout's edge against another tree's (a refactor's "before"), F1 in turns, one core.

    git worktree add /tmp/before <commit> && (cd /tmp/before && make compile)
    .venv/bin/python loadtests/bench_ab.py /tmp/before [--rounds 8] [--seconds 5]

Both edges run on core 0 (`make bench`'s proxy core) with the same config, in front of the same
nginx `return 200` upstream; wrk on core 1 drives each in turn, one round each, the order
alternating so a drift of the machine's speed hits both alike. Printed: the median requests/s and
CPU per request of each, and the median of the round-by-round ratios (this / other), the figure
to quote for "no slower". Each tree runs its own code: the other tree's edge is started with
that tree first on PYTHONPATH (compile it there first, or it runs pure and slower).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.bench.procfs import cpu_seconds  # noqa: E402
from loadtests.bench.targets import (  # noqa: E402
    PROXY_CORE,
    ROOT,
    Launcher,
    Proc,
    free_port,
    nginx_static_upstream,
    pinned,
    wait_ready,
)
from loadtests.bench.wrk import wrk  # noqa: E402


def start(launch: Launcher, name: str, tree: Path, upstream: str, work: Path) -> Proc:
    port = free_port()
    config = work / f"{name}.toml"
    config.write_text(
        f"[server]\nport = {port}\nworkers = 1\n[upstream]\nmax_connections_per_server = 20000\n"
        f'[models."bench"]\nservers = ["{upstream}"]\n'
    )
    log = work / f"{name}.log"
    cmd = pinned(PROXY_CORE, sys.executable, "-m", "edge", "serve", "--config", str(config))
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=tree, env=env
        )  # fmt: skip
    proc = Proc(name, popen, f"http://127.0.0.1:{port}", log)
    launch.started.append(proc)
    wait_ready(proc.url + "/ready", proc)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other tree (a checkout of edge)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-ab-"))
    launch = Launcher(work)
    rows: dict[str, list[tuple[float, float]]] = {"this": [], "other": []}
    try:
        upstream = nginx_static_upstream(launch, work)
        procs = {
            "this": start(launch, "this", ROOT, upstream.url, work),
            "other": start(launch, "other", args.other.resolve(), upstream.url, work),
        }
        for proc in procs.values():
            wrk(proc.url, 2)  # warm-up
        for r in range(args.rounds):
            order = list(procs.items()) if r % 2 == 0 else list(reversed(procs.items()))
            for name, proc in order:
                before = cpu_seconds(proc.pid)
                result = wrk(proc.url, args.seconds)
                cpu = cpu_seconds(proc.pid) - before
                rows[name].append((result["rps"], cpu / max(result["requests"], 1) * 1e6))
    finally:
        launch.stop_all()
    for name, got in rows.items():
        rps = statistics.median(r for r, _ in got)
        cpu = statistics.median(c for _, c in got)
        print(f"{name:5}: {rps:,.0f} req/s, {cpu:.1f} us CPU per request (medians)")
    ratios = [a[0] / b[0] for a, b in zip(rows["this"], rows["other"], strict=True)]
    spread = f"{min(ratios):.2f}x-{max(ratios):.2f}x"
    print(f"this / other: {statistics.median(ratios):.3f}x (round by round; spread {spread})")


if __name__ == "__main__":
    main()

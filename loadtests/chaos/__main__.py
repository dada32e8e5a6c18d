"""`python -m loadtests.chaos`: see loadtests/chaos/__init__.py."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
from pathlib import Path

from loadtests.chaos.report import table
from loadtests.chaos.run import Options, run

OUT = Path(__file__).resolve().parents[2] / "bench-results" / "chaos.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.chaos", description=__doc__)
    parser.add_argument("--duration", type=float, help="seconds of phases (default 180)")
    parser.add_argument("--short", action="store_true", help="about 35 s in all, fewer users")
    parser.add_argument("--users", type=int, help="concurrent clients (default 16, short 6)")
    parser.add_argument("--workers", type=int, default=2, help="edge workers (default 2)")
    parser.add_argument("--no-redis", action="store_true", help="passthrough mode, no Redis phase")
    parser.add_argument("--workdir", type=Path, help="keep config and logs here")
    parser.add_argument("--out", type=Path, default=OUT, help=f"JSON figures (default {OUT})")
    args = parser.parse_args(argv)
    if not args.no_redis and shutil.which("redis-server") is None:
        parser.error("redis-server is not installed (make sysdeps), or pass --no-redis")
    changes = {"workers": args.workers, "redis": not args.no_redis, "workdir": args.workdir}
    if args.duration is not None:
        changes["duration_s"] = args.duration
    if args.users is not None:
        changes["users"] = args.users
    opts = Options.short(**changes) if args.short else Options(**changes)
    report = asyncio.run(run(opts))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    kept = "" if report["goals_met"] else f"; config and logs: {report['settings']['workdir']}"
    print(f"\nfigures: {args.out}{kept}")
    return 0 if report["goals_met"] else 1


if __name__ == "__main__":
    sys.exit(main())

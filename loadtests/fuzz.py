"""The long fuzz run: the property tests of tests/test_fuzz_*.py with far more examples.

    .venv/bin/python -m loadtests.fuzz [--minutes 10] [--only SUBSTRING] [--examples N]

Each target (one property test) runs in rounds, each round a pytest process drawing
EDGE_FUZZ_EXAMPLES examples at random from a fresh seed (printed: `--hypothesis-seed` replays a
round). Explicit @examples are skipped (EDGE_FUZZ_SKIP_EXPLICIT): `make test` checks them on
every run, and a known defect among them would end each round before it drew anything. A
target's first round measures its speed; later rounds are sized so that every target gets an
equal share of the minutes. A failure is shrunk by hypothesis, and the whole report (the
smallest example, its reproduce_failure blob, the seed) is written under build/fuzz/; the run
goes on. At the end: examples run, rounds and failures per target.

EDGE_FUZZ_LOOP=uvloop runs the targets that bring their own event loop (the front door's) on
uvloop, the production loop, instead of asyncio's.

The coverage-guided run is loadtests/fuzz_atheris.py (atheris, libFuzzer), which `make fuzz`
prefers where atheris is installed (the lock's fuzz extra, x86-64); this is the run elsewhere.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ("tests/http/test_fuzz_server.py", "tests/http/test_fuzz_client.py")
OUT = ROOT / "build" / "fuzz"
FIRST_ROUND = 100  # examples: enough to time a target
MAX_ROUND = 20_000  # examples: a round's shrink, if it fails, stays minutes, not hours
_COUNTS = re.compile(r"during generate phase.*?- (\d+) passing, (\d+) failing", re.S)
_WHY = re.compile(r"^(?:E|\s*\|)\s+(\w+(?:Error|Exception|Failure)\b.*)$", re.M)


@dataclass
class Target:
    node: str  # pytest node id
    examples: int = 0
    rounds: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # one line each, the report beside it

    @property
    def name(self) -> str:
        """`http1::test_...`: the file's part and the test's name (two files have a test of the
        same name)."""
        path, _, test = self.node.partition("::")
        return f"{Path(path).stem.removeprefix('test_fuzz_')}::{test}"

    def rate(self) -> float:
        """Examples per second so far (the process start included: rounds are long)."""
        return self.examples / self.seconds if self.seconds else 0.0


def collect(only: str) -> list[Target]:
    found = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *FILES],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    nodes = [line for line in found.splitlines() if "::" in line and only in line]
    return [Target(node) for node in nodes]


def run_round(target: Target, examples: int, limit_s: float) -> None:
    seed = random.randrange(1 << 32)
    env = os.environ | {"EDGE_FUZZ_EXAMPLES": str(examples), "EDGE_FUZZ_SKIP_EXPLICIT": "1"}
    command = [
        sys.executable, "-m", "pytest", target.node, "-q", "-p", "no:cacheprovider",
        "--timeout=0", "--hypothesis-show-statistics", f"--hypothesis-seed={seed}",
    ]  # fmt: skip
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit_s
        )
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        out = [
            o.decode(errors="replace") if isinstance(o, bytes) else o or ""
            for o in (exc.stdout, exc.stderr)
        ]
        output = f"{out[0]}{out[1]}\nround killed after {limit_s:.0f} s"
        code = -1
    target.seconds += time.monotonic() - started
    target.rounds += 1
    counts = _COUNTS.search(output)
    target.examples += sum(map(int, counts.groups())) if counts else (examples if code == 0 else 0)
    if code != 0:
        record(target, seed, output, code)
    if code not in (0, 1, -1):  # pytest could not run it (an import, a collection): no use going on
        summary([target])
        sys.exit(f"stopped: pytest exited {code} (the checkout or .venv is broken?)")
    print(
        f"  {target.name}: {examples} examples, seed {seed}: " + ("ok" if code == 0 else "FAILED")
    )


def record(target: Target, seed: int, output: str, code: int) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    report = OUT / f"{target.name.replace('::', '.')}-{seed}.txt"
    report.write_text(output)
    why = _WHY.search(output)
    line = why.group(1)[:160] if why else ("killed: a hang?" if code == -1 else f"exit {code}")
    target.failures.append(f"{line} ({report.relative_to(ROOT)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--only", default="", help="targets whose node id holds this")
    parser.add_argument("--examples", type=int, default=0, help="a fixed round size")
    args = parser.parse_args()
    targets = collect(args.only)
    if not targets:
        sys.exit("no fuzz target matches")
    share = args.minutes * 60 / len(targets)
    print(f"{len(targets)} targets, {share:.0f} s each; reports of failures in {OUT}")
    while True:
        pending = [t for t in targets if t.seconds < share]
        if not pending:
            break
        for target in pending:
            left = share - target.seconds
            n = args.examples or (FIRST_ROUND if not target.rounds else round(target.rate() * left))
            run_round(target, max(FIRST_ROUND, min(MAX_ROUND, n)), max(120.0, 3 * left))
    summary(targets)


def summary(targets: list[Target]) -> None:
    print(f"\n{'target':<72} {'examples':>9} {'rounds':>6} {'s':>6} failures")
    for t in targets:
        print(f"{t.name:<72} {t.examples:>9} {t.rounds:>6} {t.seconds:>6.0f} {len(t.failures)}")
        for line in t.failures:
            print(f"    {line}")
    failing = sum(len(t.failures) for t in targets)
    examples = sum(t.examples for t in targets)
    print(f"total: {examples} examples, {failing} failing rounds")
    if any(t.failures for t in targets):
        sys.exit(1)


if __name__ == "__main__":
    main()

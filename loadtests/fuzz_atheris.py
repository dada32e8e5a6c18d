"""Coverage-guided fuzzing of the edge's HTTP/1.1 parsers with atheris (libFuzzer for Python).

    python -m loadtests.fuzz_atheris --target {http1,chunked,upstream,all} [--seconds 60]
        [libFuzzer flags, e.g. -jobs=2 -dict=FILE -only_ascii=1]

The invariants are the property tests' (tests/http/test_fuzz_server.py and
tests/http/test_fuzz_client.py), imported, not copied; only where the input comes from differs
(libFuzzer's mutations, steered by the branches of edge/**/*.py each input reached, instead of
hypothesis's strategies):
- http1: bytes delivered in pieces to edge.http.server's `Server` over the tests' FakeTransport, the
  handler reading, ignoring or streaming (`run_example`): the handler sees only what the
  reference parser accepts, the output is well-formed HTTP/1.1, a complete or broken stream is
  answered or closed within a second, no exception reaches the loop, no error is logged, and
  every connection and handler is gone once the client has.
- chunked: a chunked body in pieces to edge.http.chunked's `Chunks`, switched to raw mode at a
  boundary (the body of `test_chunks_hand_on_only_checked_framing`): decoded data equal to the
  reference decoder's, raw mode never hands on a byte it did not check.
- upstream: a host's answer, in pieces and ended by a close, a reset or silence, to
  edge.http.client's `UpstreamPool` over the tests' fake host (tests/http/test_fuzz_client.py): a
  well-formed response or an UpstreamError, never a hang or another exception, the connection
  reused only after a whole answer, the pool empty once closed.
A violation raises (AssertionError mostly): libFuzzer writes the input to
build/fuzz/atheris/<target>/crash-<sha1> and stops that target.

An input is a few control bytes, then the bytes on the wire: http1 `E P Q R K data` (E: bits
0-1 how the client ends: wait, wait, close, reset; bit 2 a 1 MB body limit instead of 64 bytes;
P bits 0-1 + 1 requests' plans, three bits each of Q R picking one of PLANS; K: the data in
pieces of K bytes, 0 whole), chunked `S K data` (S % 5 - 1: the piece from which it switches to
raw, -1 never), upstream `H K data` (H bits 0-1: read, pipe, raw, raw; bits 2-3: close, close,
hold, reset). The first run of a target seeds its corpus (build/fuzz/atheris/<target>/corpus/)
with what the tests' hypothesis strategies draw; later runs go on from the corpus.

Not the compiled modules: atheris instruments Python bytecode, and edge's .so files (`make compile`)
would win the import and show no coverage. The edge package's .py files are copied to a
temporary directory put first on sys.path, and imported from there under
`atheris.instrument_imports(include=["edge"])`; the checkout is left as it is (and tests.*,
imported afterwards, get the same instrumented copy).

Each target runs in a child process (libFuzzer ends its process when done): the parent passes
`--seconds` as -max_total_time, reads libFuzzer's report and prints one line per target:
executions, executions per second, coverage (cov: instrumented branches of edge/**/*.py reached;
ft: libFuzzer's features) and crashes, each crashing input's bytes after it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "fuzz" / "atheris"
TARGETS = ("http1", "chunked", "upstream")
SOURCE_ENV = "EDGE_ATHERIS_SOURCE"  # the copy of edge/**/*.py the child imports
SEEDS = 40  # drawn per strategy into an empty corpus
MAX_PIECES = 4096  # as the tests' cuts(): a byte at a time up to 4 KB
# libFuzzer's defaults where they do not fit: a hang is a crash after 60 s (harness.run gives up
# after 30), an input up to 64 KB + a head (a body past the 64 KB chunk bound), and the stats
LIBFUZZER = ("-timeout=60", "-max_len=70000", "-rss_limit_mb=4096", "-print_final_stats=1")

Target = Callable[[bytes], None]


# --- the child: one target under libFuzzer ----------------------------------------------------


def pieces(size: int, k: int) -> list[int]:
    """Cut points for `size` bytes in pieces of `k` (0: whole)."""
    return list(range(k, size, k))[: MAX_PIECES - 1] if k else []


def http1_target() -> tuple[Target, list[bytes]]:
    from tests.fuzzing import Harness, parse_requests, soup
    from tests.http.test_fuzz_server import AFTER_CLOSE, PLANS, broken, requests, run_example

    harness = Harness()
    ends = ("wait", "wait", "close", "reset")

    def one(data: bytes) -> None:
        if len(data) < 5:
            return
        e, p, q, r, k = data[:5]
        wire = data[5:]
        end = ends[e & 3]
        if end == "wait" and parse_requests(wire).end == "partial":
            # the server rightly waits for the rest: a second's settle() that checks nothing
            end = "close"
        bits = q | r << 8
        todo = tuple(PLANS[(bits >> 3 * i & 7) % len(PLANS)] for i in range(1 + (p & 3)))
        run_example(harness, wire, pieces(len(wire), k), todo, 1 << 20 if e & 4 else 64, end)

    drawn = _draw(requests(), SEEDS) + _draw(broken(), SEEDS) + _draw(soup(), SEEDS)
    heads = (b"\x00\x00\x00\x00\x00", b"\x04\x01\x88\x00\x01", b"\x02\x03\x1a\x0b\x07")
    seeds = [heads[i % 3] + d for i, d in enumerate([AFTER_CLOSE, *drawn])]
    return one, seeds


def chunked_target() -> tuple[Target, list[bytes]]:
    from tests.http import test_fuzz_client as tests

    # the test's own body, without hypothesis around it (`inner_test`: hypothesis's documented
    # handle on the undecorated function)
    test: Any = tests.test_chunks_hand_on_only_checked_framing  # (its handle is not typed)
    check: Callable[[bytes, list[int], int], None] = test.hypothesis.inner_test

    def one(data: bytes) -> None:
        if len(data) < 2:
            return
        wire = data[2:]
        check(wire, pieces(len(wire), data[1]), data[0] % 5 - 1)

    heads = (b"\x00\x00", b"\x01\x01", b"\x02\x05", b"\x04\x00")
    drawn = _draw(tests.chunk_stream(), 3 * SEEDS)
    return one, [heads[i % 4] + d for i, d in enumerate(drawn)]


def upstream_target() -> tuple[Target, list[bytes]]:
    from tests.fuzzing import Harness, Script, Wire
    from tests.http.test_fuzz_client import LEADING_CRLF, NUL_REASON, FakeNetLoop, run, script

    harness = Harness(FakeNetLoop())
    hows, ends = ("read", "pipe", "raw", "raw"), ("close", "close", "hold", "reset")

    def one(data: bytes) -> None:
        if len(data) < 2:
            return
        h, k = data[:2]
        wire = Wire(data[2:])
        first = Script(wire, pieces(len(wire), k), ends[h >> 2 & 3])
        run(harness, first, hows[h & 3], valid=False)

    drawn: list[Script] = _draw(script(broken=False), SEEDS) + _draw(script(broken=True), SEEDS)
    seeds = []
    for i, s in enumerate([LEADING_CRLF, NUL_REASON, *drawn]):
        h = ends.index(s.end) << 2 | i % 4
        seeds.append(bytes([h, i % 3]) + s.data)
    return one, seeds


def _draw(strategy: Any, n: int) -> list[Any]:
    """Up to `n` values of a hypothesis strategy (run as a test: `.example()` is for shells)."""
    from hypothesis import HealthCheck, Phase, given, settings

    got: list[Any] = []

    @settings(
        max_examples=n, database=None, deadline=None, phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(strategy)
    def collect(value: Any) -> None:
        got.append(value)

    collect()
    return got


BUILDERS: dict[str, Callable[[], tuple[Target, list[bytes]]]] = {
    "http1": http1_target, "chunked": chunked_target, "upstream": upstream_target,
}  # fmt: skip


def child(target: str, libfuzzer_args: list[str]) -> None:
    """Import the copy of edge instrumented, seed an empty corpus, hand over to libFuzzer."""
    import atheris  # type: ignore[import-untyped]

    source = os.environ[SOURCE_ENV]
    sys.path.insert(0, source)
    with atheris.instrument_imports(include=["edge"]):
        import edge.http.chunked
        import edge.http.client  # noqa: F401  (what the targets reach, instrumented)
        import edge.http.server
    assert edge.http.server.__file__ is not None and edge.http.server.__file__.startswith(source), (
        f"edge imported from {edge.http.server.__file__}, not the copy"
    )
    one, seeds = BUILDERS[target]()
    corpus = OUT / target / "corpus"
    if not any(corpus.iterdir()):
        for i, seed in enumerate(seeds):
            (corpus / f"seed-{i:03d}").write_bytes(seed)
    atheris.Setup([sys.argv[0], *libfuzzer_args], one)
    atheris.Fuzz()


# --- the parent: a child per target, and the summary --------------------------------------------

_RUNS = re.compile(r"stat::number_of_executed_units:\s+(\d+)")
_RATE = re.compile(r"stat::average_exec_per_sec:\s+(\d+)")
_COV = re.compile(r"cov: (\d+) ft: (\d+)")
_CRASH = re.compile(r"Test unit written to (\S+)")


@dataclass
class Result:
    target: str
    runs: int = 0
    rate: int = 0
    cov: int = 0
    ft: int = 0
    seconds: float = 0.0
    code: int = 0
    crashes: list[Path] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.target:<9} {self.runs:>9} execs {self.rate:>6}/s {self.seconds:>5.0f} s "
            f"cov {self.cov:>5} ft {self.ft:>6} crashes {len(self.crashes)}"
            + (f" (exit {self.code})" if self.code and not self.crashes else "")
        )


def run_target(target: str, seconds: int, extra: list[str], source: Path) -> Result:
    (OUT / target / "corpus").mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "loadtests.fuzz_atheris", "--child", target,
        str(OUT / target / "corpus"), f"-max_total_time={seconds}",
        f"-artifact_prefix={OUT / target}/", *LIBFUZZER, *extra,
    ]  # fmt: skip
    env = os.environ | {SOURCE_ENV: str(source)}
    result = Result(target)
    started = time.monotonic()
    with subprocess.Popen(
        command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, errors="replace"
    ) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)  # libFuzzer's progress and any traceback, as they come
            _read(result, line)
    result.seconds = time.monotonic() - started
    result.code = proc.returncode
    return result


def _read(result: Result, line: str) -> None:
    if m := _COV.search(line):
        result.cov, result.ft = int(m[1]), int(m[2])
    if m := _RUNS.search(line):
        result.runs = int(m[1])
    if m := _RATE.search(line):
        result.rate = int(m[1])
    if m := _CRASH.search(line):
        result.crashes.append(Path(m[1]))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    parser.add_argument("--seconds", type=int, default=60, help="per target")
    args, extra = parser.parse_known_args()
    targets = TARGETS if args.target == "all" else (args.target,)
    source = Path(tempfile.mkdtemp(prefix="edge-atheris-"))
    try:
        shutil.copytree(
            ROOT / "edge", source / "edge", ignore=shutil.ignore_patterns("*.so", "__pycache__")
        )
        results = [run_target(t, args.seconds, extra, source) for t in targets]
    finally:
        shutil.rmtree(source, ignore_errors=True)
    print(f"\natheris, {args.seconds} s per target; corpora and crashes under {OUT}")
    for result in results:
        print(result.line())
        for crash in result.crashes:
            data = crash.read_bytes() if crash.exists() else b"(gone)"
            print(f"    {crash}: {data[:400]!r}{'...' if len(data) > 400 else ''}")
    if any(r.crashes or r.code for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()

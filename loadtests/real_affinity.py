"""Affinity on a real engine: does keeping a conversation on its server save the prefill?

    .venv/bin/python loadtests/real_affinity.py     # 2-4 minutes on 2 cores

Three llama.cpp servers (loadtests/llama.py: Gemma 3 270M, one thread, slots of 1024 tokens each,
no RAM cache beyond the slots; see "Slots" below) and one `edge serve` process per mode in front:

    sticky          latency policy, affinity on; clients keep the affinity cookie
    prefix          latency policy, affinity on; clients keep no cookie (prefix hash only)
    round_robin     round_robin, affinity off
    least_inflight  least_inflight, affinity off

Per mode, 8 conversations run concurrently, 4 turns each (a turn is sent when the previous reply
has arrived). Each conversation has its own ~500-token system prompt, distinct per conversation
and per mode from its first token, so no mode benefits from another's cache. Per turn it records
the client-observed time to first token (the first SSE event: llama.cpp sends its headers at once
and its first event with the first token) and `usage.prompt_tokens_details.cached_tokens` from the
stream's include_usage chunk. Reuse of turn n = cached tokens of turn n / prompt tokens of turn
n - 1, capped at 1.0 (the whole previous prompt was still in the slot that served the turn).

Modes run one after the other on the same servers.

Slots: llama.fleet's servers have two slots each (`-np 2 -c 2048`), 6 in all for 8 concurrent
conversations. With `--cache-ram 0` a slot is the only cache, and a server holding three
conversations that take turns tends to evict the slot of the conversation that comes next (a
cyclic access pattern on an LRU cache of two): affinity then saves little on that server, and
the comparison measures the fleet's cache capacity rather than routing. So by default the servers
run three slots of the same 1024 tokens each (`-np 3 -c 3072`: 9 slots for 8 conversations);
`REAL_AFFINITY_SLOTS=2` runs llama.fleet's configuration as it is.

Writes the markdown table to bench-results/real_affinity.md and every turn to
bench-results/real_affinity.json (git-ignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtests import llama  # noqa: E402
from tests.procs import free_port, wait_http  # noqa: E402

MODEL = llama.MODEL_ID
SERVERS = 3
CONVERSATIONS = 8
QUESTIONS = ("Summarise the archive.", "Which drawer has record 91?", "List two ledgers.", "Done?")
MAX_TOKENS = 8
RULES = 21  # about 500 tokens of system prompt with the chat template
SLOTS = int(os.environ.get("REAL_AFFINITY_SLOTS", "3"))  # per server, 1024 tokens each
# routing.load_factor for the affinity modes; empty: the edge's default.
LOAD_FACTOR = os.environ.get("REAL_AFFINITY_LOAD_FACTOR", "")
MODE_LIMIT_S = float(os.environ.get("REAL_AFFINITY_MODE_LIMIT_S", "80"))
REQUEST_LIMIT_S = 60.0
OUT = ROOT / "bench-results" / "real_affinity.md"


@dataclass(frozen=True)
class Mode:
    name: str
    policy: str
    affinity: bool
    cookies: bool


ALL_MODES = (
    Mode("sticky", "latency", True, True),
    Mode("prefix", "latency", True, False),
    Mode("round_robin", "round_robin", False, False),
    Mode("least_inflight", "least_inflight", False, False),
)
# A subset, for a quicker look: REAL_AFFINITY_MODES=sticky,prefix
_CHOSEN = os.environ.get("REAL_AFFINITY_MODES", "")
MODES = tuple(m for m in ALL_MODES if not _CHOSEN or m.name in _CHOSEN.split(","))


@dataclass(frozen=True)
class Turn:
    conversation: int
    index: int  # 1-based
    server: str
    prompt: int
    cached: int
    ttft: float


def system_prompt(mode: str, conversation: int) -> str:
    # Distinct from the first token: llama.cpp reuses a slot's cache only for a common prefix.
    rules = " ".join(
        f"Rule {i}: the archive keeps record {i * 7 + conversation} in drawer {i % 13} beside "
        f"ledger {i * 3 + conversation}."
        for i in range(1, RULES + 1)
    )
    return f"Conversation {mode}-{conversation}. {rules}"


# --- one conversation ---------------------------------------------------------------------------


async def turn(
    client: aiohttp.ClientSession, base: str, messages: list[dict[str, str]]
) -> tuple[str, int, int, float, str]:
    """(server, prompt tokens, cached tokens, time to first token, reply) of one streamed turn."""
    body = {
        "model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    started = time.monotonic()
    ttft = 0.0
    text: list[str] = []
    usage: dict[str, Any] = {}
    async with client.post(f"{base}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        server = resp.headers.get("X-Edge-Server", "?")
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            ttft = ttft or time.monotonic() - started
            event = orjson.loads(line[6:])
            for choice in event.get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
            usage = event.get("usage") or usage
    if not usage:
        raise RuntimeError("the stream ended without its usage chunk")
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
    return server, int(usage["prompt_tokens"]), cached, ttft, "".join(text)


async def conversation(base: str, mode: Mode, number: int, out: list[Turn]) -> None:
    jar: aiohttp.abc.AbstractCookieJar = (
        aiohttp.CookieJar(unsafe=True) if mode.cookies else aiohttp.DummyCookieJar()
    )
    timeout = aiohttp.ClientTimeout(total=REQUEST_LIMIT_S)
    messages = [{"role": "system", "content": system_prompt(mode.name, number)}]
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=timeout) as client:
        for index, question in enumerate(QUESTIONS, 1):
            messages.append({"role": "user", "content": question})
            server, prompt, cached, ttft, reply = await turn(client, base, messages)
            messages.append({"role": "assistant", "content": reply})
            out.append(Turn(number, index, server, prompt, cached, ttft))


async def run_mode(base: str, mode: Mode) -> tuple[list[Turn], float, bool]:
    """Every turn that completed, the wall time, and whether the mode finished in time."""
    turns: list[Turn] = []
    started = time.monotonic()
    tasks = [conversation(base, mode, c, turns) for c in range(CONVERSATIONS)]
    try:
        async with asyncio.timeout(MODE_LIMIT_S):
            await asyncio.gather(*tasks)
        complete = True
    except TimeoutError:
        complete = False
    return turns, time.monotonic() - started, complete


# --- the numbers --------------------------------------------------------------------------------


def reuse(turns: list[Turn]) -> list[float]:
    """For turns 2..4 whose previous turn completed: cached / previous turn's prompt tokens."""
    by_key = {(t.conversation, t.index): t for t in turns}
    out = []
    for t in turns:
        prev = by_key.get((t.conversation, t.index - 1))
        if t.index > 1 and prev is not None:
            # Capped at 1: the previous reply's tokens are in the slot too, so a full hit
            # caches a little more than the previous prompt.
            out.append(min(1.0, t.cached / prev.prompt))
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def row(mode: Mode, turns: list[Turn], complete: bool) -> str:
    ratios = reuse(turns)
    later = [t.ttft for t in turns if t.index > 1]
    first = [t.ttft for t in turns if t.index == 1]
    if not ratios or not later or not first:
        return f"| {mode.name} | 0 | - | - | - | - | - |"
    count = f"{len(ratios)}" + ("" if complete else f" (of {CONVERSATIONS * 3}, timed out)")
    return (
        f"| {mode.name} | {count} | {statistics.fmean(ratios):.2f} "
        f"| {sum(r >= 0.9 for r in ratios) / len(ratios):.0%} "
        f"| {statistics.median(later) * 1000:.0f} ms | {percentile(later, 0.9) * 1000:.0f} ms "
        f"| {statistics.median(first) * 1000:.0f} ms |"
    )


HEADER = (
    "| mode | turns 2-4 | cache-hit ratio (mean reuse) | share of turns >= 90% reused "
    "| median TTFT turns 2-4 | p90 TTFT turns 2-4 | median TTFT turn 1 |\n"
    "| --- | --- | --- | --- | --- | --- | --- |"
)


def spread(turns: list[Turn]) -> float:
    """Mean number of distinct servers a conversation's turns landed on."""
    servers: dict[int, set[str]] = {}
    for t in turns:
        servers.setdefault(t.conversation, set()).add(t.server)
    return statistics.fmean(len(s) for s in servers.values()) if servers else 0.0


def mean_prompt(turns: list[Turn], index: int) -> float:
    prompts = [t.prompt for t in turns if t.index == index]
    return statistics.fmean(prompts) if prompts else 0.0


# --- processes ----------------------------------------------------------------------------------


def start_edge(mode: Mode, servers: list[str], work: Path) -> tuple[str, subprocess.Popen[bytes]]:
    config = work / f"{mode.name}.toml"
    fleet = ", ".join(f'"{url}"' for url in servers)
    routing = f'policy = "{mode.policy}"\naffinity = {str(mode.affinity).lower()}\n'
    if LOAD_FACTOR:
        routing += f"load_factor = {float(LOAD_FACTOR)}\n"
    config.write_text(f'[routing]\n{routing}\n[models."{MODEL}"]\nservers = [{fleet}]\n')
    port = free_port()
    log = open(work / f"{mode.name}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "serve", "--port", str(port), "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    log.close()  # the child has its own descriptor
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/ready", timeout=20.0, proc=proc)
    return url, proc


@contextlib.contextmanager
def fleet(ports: list[int]) -> Iterator[list[str]]:
    """llama.fleet, with SLOTS slots of 1024 tokens per server."""
    if SLOTS == 2:
        with llama.fleet(ports) as urls:
            yield urls
        return
    extra = ("-np", str(SLOTS), "-c", str(1024 * SLOTS))  # the later flags win
    binary, model = llama.server_binary(), llama.model_file()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            proc = subprocess.Popen(
                llama.server_command(binary, model, port, *extra), stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            procs.append(proc)
            llama.wait_ready(f"http://127.0.0.1:{port}", proc)
        yield [f"http://127.0.0.1:{p}" for p in ports]
    finally:
        llama.stop(procs)


async def warm_up(servers: list[str]) -> None:
    """One short request per server: the first one after loading pays one-time costs."""
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as client:
        for url in servers:
            async with client.post(f"{url}/v1/chat/completions", json=body) as resp:
                await resp.read()


async def settle(servers: list[str], within_s: float = 30.0) -> None:
    """Until no server is still working (a mode that timed out leaves cancelled requests)."""
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
        while time.monotonic() < deadline:
            busy = 0.0
            for url in servers:
                async with client.get(f"{url}/metrics") as resp:
                    for line in (await resp.text()).splitlines():
                        if line.startswith(
                            ("llamacpp:requests_processing ", "llamacpp:requests_deferred ")
                        ):
                            busy += float(line.split()[1])
            if not busy:
                return
            await asyncio.sleep(0.2)


async def main() -> int:
    started = time.monotonic()
    lines = [HEADER]
    notes = []
    everything: dict[str, list[Turn]] = {}
    ports = [free_port() for _ in range(SERVERS)]
    with fleet(ports) as servers, tempfile.TemporaryDirectory() as tmp:
        print(f"llama.cpp fleet up: {', '.join(servers)}", flush=True)
        await warm_up(servers)
        edges: list[tuple[str, subprocess.Popen[bytes]]] = []
        try:
            for mode in MODES:
                edges.append(start_edge(mode, servers, Path(tmp)))
            for mode, (url, _) in zip(MODES, edges, strict=True):
                await settle(servers)
                turns, wall, complete = await run_mode(url, mode)
                everything[mode.name] = sorted(turns, key=lambda t: (t.conversation, t.index))
                lines.append(row(mode, turns, complete))
                notes.append(
                    f"- {mode.name}: {len(turns)} turns in {wall:.1f} s, a conversation on "
                    f"{spread(turns):.2f} server(s) on average; prompt tokens turn 1 "
                    f"{mean_prompt(turns, 1):.0f}, turn 4 {mean_prompt(turns, 4):.0f}"
                )
                print(lines[-1], flush=True)
        finally:
            llama.stop([proc for _, proc in edges])
    total = time.monotonic() - started
    report = "\n".join(
        [
            f"{CONVERSATIONS} concurrent conversations x {len(QUESTIONS)} turns per mode, "
            f"{SERVERS} llama.cpp servers "
            f"({MODEL} Q4_K_M, -t 1 -np {SLOTS} -c {1024 * SLOTS}), ~500-token system prompts, "
            f"max_tokens {MAX_TOKENS}; {os.cpu_count()} cores; whole run {total:.0f} s.",
            "",
            *lines,
            "",
            *notes,
            "",
            f"Command: `REAL_AFFINITY_SLOTS={SLOTS} "
            + (f"REAL_AFFINITY_LOAD_FACTOR={LOAD_FACTOR} " if LOAD_FACTOR else "")
            + ".venv/bin/python loadtests/real_affinity.py`",
            "",
        ]
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(report)
    raw = {name: [dataclasses.asdict(t) for t in turns] for name, turns in everything.items()}
    OUT.with_suffix(".json").write_bytes(orjson.dumps(raw, option=orjson.OPT_INDENT_2))
    print("\n" + report, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

"""Mid-stream continuation against real llama.cpp servers (`make test-real`).

Two servers, temperature 0, a 200-token answer; the serving server is killed (SIGKILL) after 40
streamed chunks. The client's stream must complete with no error event, every time; how often the
joined text equals the uninterrupted answer (tokenisation at the splice can differ) is measured
and printed, and quoted in the README: chat over 20 runs, legacy completions over 5 (each run
restarts the killed server: about 11 s a run on 2 cores).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import aiohttp
import orjson
import pytest

from loadtests import llama
from tests.procs import free_port
from tests.real.test_llama import _pid_listening

pytestmark = [pytest.mark.real, pytest.mark.timeout(900)]

MODEL = llama.MODEL_ID
RUNS = {"chat": 20, "completions": 5}
KILL_AFTER = 40  # chunks
ANSWER_TOKENS = 200
CHAT = {
    "model": MODEL, "temperature": 0, "max_tokens": ANSWER_TOKENS, "stream": True,
    "stream_options": {"include_usage": True},
    "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}],
}  # fmt: skip
COMPLETION = {
    "model": MODEL, "temperature": 0, "max_tokens": ANSWER_TOKENS, "stream": True,
    "stream_options": {"include_usage": True},
    "prompt": "The history of the lighthouse begins in the ancient world, when",
}  # fmt: skip


async def _stream(
    client: aiohttp.ClientSession, url: str, body: dict[str, Any], kill_after: int = 0
) -> tuple[str, str, list[dict[str, Any]], bytes]:
    """One streamed answer: the serving server, the text, the events, the raw bytes. With
    `kill_after`, the serving server is killed once that many chunks arrived."""
    chat = "messages" in body
    path = "/v1/chat/completions" if chat else "/v1/completions"
    events: list[dict[str, Any]] = []
    raw: list[bytes] = []
    async with client.post(url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        server = resp.headers["X-Edge-Server"]
        async for line in resp.content:
            raw.append(line)
            if not line.startswith(b"data: {"):
                continue
            events.append(orjson.loads(line[6:]))
            if kill_after and len(events) == kill_after:
                os.kill(_pid_listening(int(server.rsplit(":", 1)[1])), signal.SIGKILL)
    text = "".join(
        (c.get("delta", {}).get("content") or "") if chat else c.get("text", "")
        for e in events
        for c in e.get("choices") or []
    )
    return server, text, events, b"".join(raw)


async def _measure(start_edge: Any, body: dict[str, Any], runs: int) -> tuple[int, int]:
    """`runs` streams, each with its server killed after KILL_AFTER chunks and restarted after:
    (streams that completed whole, joins equal to the uninterrupted answer)."""
    ports = [free_port() for _ in range(2)]
    procs = {port: llama.start_server(port) for port in ports}
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        edge = await start_edge(
            {MODEL: urls}, routing__affinity=False, health__enabled=False,
            outlier__consecutive_failures=100,
        )  # fmt: skip
        async with aiohttp.ClientSession() as client:
            _, reference, _, _ = await _stream(client, edge.url, body)
            assert len(reference) > 100
            whole = equal = 0
            for _ in range(runs):
                server, text, events, raw = await _stream(client, edge.url, body, KILL_AFTER)
                assert b'"error"' not in raw, raw[-300:]
                assert raw.rstrip().endswith(b"data: [DONE]")
                assert len({e["id"] for e in events}) == 1
                usage = events[-1]["usage"]
                assert usage["completion_tokens"] >= ANSWER_TOKENS - 2, usage
                whole += 1
                equal += text == reference
                port = int(server.rsplit(":", 1)[1])
                procs[port].wait(timeout=10)
                procs[port] = llama.start_server(port)
    finally:
        llama.stop(list(procs.values()))
    return whole, equal


@pytest.mark.parametrize("body", [CHAT, COMPLETION], ids=["chat", "completions"])
async def test_killed_server_mid_stream_the_client_stream_completes(
    start_edge: Any, body: dict[str, Any]
) -> None:
    kind = "chat" if "messages" in body else "completions"
    runs = RUNS[kind]
    whole, equal = await _measure(start_edge, body, runs)
    print(
        f"\ncontinuation, llama.cpp {kind}: {whole}/{runs} streams whole after SIGKILL at chunk "
        f"{KILL_AFTER} of {ANSWER_TOKENS}; joined text equal to the uninterrupted answer "
        f"{equal}/{runs}"
    )
    assert whole == runs

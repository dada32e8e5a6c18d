"""The edge in front of real llama.cpp servers with a real model (`make test-real`).

Mocks cannot show that sticky routing saves prefill; a real engine can. The model is a base model
without a chat template, so replies are nonsense: these tests assert on usage and cache counts
(`usage.prompt_tokens_details.cached_tokens`), never on text.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
from collections.abc import Iterator
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from google import genai
from google.genai import types as genai_types

from loadtests import llama
from tests.procs import free_port

pytestmark = [pytest.mark.real, pytest.mark.timeout(600)]

MODEL = llama.MODEL_ID
# About 650 tokens of system prompt: long enough that prefill dominates time to first token.
SYSTEM = " ".join(
    f"Rule {i}: the archive keeps record {i * 7} in drawer {i % 13} beside ledger {i * 3}."
    for i in range(1, 26)
)
QUESTIONS = ["Summarise the archive.", "Which drawer has record 91?", "List two ledgers.", "Done?"]


@pytest.fixture(scope="module")
def servers() -> Iterator[list[str]]:
    ports = [free_port() for _ in range(3)]
    with llama.fleet(ports) as urls:
        yield urls


class Turn:
    def __init__(self, server: str, prompt: int, cached: int, ttft: float) -> None:
        self.server, self.prompt, self.cached, self.ttft = server, prompt, cached, ttft

    def __repr__(self) -> str:
        return f"<Turn {self.server[-5:]} prompt={self.prompt} cached={self.cached}>"


async def _turn(
    client: aiohttp.ClientSession, base: str, messages: list[dict[str, str]], **headers: str
) -> tuple[Turn, str]:
    body = {
        "model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}, "cache_prompt": True,
    }  # fmt: skip
    loop = asyncio.get_running_loop()
    started = loop.time()
    ttft = 0.0
    text: list[str] = []
    usage: dict[str, Any] = {}
    async with client.post(f"{base}/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        server = resp.headers["X-Edge-Server"]
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            ttft = ttft or loop.time() - started
            event = orjson.loads(line[6:])
            for choice in event.get("choices") or []:
                text.append(choice.get("delta", {}).get("content") or "")
            usage = event.get("usage") or usage
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return Turn(server, usage["prompt_tokens"], cached, ttft), "".join(text)


async def _conversation(base: str, *, cookies: bool, turns: int = 4, tag: str = "") -> list[Turn]:
    jar: aiohttp.abc.AbstractCookieJar = (
        aiohttp.CookieJar(unsafe=True) if cookies else aiohttp.DummyCookieJar()
    )
    messages = [{"role": "system", "content": f"{tag}{SYSTEM}"}]
    out = []
    async with aiohttp.ClientSession(cookie_jar=jar) as client:
        for question in QUESTIONS[:turns]:
            messages.append({"role": "user", "content": question})
            turn, reply = await _turn(client, base, messages)
            messages.append({"role": "assistant", "content": reply})
            out.append(turn)
    return out


def _reuse(turns: list[Turn]) -> list[float]:
    """For turns 2..n: cached tokens over the previous turn's prompt tokens."""
    return [t.cached / prev.prompt for prev, t in zip(turns, turns[1:], strict=False)]


async def test_sdks_through_the_edge(start_edge, servers):
    edge = await start_edge({MODEL: servers})
    client = openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key="k", max_retries=0)
    reply = await client.chat.completions.create(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hello"}]
    )
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    stream = await client.chat.completions.create(
        model=MODEL, max_tokens=8, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Hello"}],
    )  # fmt: skip
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    await client.close()
    claude = anthropic.AsyncAnthropic(base_url=edge.url, api_key="k", max_retries=0)
    async with claude.messages.stream(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hello"}]
    ) as events:
        final = await events.get_final_message()
    assert final.usage.output_tokens > 0
    await claude.close()


async def test_every_dialect_through_an_engine_that_speaks_only_openai(start_edge, servers):
    """Gemini's SDK (learnt: llama.cpp answers 404 on Gemini's path) and Anthropic's SDK (llama.cpp
    declared OpenAI-only in [dialects]) through a real engine: the edge translates both ways."""
    learning = await start_edge({MODEL: servers[1:2]})
    async with aiohttp.ClientSession() as session:  # not the SDK's own (aiohttp warns of it)
        options = genai_types.HttpOptions(base_url=learning.url, aiohttp_client=session)
        gem = genai.Client(api_key="k", http_options=options)
        config = genai_types.GenerateContentConfig(max_output_tokens=8, temperature=0)
        reply = await gem.aio.models.generate_content(model=MODEL, contents="Hello", config=config)
        streamed = [
            chunk.text or ""
            async for chunk in await gem.aio.models.generate_content_stream(
                model=MODEL, contents="Hello", config=config
            )
        ]
    assert reply.text and reply.usage_metadata is not None
    assert (reply.usage_metadata.candidates_token_count or 0) > 0
    assert "".join(streamed)
    assert learning.speaks.learnt == 1  # llama.cpp's 404 on Gemini's path, once
    edge = await start_edge({MODEL: servers[:1]}, dialects={servers[0]: ["openai"]})
    claude = anthropic.AsyncAnthropic(base_url=edge.url, api_key="k", max_retries=0)
    async with claude.messages.stream(
        model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hello"}]
    ) as events:
        text = "".join([piece async for piece in events.text_stream])
        final = await events.get_final_message()
    await claude.close()
    assert text and final.usage.output_tokens > 0
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{learning.url}/metrics") as resp:
            learnt = await resp.text()
        async with client.get(f"{edge.url}/metrics") as resp:
            configured = await resp.text()
    assert 'edge_translated_requests_total{from="gemini",to="openai"} 2.0' in learnt
    assert 'edge_translated_requests_total{from="anthropic",to="openai"} 1.0' in configured


async def test_sticky_sessions_reuse_the_kv_cache_round_robin_does_not(start_edge, servers):
    sticky = await start_edge({MODEL: servers}, routing__policy="latency")
    plain = await start_edge(
        {MODEL: servers}, routing__policy="round_robin", routing__affinity=False
    )
    with_cookie = await _conversation(sticky.url, cookies=True, tag="A. ")
    prefix_only = await _conversation(sticky.url, cookies=False, tag="B. ")
    round_robin = await _conversation(plain.url, cookies=True, tag="C. ")
    report = {
        "cookie": _reuse(with_cookie), "prefix": _reuse(prefix_only), "rr": _reuse(round_robin)
    }  # fmt: skip
    print("reuse of the previous turn's prompt, turns 2-4:", report)
    assert len({t.server for t in with_cookie}) == 1, with_cookie
    assert len({t.server for t in prefix_only}) == 1, prefix_only
    assert all(r >= 0.9 for r in report["cookie"]), with_cookie
    assert all(r >= 0.9 for r in report["prefix"]), prefix_only
    assert len({t.server for t in round_robin}) > 1
    assert min(report["rr"]) < 0.5, round_robin  # a turn on a server that never saw it
    # The edge's own measurements see it: first bytes come sooner on hits.
    hits = statistics.median(t.ttft for t in with_cookie[1:] + prefix_only[1:])
    misses = [t.ttft for prev, t in zip(round_robin, round_robin[1:], strict=False)
              if t.cached < 0.5 * prev.prompt]  # fmt: skip
    assert hits < statistics.median(misses)


async def test_edge_ttft_histogram_and_score_follow_hits_and_misses(start_edge, servers):
    sticky = await start_edge({MODEL: servers})
    plain = await start_edge(
        {MODEL: servers}, routing__policy="round_robin", routing__affinity=False
    )
    await _conversation(sticky.url, cookies=True, tag="D. ")
    await _conversation(plain.url, cookies=True, tag="E. ")

    async def mean_ttfb(base: str) -> float:
        async with aiohttp.ClientSession() as client:
            async with client.get(f"{base}/metrics") as resp:
                text = await resp.text()
        sums = counts = 0.0
        for line in text.splitlines():
            if line.startswith("edge_time_to_first_byte_seconds_sum"):
                sums += float(line.rsplit(" ", 1)[1])
            elif line.startswith("edge_time_to_first_byte_seconds_count"):
                counts += float(line.rsplit(" ", 1)[1])
        assert counts >= 4
        return sums / counts

    assert await mean_ttfb(sticky.url) < await mean_ttfb(plain.url)
    scored = [h for h in sticky.view.fleet.models[MODEL] if h.stats.samples]
    assert scored and all(h.stats.ttfb_ewma > 0 for h in scored)


async def test_over_long_prompt_400_passes_through_and_is_not_retried(start_edge, servers):
    edge = await start_edge({MODEL: servers})
    before = sum(h.requests for h in edge.view.fleet.models[MODEL])
    body = {"model": MODEL, "max_tokens": 4,
            "messages": [{"role": "user", "content": "word " * 5000}]}  # fmt: skip
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{edge.url}/v1/chat/completions", json=body) as resp:
            status, doc = resp.status, await resp.json()
    assert status == 400
    assert "exceed_context_size_error" in orjson.dumps(doc).decode()
    assert sum(h.requests for h in edge.view.fleet.models[MODEL]) - before == 1


async def test_killed_server_moves_the_conversation_once_then_it_sticks(start_edge):
    ports = [free_port() for _ in range(2)]
    with llama.fleet(ports) as urls:
        edge = await start_edge({MODEL: urls}, outlier__consecutive_failures=1)
        messages = [{"role": "system", "content": f"F. {SYSTEM}"}]
        turns: list[Turn] = []
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
            for i, question in enumerate(QUESTIONS):
                if i == 2:
                    victim = turns[-1].server
                    pid = _pid_listening(int(victim.rsplit(":", 1)[1]))
                    os.kill(pid, signal.SIGKILL)
                messages.append({"role": "user", "content": question})
                turn, reply = await _turn(client, edge.url, messages)
                messages.append({"role": "assistant", "content": reply})
                turns.append(turn)
    servers = [t.server for t in turns]
    assert servers[0] == servers[1] == victim
    assert servers[2] == servers[3] != victim  # moved once, then sticks
    assert turns[3].cached >= 0.9 * turns[2].prompt  # re-warmed on the new server


def _pid_listening(port: int) -> int:
    """The pid of the llama-server listening on `port` (from /proc, no extra tools)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                cols = row.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":
                    inode = cols[9]
    assert inode is not None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return int(pid)
            except OSError:
                continue
    raise AssertionError(f"no process listens on {port}")

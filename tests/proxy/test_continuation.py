"""Mid-stream continuation, end to end: a real edge, mocks told to die, stall or send an error
event after N chunks, and the official SDKs as clients. The client must get one well-formed
stream whose text is the first host's part followed by the next host's, exactly once.

The mocks answer "tok1 tok2 ... tokN " and continue an answer from where a prefill left it
(edge/dev/mock.py), so the joined text equals the uninterrupted answer exactly.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from edge.dev.mockwire import token_texts
from edge.proxy.continuation import whole_events
from tests.conftest import EdgeUnderTest
from tests.proxy import faults

TOKENS = 20
WHOLE = "".join(token_texts(TOKENS))
MockStarter = Callable[..., Awaitable[str]]
EdgeStarter = Callable[..., Awaitable[EdgeUnderTest]]


async def _fleet(
    start_mock: MockStarter, start_edge: EdgeStarter, count: int = 2, speaks: tuple[str, ...] = (),
    **overrides: Any,
) -> tuple[EdgeUnderTest, list[str]]:  # fmt: skip
    extra = {"speaks": speaks} if speaks else {}
    urls = [
        await start_mock(name=f"mock{i}", models=("m",), tokens=TOKENS, chunk_ms=2.0, **extra)
        for i in range(count)
    ]
    settings: dict[str, Any] = {
        "routing__models": faults.prices(urls),
        "routing__affinity": False,
        "upstream__stall_timeout_s": 0.5,
        "health__enabled": False,
        **overrides,
    }
    edge = await start_edge(models={"m": urls}, **settings)
    return edge, urls


async def _continued(edge: EdgeUnderTest, outcome: str) -> float:
    return await faults.counter(edge.url, "edge_continuations_total", model="m", outcome=outcome)


def _client(edge: EdgeUnderTest) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key="k", max_retries=0)


async def _chat(edge: EdgeUnderTest, **extra: Any) -> tuple[str, list[Any]]:
    """Stream one chat through the SDK: the text and every chunk."""
    async with _client(edge) as client:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True, **extra
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


@pytest.mark.parametrize(
    "fault",
    [
        {"cut_after": 8},  # the host dies between two events
        {"cut_after": 8, "partial": True},  # ... inside an event's chunk
        {"stall_after": 8},  # the host hangs: stall_timeout_s
        {"error_after": 8},  # the host sends an error event (vLLM's engine died)
    ],
    ids=["cut", "cut-inside-chunk", "stall", "error-event"],
)
async def test_a_broken_chat_stream_is_continued_on_another_host(
    start_mock: MockStarter, start_edge: EdgeStarter, fault: dict[str, Any]
) -> None:
    edge, (first, second) = await _fleet(start_mock, start_edge)
    await faults.fault(first, count=1, **fault)
    started = time.monotonic()
    text, chunks = await _chat(edge, stream_options={"include_usage": True})
    assert text == WHOLE  # the first host's part, then the second's, exactly once
    assert time.monotonic() - started < 5.0
    # One stream: one id, created, model and fingerprint; one role delta; usage summed.
    assert len({(c.id, c.created, c.model, c.system_fingerprint) for c in chunks}) == 1
    assert chunks[0].system_fingerprint == "mock0"
    roles = [c for c in chunks if c.choices and c.choices[0].delta.role]
    assert len(roles) == 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == TOKENS
    # The second host was asked to continue what the client had.
    sent = (await faults.mock_requests(second))[-1]["body"]
    assert sent["messages"][-1] == {"role": "assistant", "content": "".join(token_texts(8))}
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    assert await _continued(edge, "ok") == 1.0


async def test_the_raw_stream_is_one_stream_with_one_done(
    start_mock: MockStarter, start_edge: EdgeStarter
) -> None:
    edge, (first, _) = await _fleet(start_mock, start_edge)
    await faults.fault(first, count=1, cut_after=5)
    body = orjson.dumps({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
    })  # fmt: skip
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{edge.url}/v1/chat/completions", data=body) as resp:
            assert resp.status == 200
            raw = await resp.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]" and raw.count(b"[DONE]") == 1
    assert b'"error"' not in raw
    docs = [orjson.loads(e[6:]) for e in events[:-1]]
    assert len({d["id"] for d in docs}) == 1
    text = "".join(d["choices"][0]["delta"].get("content") or "" for d in docs if d["choices"])
    assert text == WHOLE


async def test_max_tokens_is_reduced_by_what_was_sent(
    start_mock: MockStarter, start_edge: EdgeStarter
) -> None:
    edge, (first, second) = await _fleet(start_mock, start_edge)
    await faults.fault(first, count=1, cut_after=6)
    text, chunks = await _chat(edge, max_tokens=12)
    assert text == "".join(token_texts(12))
    assert (await faults.mock_requests(second))[-1]["body"]["max_tokens"] == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


async def test_a_legacy_completion_is_continued(
    start_mock: MockStarter, start_edge: EdgeStarter
) -> None:
    edge, (first, second) = await _fleet(start_mock, start_edge)
    await faults.fault(first, count=1, cut_after=7)
    async with _client(edge) as client:
        stream = await client.completions.create(model="m", prompt="Say: ", stream=True)
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == WHOLE
    assert len({c.id for c in chunks}) == 1
    sent = (await faults.mock_requests(second))[-1]["body"]
    assert sent["prompt"] == "Say: " + "".join(token_texts(7))


async def test_a_third_break_ends_with_the_error_event(
    start_mock: MockStarter, start_edge: EdgeStarter
) -> None:
    edge, urls = await _fleet(start_mock, start_edge, count=3)
    for url, after in zip(urls, (4, 3, 2), strict=True):
        await faults.fault(url, count=1, cut_after=after)
    async with _client(edge) as client:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        got: list[str] = []
        with pytest.raises(openai.APIError, match="failed"):
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content or "")
    # Two continuations (routing.max_continuations), each whole up to its own break.
    assert "".join(got) == "".join(token_texts(4 + 3 + 2))
    assert await _continued(edge, "ok") == 2.0
    assert await _continued(edge, "failed") == 1.0


async def test_tool_call_streams_are_not_continued(
    start_mock: MockStarter, start_edge: EdgeStarter
) -> None:
    edge, (first, second) = await _fleet(start_mock, start_edge)
    await faults.fault(first, count=1, cut_after=1)
    tools: Any = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    async with _client(edge) as client:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True, tools=tools
        )
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
    assert await faults.mock_requests(second) == []
    assert await _continued(edge, "refused") == 1.0


@pytest.mark.parametrize("where", ["routing", "model"])
async def test_continuation_off_ends_with_the_error_event(
    start_mock: MockStarter, start_edge: EdgeStarter, where: str
) -> None:
    if where == "routing":
        edge, (first, second) = await _fleet(start_mock, start_edge, routing__continuation=False)
    else:  # off for this model only: [routing.models."m"] continuation = false
        urls = [await start_mock(name=f"mock{i}", models=("m",), tokens=TOKENS) for i in (0, 1)]
        models = faults.prices(urls)
        models["m"]["continuation"] = False
        edge = await start_edge(
            models={"m": urls}, routing__models=models, routing__affinity=False,
            health__enabled=False,
        )  # fmt: skip
        first, second = urls
    await faults.fault(first, count=1, cut_after=3)
    with pytest.raises(openai.APIError):
        await _chat(edge)
    assert await faults.mock_requests(second) == []


async def test_a_pinned_stream_is_not_continued_elsewhere(
    start_mock: MockStarter, start_edge: EdgeStarter
) -> None:
    edge, (first, second) = await _fleet(start_mock, start_edge)
    await faults.fault(first, count=1, cut_after=3)
    with pytest.raises(openai.APIError):
        await _chat(edge, extra_headers={"X-Edge-Server": first})
    assert await faults.mock_requests(second) == []


async def test_an_anthropic_stream_translated_for_openai_hosts_is_continued(
    start_mock: MockStarter, start_edge: EdgeStarter
) -> None:
    edge, (first, second) = await _fleet(start_mock, start_edge, speaks=("openai",))
    # The first request learns that the hosts speak only OpenAI's API (a 404, then translated).
    await faults.fault(first, count=1, cut_after=6)
    async with anthropic.AsyncAnthropic(base_url=edge.url, api_key="k", max_retries=0) as client:
        async with client.messages.stream(
            model="m", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
    assert text == WHOLE
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == TOKENS
    sent = (await faults.mock_requests(second))[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["messages"][-1]["role"] == "assistant"


async def test_a_non_streamed_answer_cut_mid_body_is_retried_whole(
    start_edge: EdgeStarter, start_mock: MockStarter
) -> None:
    from tests.rawupstream import RawUpstream

    # Announces 4000 bytes, sends 100, and closes: nothing reached the client yet.
    dying = RawUpstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n"
    )
    dying_url = await dying.start()
    good = await start_mock(name="good", models=("m",), tokens=TOKENS)
    edge = await start_edge(
        models={"m": [dying_url, good]}, routing__models=faults.prices([dying_url, good]),
        routing__affinity=False, health__enabled=False,
    )  # fmt: skip
    try:
        await dying.pieces.put(b'{"id": "x", "choices": [{"message": {"content": "tok')
        await dying.pieces.put(None)  # close
        async with _client(edge) as client:
            answer = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
        assert answer.choices[0].message.content == WHOLE
        assert answer.system_fingerprint == "good"
    finally:
        await dying.close()


@pytest.mark.parametrize("fault", [{"cut_after": 7}, {"error_after": 7}], ids=["cut", "error"])
async def test_an_anthropic_stream_from_a_native_host_is_continued(
    start_mock: MockStarter, start_edge: EdgeStarter, fault: dict[str, Any]
) -> None:
    # The mocks speak Anthropic's API themselves: the stream is relayed as it comes, and its
    # continuation goes through OpenAI's API, translated back into the client's stream.
    edge, (first, second) = await _fleet(start_mock, start_edge)
    await faults.fault(first, count=1, **fault)
    async with anthropic.AsyncAnthropic(base_url=edge.url, api_key="k", max_retries=0) as client:
        async with client.messages.stream(
            model="m", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
    assert text == WHOLE
    assert [block.type for block in final.content] == ["text"]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == TOKENS
    assert (await faults.mock_requests(first))[-1]["path"] == "/v1/messages"
    sent = (await faults.mock_requests(second))[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["messages"][-1] == {
        "role": "assistant", "content": "".join(token_texts(7))
    }  # fmt: skip


@pytest.mark.parametrize("fault", [{"cut_after": 5}, {"error_after": 5}], ids=["cut", "error"])
async def test_a_gemini_stream_from_a_native_host_is_continued(
    start_mock: MockStarter, start_edge: EdgeStarter, fault: dict[str, Any]
) -> None:
    from google import genai
    from google.genai import types as gtypes

    edge, (first, second) = await _fleet(start_mock, start_edge)
    await faults.fault(first, count=1, **fault)
    async with aiohttp.ClientSession() as session:  # not the SDK's own (aiohttp warns of it)
        options = gtypes.HttpOptions(base_url=edge.url, aiohttp_client=session)
        client = genai.Client(api_key="k", http_options=options)
        chunks = [
            chunk
            async for chunk in await client.aio.models.generate_content_stream(
                model="m", contents="hi"
            )
        ]
    assert "".join(chunk.text or "" for chunk in chunks) == WHOLE
    assert chunks[-1].candidates is not None
    assert chunks[-1].candidates[0].finish_reason == gtypes.FinishReason.STOP
    assert (await faults.mock_requests(second))[-1]["path"] == "/v1/chat/completions"


async def test_a_stream_past_the_total_timeout_is_not_continued(
    start_mock: MockStarter, start_edge: EdgeStarter
) -> None:
    # upstream.total_timeout_s bounds the request, not each host: its end is no break to mend.
    edge, (first, second) = await _fleet(start_mock, start_edge, upstream__total_timeout_s=0.4)
    await faults.fault(first, count=1, chunk_ms=100.0)  # a 2 s stream
    with pytest.raises(openai.APIError):
        await _chat(edge)
    assert await faults.mock_requests(second) == []
    assert await _continued(edge, "ok") == 0.0


@pytest.mark.parametrize(
    ("data", "whole"),
    [
        (b"", b""),
        (b"dat", b""),  # no separator at all: rfind's -1 once made this b"dat"
        (b"data: a\n\ndata: b", b"data: a\n\n"),
        (b"data: a\r\n\r\nda", b"data: a\r\n\r\n"),
        (b"data: a\n\ndata: b\r\n\r\n", b"data: a\n\ndata: b\r\n\r\n"),
    ],
)
def test_whole_events_keeps_only_complete_events(data: bytes, whole: bytes) -> None:
    assert whole_events(data) == whole

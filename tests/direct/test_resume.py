"""Mid-stream continuation in edge.direct: a stream cut after its first byte goes on from another
host, and the SDK reads one whole stream (as through the edge: tests/proxy/test_continuation.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

import edge.direct
from edge.dev.mockwire import token_texts
from edge.direct.resume import Resumable, continuable
from tests.procs import Procs, free_port
from tests.proxy.faults import fault, mock_requests, prices

MODEL = "m"
TOKENS = 20
WHOLE = "".join(token_texts(TOKENS))
HI: Any = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def pair() -> Iterator[list[str]]:
    """Two mocks; the price policy sends every first attempt to the first."""
    procs = Procs()
    extra = ("--tokens", str(TOKENS), "--chunk-ms", "2")
    try:
        yield [procs.mock(free_port(), MODEL, name=f"c{i}", extra=extra) for i in range(2)]
    finally:
        procs.stop_all()


def settings(urls: list[str], **more: Any) -> dict[str, Any]:
    return {"models": {MODEL: urls}, "routing__models": prices(urls), **more}


@pytest.mark.parametrize(
    "broken",
    [
        {"cut_after": 8},  # the host dies between two events
        {"cut_after": 8, "partial": True},  # ... inside an event's chunk
        {"error_after": 8},  # the engine's error event
        {"stall_after": 8},  # silent, the connection open
    ],
    ids=["cut", "partial", "error_event", "stall"],
)
async def test_a_broken_chat_stream_is_continued_sync_and_async(
    pair: list[str], broken: dict[str, Any]
) -> None:
    first, second = pair
    sync = edge.direct.transport(**settings(pair, stall_timeout_s=0.5))
    client = openai.OpenAI(
        base_url="http://direct/v1", api_key="k", http_client=httpx2.Client(transport=sync)
    )
    await fault(first, count=1, **broken)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HI, stream=True, stream_options={"include_usage": True}
        )
    )
    check(chunks)
    sent = (await mock_requests(second))[-1]["body"]
    assert sent["messages"][-1] == {"role": "assistant", "content": "".join(token_texts(8))}
    assert sent["continue_final_message"] is True
    client.close()
    sync.close()
    aio = edge.direct.async_transport(**settings(pair, stall_timeout_s=0.5))
    aclient = openai.AsyncOpenAI(
        base_url="http://direct/v1", api_key="k", http_client=httpx2.AsyncClient(transport=aio)
    )
    await fault(first, count=1, **broken)
    stream = await aclient.chat.completions.create(
        model=MODEL, messages=HI, stream=True, stream_options={"include_usage": True}
    )
    check([c async for c in stream])
    await aclient.close()
    await aio.aclose()


def check(chunks: list[Any]) -> None:
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == WHOLE  # the first host's part, then the second's, exactly once
    assert len({(c.id, c.created, c.model, c.system_fingerprint) for c in chunks}) == 1
    assert chunks[0].system_fingerprint == "c0"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.role]) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == TOKENS


async def test_a_stream_that_cannot_be_continued_breaks_as_it_broke(pair: list[str]) -> None:
    """Continuation off: the SDK sees the connection's error, as it would from the host."""
    transport = edge.direct.transport(**settings(pair), continuation=False)
    client = openai.OpenAI(
        base_url="http://direct/v1", api_key="k", http_client=httpx2.Client(transport=transport)
    )
    await fault(pair[0], count=1, cut_after=4)
    with pytest.raises(openai.APIConnectionError):
        list(client.chat.completions.create(model=MODEL, messages=HI, stream=True))
    client.close()
    transport.close()


def test_only_whole_events_reach_the_client_while_a_stream_can_be_continued() -> None:
    resume = Resumable({"stream": True}, chat=True, keep=1000, limit=2)
    assert resume.take(b"dat") == b""  # no event ends in it: held
    assert resume.take(b'a: {"a":1}\n\ndata: {"b"') == b'data: {"a":1}\n\n'
    assert resume.take(b":2}\r\n\r\n") == b'data: {"b":2}\r\n\r\n'
    assert resume.take(b'data: {"error": {"message": "x"}}\n\n') is None
    assert resume.held() == b'data: {"error": {"message": "x"}}\n\n'
    assert resume.held() == b""
    big = Resumable({}, chat=True, keep=8, limit=2)
    assert big.take(b"0123456789") == b"0123456789"  # past the bound: passed on, given up
    assert big.next() is None


def test_continuable_requests() -> None:
    chat: dict[str, Any] = {"stream": True}
    assert continuable("/v1/chat/completions", chat, 2, False, {}) is True
    assert continuable("/v1/completions?x=1", chat, 2, False, {}) is False
    assert continuable("/v1/chat/completions", chat, 1, False, {}) is None  # one host
    assert continuable("/v1/chat/completions", chat, 2, True, {}) is None  # pinned
    assert continuable("/v1/chat/completions", {"stream": True, "n": 2}, 2, False, {}) is None
    assert continuable("/v1/chat/completions", {}, 2, False, {}) is None  # not streamed
    assert continuable("/v1/embeddings", chat, 2, False, {}) is None
    assert continuable("/v1/chat/completions", chat, 2, False, {"content-encoding": "gzip"}) is None

"""Traces end to end: a real edge exports OTLP/HTTP to a real receiver on loopback
(tests/observe/otlp_receiver.py, decoding with opentelemetry-proto), mock engines record the
`traceparent` they were sent, and the real SDKs read the error bodies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from edge.access.keys import FileBackend, create_key
from edge.app import Worker, bind
from edge.config import TracingSettings, from_mapping
from edge.observe.tracing import build, sampling
from tests.observe.otlp_receiver import OtlpReceiver, Span
from tests.proxy.faults import fault, mock_requests, prices
from tests.rawupstream import RawUpstream

MODEL = "mock-model"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE}-{PARENT}-01"
UNSAMPLED = f"00-{TRACE}-{PARENT}-00"
PROMPT = "the secret prompt text 7f3a"


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    found = OtlpReceiver()
    await found.start()
    yield found
    await found.close()


def traced(receiver: OtlpReceiver, ratio: float = 1.0, **more: Any) -> dict[str, Any]:
    """The edge's overrides: tracing on, exported to `receiver` within 50 ms."""
    return {
        "tracing__enabled": True, "tracing__endpoint": receiver.url,
        "tracing__sample_ratio": ratio, "tracing__schedule_delay_s": 0.05, **more,
    }  # fmt: skip


def chat(content: str = "hello") -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4}


def one(spans: list[Span], kind: str) -> Span:
    found = [s for s in spans if s.kind == kind]
    assert len(found) == 1, spans
    return found[0]


async def test_a_clients_trace_goes_on_through_the_attempt_to_the_engine(
    receiver, start_mock, start_edge
):
    mock = await start_mock(tokens=4)
    edge = await start_edge(models={MODEL: [mock]}, **traced(receiver, ratio=0.0))
    async with openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key="k", max_retries=0) as c:
        raw = await c.chat.completions.with_raw_response.create(
            **chat(), extra_headers={"traceparent": SAMPLED, "tracestate": "vendor=abc,x=1"}
        )
    assert raw.parse().usage is not None
    spans = await receiver.wait(2)
    request, attempt = one(spans, "server"), one(spans, "client")
    # The request span continues the client's trace (sampled: traced whatever the ratio).
    assert (request.trace_id, request.parent_id) == (TRACE, PARENT)
    assert (attempt.trace_id, attempt.parent_id) == (TRACE, request.span_id)
    # The engine was sent the attempt's span as its parent, and the client's tracestate.
    sent = (await mock_requests(mock))[-1]["headers"]
    assert sent["traceparent"] == f"00-{TRACE}-{attempt.span_id}-01"
    assert sent["tracestate"] == "vendor=abc,x=1"
    # The client learns the edge's span of its request (W3C Trace Context Level 2).
    assert raw.headers["traceresponse"] == f"00-{TRACE}-{request.span_id}-01"
    a = request.attributes
    assert request.name == f"chat {MODEL}" and request.status == 0
    assert a["http.request.method"] == "POST" and a["url.path"] == "/v1/chat/completions"
    assert a["http.response.status_code"] == 200 and a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == a["gen_ai.response.model"] == MODEL
    assert a["gen_ai.usage.output_tokens"] == 4 and a["gen_ai.usage.input_tokens"] > 0
    assert a["edge.attempts"] == 1 and a["edge.outcome"] == "ok" and a["edge.dialect"] == "openai"
    port = int(mock.rpartition(":")[2])
    b = attempt.attributes
    assert (b["server.address"], b["server.port"]) == ("127.0.0.1", port)
    assert (b["edge.attempt.kind"], b["edge.attempt.outcome"]) == ("first", "ok")
    assert b["http.response.status_code"] == 200 and b["edge.attempt.ttfb_s"] > 0
    assert [name for name, _ in attempt.events] == ["edge.first_byte"]
    assert request.start_ns <= attempt.start_ns < attempt.end_ns <= request.end_ns
    assert request.resource["service.name"] == "edge" and request.scope == "edge"


async def test_a_failover_shows_both_attempts_each_sent_its_own_parent(
    receiver, start_mock, start_edge
):
    broken = RawUpstream(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    bad, good = await broken.start(), await start_mock(tokens=3)
    edge = await start_edge(
        models={MODEL: [bad, good]}, routing__models=prices([bad, good], MODEL), **traced(receiver)
    )
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{edge.url}/v1/chat/completions", json=chat()) as resp:
                assert resp.status == 200, await resp.text()
        spans = await receiver.wait(3)
    finally:
        await broken.close()
    request = one(spans, "server")
    attempts = sorted((s for s in spans if s.kind == "client"), key=lambda s: s.start_ns)
    assert [s.attributes["edge.attempt.kind"] for s in attempts] == ["first", "retry"]
    first, retry = attempts
    assert all(s.parent_id == request.span_id and s.trace_id == request.trace_id for s in attempts)
    assert request.parent_id == "" and request.attributes["edge.attempts"] == 2
    assert first.attributes["edge.attempt.outcome"] == "http_5xx" and first.status == 2
    assert first.attributes["http.response.status_code"] == 503
    assert first.attributes["error.type"] == "http_5xx" and first.attributes["edge.attempt.blame"]
    assert retry.attributes["edge.attempt.outcome"] == "ok" and retry.status == 0
    assert first.end_ns <= retry.start_ns
    # Each host got the traceparent of its own attempt.
    posted = [r for r in broken.requests if r.startswith(b"POST ")]
    assert f"traceparent: 00-{request.trace_id}-{first.span_id}-01".encode() in posted[0]
    sent = (await mock_requests(good))[-1]["headers"]
    assert sent["traceparent"] == f"00-{request.trace_id}-{retry.span_id}-01"


async def test_a_stream_continued_elsewhere_shows_the_continuation_attempt(
    receiver, start_mock, start_edge
):
    urls = [await start_mock(name=f"mock{i}", tokens=12, chunk_ms=2.0) for i in range(2)]
    edge = await start_edge(
        models={MODEL: urls}, routing__models=prices(urls, MODEL), routing__affinity=False,
        health__enabled=False, **traced(receiver),
    )  # fmt: skip
    await fault(urls[0], count=1, cut_after=5)
    async with aiohttp.ClientSession() as session:
        body = {**chat(), "stream": True, "max_tokens": 12}
        async with session.post(f"{edge.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200 and (await resp.read()).count(b"[DONE]") == 1
    spans = await receiver.wait(3)
    request = one(spans, "server")
    attempts = sorted((s for s in spans if s.kind == "client"), key=lambda s: s.start_ns)
    kinds = [
        (s.attributes["edge.attempt.kind"], s.attributes["edge.attempt.outcome"]) for s in attempts
    ]
    assert kinds == [("first", "stream_error"), ("continuation", "ok")]
    assert all(s.parent_id == request.span_id for s in attempts)
    sent = (await mock_requests(urls[1]))[-1]["headers"]
    assert sent["traceparent"] == f"00-{request.trace_id}-{attempts[1].span_id}-01"
    assert request.attributes["edge.stream"] and request.attributes["edge.outcome"] == "ok"


async def test_no_span_holds_a_key_or_the_prompt(receiver, start_mock, start_edge, tmp_path):
    store_path = str(tmp_path / "keys.json")
    store = FileBackend(store_path)
    record, key = create_key(store, "tracer", workspace="0123456789abcdef01234567")
    mock = await start_mock(tokens=2)
    edge = await start_edge(
        models={MODEL: [mock]}, auth__mode="keys", auth__key_store=store_path,
        auth__upstream_keys={mock: "server-secret-9c1d"}, **traced(receiver),
    )  # fmt: skip
    gemini = f"{edge.url}/v1beta/models/{MODEL}:generateContent?key={key}"
    async with openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key=key, max_retries=0) as c:
        await c.chat.completions.create(**chat(PROMPT))
    async with aiohttp.ClientSession() as session:
        body = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}
        async with session.post(gemini, json=body) as resp:
            assert resp.status == 200, await resp.text()
    spans = await receiver.wait(4)
    assert {s.attributes.get("edge.key_id") for s in spans if s.kind == "server"} == {record.id}
    assert {s.attributes.get("edge.workspace") for s in spans if s.kind == "server"} == {
        "0123456789abcdef01234567"
    }
    assert any(s.name == "edge.admission" for s in spans)
    for span in spans:
        seen = json.dumps([span.name, span.attributes, span.events, span.resource], default=str)
        for secret in (key, PROMPT, "server-secret-9c1d", "secret prompt"):
            assert secret not in seen, (span.name, secret)


async def test_unsampled_requests_make_no_span_and_keep_the_clients_context(
    receiver, start_mock, start_edge
):
    mock = await start_mock(tokens=2)
    edge = await start_edge(models={MODEL: [mock]}, **traced(receiver, ratio=0.0))
    async with aiohttp.ClientSession() as session:
        url = f"{edge.url}/v1/chat/completions"
        async with session.post(url, json=chat()) as resp:  # no parent, ratio 0: not traced
            assert resp.status == 200 and "traceresponse" not in resp.headers
        headers = {"traceparent": UNSAMPLED, "tracestate": "k=v"}
        async with session.post(url, json=chat(), headers=headers) as resp:
            assert resp.status == 200 and "traceresponse" not in resp.headers
        sent = await mock_requests(mock)
        assert "traceparent" not in sent[0]["headers"]  # nothing invented for an untraced one
        assert sent[1]["headers"]["traceparent"] == UNSAMPLED  # passed on as the client sent
        assert sent[1]["headers"]["tracestate"] == "k=v"
        assert edge.tracing is not None and edge.tracing.begun == 0
        async with session.post(url, json=chat(), headers={"traceparent": SAMPLED}) as resp:
            assert resp.status == 200
    spans = await receiver.wait(2)
    await asyncio.sleep(0.2)  # anything else exported would have arrived by now
    assert {s.trace_id for s in receiver.spans} == {TRACE} and len(receiver.spans) == 2
    assert edge.tracing.begun == 1 and edge.tracing.exported == len(spans)


async def test_tracing_off_passes_context_and_logs_and_errors_name_the_trace(
    start_mock, start_edge, tmp_path
):
    mock = await start_mock(tokens=2)
    log = tmp_path / "access.log"
    edge = await start_edge(models={MODEL: [mock]}, log__mode="file", log__path=str(log))
    assert edge.tracing is None and edge.proxy.tracer is None
    headers = {"traceparent": SAMPLED, "tracestate": "k=v"}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{edge.url}/v1/chat/completions", json=chat(), headers=headers
        ) as resp:
            assert resp.status == 200 and "traceresponse" not in resp.headers
    sent = (await mock_requests(mock))[-1]["headers"]
    assert (sent["traceparent"], sent["tracestate"]) == (SAMPLED, "k=v")
    # Every dialect's SDK still reads an error body that names the trace.
    async with openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key="k", max_retries=0) as c:
        with pytest.raises(openai.NotFoundError) as oa:
            await c.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "x"}], extra_headers=headers
            )
    assert oa.value.body["trace_id"] == TRACE  # type: ignore[index]
    assert oa.value.code == "model_not_found"
    async with anthropic.AsyncAnthropic(base_url=edge.url, api_key="k", max_retries=0) as c:
        with pytest.raises(anthropic.NotFoundError) as an:
            await c.messages.create(
                model="nope", max_tokens=4, messages=[{"role": "user", "content": "x"}],
                extra_headers=headers,
            )  # fmt: skip
    assert an.value.body["error"]["trace_id"] == TRACE  # type: ignore[index]
    assert an.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    async with aiohttp.ClientSession() as session:
        options = genai_types.HttpOptions(
            base_url=edge.url, aiohttp_client=session, headers=headers
        )
        gem = genai.Client(api_key="k", http_options=options)
        with pytest.raises(genai_errors.ClientError) as gm:
            await gem.aio.models.generate_content(model="nope", contents="x")
    assert gm.value.code == 404 and gm.value.status == "NOT_FOUND"
    assert gm.value.details["error"]["trace_id"] == TRACE
    # Without a traceparent, no trace id is made up.
    async with aiohttp.ClientSession() as session:
        body = {"model": "nope", "messages": []}
        async with session.post(f"{edge.url}/v1/chat/completions", json=body) as resp:
            assert "trace_id" not in (await resp.json())["error"]
    edge.access.flush()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["trace_id"] for line in lines] == [TRACE] * 4 + [None]


async def test_error_replies_of_a_traced_request_name_its_span(receiver, start_edge):
    edge = await start_edge(models={MODEL: ["http://127.0.0.1:9"]}, **traced(receiver))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{edge.url}/v1/chat/completions", json=chat()) as resp:
            assert resp.status == 503
            said = await resp.json()
            traceresponse = resp.headers["traceresponse"]
    spans = await receiver.wait(2)
    request = one(spans, "server")
    assert traceresponse == f"00-{request.trace_id}-{request.span_id}-01"
    assert said["error"]["trace_id"] == request.trace_id
    assert request.status == 2 and request.attributes["error.type"] == "edge_error"
    attempt = one(spans, "client")
    assert attempt.attributes["edge.attempt.outcome"] == "connect_error"


async def test_the_drain_exports_what_is_queued(receiver, start_mock):
    mock = await start_mock(tokens=2)
    config = from_mapping(
        {"models": {MODEL: {"servers": [mock]}}},
        **traced(receiver, tracing__schedule_delay_s=60.0),
    )
    worker = Worker(config)
    sock = bind("127.0.0.1", 0, reuse_port=False)
    await worker.start(sock)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(url, json=chat()) as resp:
                assert resp.status == 200
    await asyncio.sleep(0.1)
    assert receiver.spans == []  # the batch waits for its delay ...
    await worker.drain()  # ... or the drain
    assert len(receiver.spans) == 6


async def test_a_collector_that_is_down_holds_the_drain_no_longer_than_its_bound(start_mock):
    mock = await start_mock(tokens=2)
    dead = OtlpReceiver()
    dead.url = "http://127.0.0.1:9"  # nothing listens: every export is refused, then retried
    config = from_mapping(
        {"models": {MODEL: {"servers": [mock]}}},
        **traced(dead, tracing__flush_timeout_s=0.5, tracing__schedule_delay_s=60.0),
    )
    worker = Worker(config)
    sock = bind("127.0.0.1", 0, reuse_port=False)
    await worker.start(sock)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=chat()) as resp:
            assert resp.status == 200  # the request never waits for the exporter
    began = asyncio.get_running_loop().time()
    await worker.drain()
    assert asyncio.get_running_loop().time() - began < 3.0


def test_sampling_follows_the_config_then_otels_variables() -> None:
    assert sampling(TracingSettings(sample_ratio=0.25), {}) == (0.25, True)
    unset = TracingSettings()
    assert sampling(unset, {}) == (1.0, True)
    env = {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    assert sampling(unset, env) == (0.1, False)
    env = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"}
    assert sampling(unset, env) == (1.0, True)
    assert sampling(unset, {"OTEL_TRACES_SAMPLER": "parentbased_always_off"}) == (0.0, True)
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER"):
        sampling(unset, {"OTEL_TRACES_SAMPLER": "jaeger_remote"})
    assert build(TracingSettings()) is None
    assert build(TracingSettings(enabled=True), {"OTEL_SDK_DISABLED": "true"}) is None


async def test_a_queued_request_shows_its_wait_as_a_queue_span(receiver, start_mock, start_edge):
    # One host with room for one request ([admission]); the second request waits in the edge
    # for the first (the mock takes 0.3 s to its first token) and its trace shows that wait.
    mock = await start_mock(tokens=3, ttft_ms=300)
    edge = await start_edge(
        models={MODEL: [mock]}, admission__servers={mock: 1}, **traced(receiver)
    )
    async with openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key="k", max_retries=0) as c:
        first = asyncio.create_task(c.chat.completions.create(**chat("one")))
        await asyncio.sleep(0.05)
        await c.chat.completions.create(**chat("two"), extra_headers={"X-Edge-Priority": "4"})
        await first
    spans = await receiver.wait(6)
    requests = {s.span_id: s for s in spans if s.kind == "server"}
    queues = [s for s in spans if s.name == "edge.queue"]
    assert len(requests) == 2 and len(queues) == 2
    for queue in queues:
        assert queue.parent_id in requests and queue.trace_id == requests[queue.parent_id].trace_id
    waits = sorted((q.end_ns - q.start_ns) / 1e9 for q in queues)
    assert waits[0] < 0.05 and waits[1] > 0.1, waits  # the first went at once, the second waited
    second = max(queues, key=lambda q: q.end_ns - q.start_ns)
    assert second.attributes["edge.queue.priority"] == 4
    # Its attempt started when the wait ended, not before.
    attempt = next(s for s in spans if s.kind == "client" and s.parent_id == second.parent_id)
    assert attempt.start_ns >= second.end_ns - 1_000_000


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "anthropic-translated"])
async def test_the_error_event_of_a_broken_stream_names_the_trace(start_mock, start_edge, dialect):
    # One host (nothing to continue on) that closes its stream after a few chunks: it ends
    # with the edge's error event, which names the client's trace as error bodies do.
    speaks = ("openai",) if dialect == "anthropic-translated" else ("openai", "anthropic")
    mock = await start_mock(tokens=20, speaks=speaks)
    edge = await start_edge(models={MODEL: [mock]})
    await fault(mock, cut_after=3)
    if dialect == "openai":
        path, body = "/v1/chat/completions", {**chat(), "stream": True}
    else:
        path = "/v1/messages"
        body = {"model": MODEL, "max_tokens": 20, "stream": True,
                "messages": [{"role": "user", "content": "hello"}]}  # fmt: skip
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{edge.url}{path}", json=body, headers={"traceparent": SAMPLED}
        ) as resp:
            assert resp.status == 200
            text = (await resp.read()).decode()
    errors = [
        json.loads(line[len("data: ") :])
        for line in text.splitlines()
        if line.startswith("data: ") and '"error"' in line
    ]
    assert len(errors) == 1, text
    assert errors[0]["error"]["trace_id"] == TRACE

"""A fake model server speaking the OpenAI, Anthropic and Gemini wire formats.

It is the upstream for the proxy's tests and throughput benchmarks, so answers are
deterministic, cheap to produce, and scriptable per request through X-Mock-* headers.

A test control of the mock only (never of the edge, which forwards only API paths): `POST
/_mock/fault` with a JSON `Fault` (`{}` clears it) makes every request that follows (or the next
`count`) slower, failing with a status (and a Retry-After), or its stream cut off, stalled or
ended by an error event after some events, until the next one; `GET /_mock/fault` says which is
in force. Chaos runs (loadtests/chaos) switch faults with it.
`GET /_mock/requests` lists the last requests the model endpoints read (path and parsed body,
newest last), so a test sees what the edge sent upstream; `DELETE /_mock/requests` forgets them.

`MockOptions.speaks` names the dialects served: an unspoken one has no route and answers vLLM's
404, as the engines people run do, so tests exercise the edge's translation to OpenAI. A chat
request with `tools` is answered with one tool call (edge/dev/mockwire.py: tool_call).

`MockOptions.context` (or X-Mock-Context) is the model's context length: a prompt whose words plus
the completion asked for (max_tokens, else the answer's tokens) exceed it gets each host's 400.

Continuation, as engines do it: a chat (or Anthropic) request whose last message is the
assistant's, a Gemini one whose last content is the model's, and a legacy completions prompt that
ends with the mock's own "tok1 ... tokk " continue the same answer from tok(k+1), in a stream of
their own (a new id, the role delta first). So an answer cut after k tokens and continued reads,
joined, exactly as the uninterrupted one. `continue_final_message: true` (vLLM's way) needs
`add_generation_prompt: false` and answers vLLM's 400 otherwise; without it the final assistant
message is continued anyway (llama.cpp's way).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import math
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from multidict import istr

from edge.dev.mockwire import (
    Events,
    Fault,
    Reject,
    Turn,
    anthropic_error,
    anthropic_events,
    context_reject,
    cut_connection,
    embedding_inputs,
    encode_vector,
    gemini_chunks,
    gemini_merge,
    gemini_sse,
    google_error,
    json_array,
    limit_of,
    openai_error,
    openai_events,
    openai_held,
    openai_usage,
    prefilled,
    prompt_words,
    relevance,
    rerank_text,
    tool_call,
    vector,
    words,
)
from edge.dialects import ANTHROPIC, GEMINI, OPENAI

__all__ = ["Fault", "MockOptions", "add_arguments", "build_app", "options_from_args", "serve"]

SERVER_HEADER = istr("X-Mock-Server")
TTFT_HEADER = istr("X-Mock-TTFT-Ms")
CHUNK_HEADER = istr("X-Mock-Chunk-Ms")
TOKENS_HEADER = istr("X-Mock-Tokens")
STATUS_HEADER = istr("X-Mock-Status")
CONTEXT_HEADER = istr("X-Mock-Context")
_OVERRIDES = (TTFT_HEADER, CHUNK_HEADER, TOKENS_HEADER, CONTEXT_HEADER)

_DIALECTS = (OPENAI, ANTHROPIC, GEMINI)
REQUEST_LOG = 32  # requests GET /_mock/requests remembers, newest last
TOOL_TOKENS = 5  # completion tokens a tool call counts, whatever the budget: its arguments are few
STALL_CAP_S = 3600.0  # a stalled stream's silence ends (the connection cut) after this at most
# How often a stalled stream looks whether its client has left: aiohttp cancels no handler when
# one does (unless its runner sets handler_cancellation, which test runners do not).
STALL_POLL_S = 0.05

# (chat?, streamed?) -> OpenAI "object" field; legacy completions use one name for both
_OPENAI_OBJECTS = {
    (True, False): "chat.completion",
    (True, True): "chat.completion.chunk",
    (False, False): "text_completion",
    (False, True): "text_completion",
}


@dataclass(frozen=True, slots=True)
class MockOptions:
    port: int = 9001
    host: str = "127.0.0.1"
    models: tuple[str, ...] = ("mock-model",)
    name: str = "mock"
    ttft_ms: float = 0.0
    chunk_ms: float = 0.0
    tokens: int = 16
    fail_rate: float = 0.0
    # An idle keep-alive connection is closed after this (aiohttp's default; uvicorn, under
    # vLLM, closes after 5 s): clients' pools must expect it.
    keepalive_s: float = 75.0
    # The dialects served; OpenAI's always (every engine speaks it), the others optionally.
    speaks: tuple[str, ...] = _DIALECTS
    # The model's context length in tokens (prompt words + completion); 0: unlimited.
    context: int = 0

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a mock must serve at least one model")
        if OPENAI not in self.speaks or not set(self.speaks) <= set(_DIALECTS):
            raise ValueError(f"speaks must name openai and any of anthropic, gemini: {self.speaks}")
        numbers = (self.ttft_ms, self.chunk_ms, self.tokens, self.keepalive_s, self.context)
        if any(n < 0 for n in numbers):
            raise ValueError("delays, token counts, keepalive_s and context must be >= 0")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError("fail_rate must be within [0, 1]")


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one request behaves once header overrides (and a fault) are applied."""

    ttft_ms: float
    chunk_ms: float
    tokens: int
    context: int = 0  # the model's context length; 0: unlimited
    stop_after: int = -1  # body events streamed before the stream stops; -1: all of them
    stop: str = ""  # how: "cut" (the connection dropped), "stall" (silence) or "error" (an event)
    partial: bool = False  # a cut sends half of the next event's chunk first


Renderer = Callable[[Reject], dict[str, Any]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Routed = Callable[[web.Request, _Plan], Awaitable[web.StreamResponse]]


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json")


async def _unspoken(request: web.Request) -> web.StreamResponse:
    """A dialect's path on a server that lacks it: vLLM's (FastAPI's) 404, before any body."""
    return _json({"detail": "Not Found"}, 404)


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _header(headers: Mapping[str, str], name: str, default: float, integral: bool = False) -> float:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = int(raw) if integral else float(raw)
    except ValueError:
        raise Reject(400, f"{name} must be a number, got {raw!r}") from None
    if value < 0 or not math.isfinite(value):
        raise Reject(400, f"{name} must be a finite number >= 0, got {raw!r}")
    return value


async def _pause(ms: float) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000)


async def _read_json(request: web.Request) -> tuple[bytes, dict[str, Any]]:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Reject(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Reject(400, "request body must be a JSON object")
    return raw, body


async def _stream(
    request: web.Request, plan: _Plan, events: Events, content_type: str = "text/event-stream"
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
    await resp.prepare(request)
    try:
        await _pause(plan.ttft_ms)
        for event in events.head:
            await resp.write(event)
        for sent, event in enumerate(events.body):
            if sent == plan.stop_after:
                await _stop(request, resp, plan, events.error(sent), event)
                return resp
            await _pause(plan.chunk_ms)
            await resp.write(event)
        for event in events.tail:
            await resp.write(event)
    except ConnectionResetError:
        pass  # the client hung up mid-stream; there is nobody left to answer
    return resp


async def _stop(
    request: web.Request, resp: web.StreamResponse, plan: _Plan, error: tuple[bytes, ...], at: bytes
) -> None:
    """A fault's end of a stream before event `at`: an error event and a clean end, silence, or
    the connection dropped."""
    if plan.stop == "error":
        await _pause(plan.chunk_ms)
        for event in error:
            await resp.write(event)
        return
    if plan.stop == "stall":
        await _stall(request)
    if request.transport is not None:
        chunked = resp.headers.get("Transfer-Encoding") == "chunked"
        cut_connection(request.transport, at if plan.partial and chunked else b"")


async def _stall(request: web.Request) -> None:
    """Silence until the client leaves (its transport is gone), STALL_CAP_S at most."""
    for _ in range(math.ceil(STALL_CAP_S / STALL_POLL_S)):
        if request.transport is None or request.transport.is_closing():
            return
        await asyncio.sleep(STALL_POLL_S)


def _called(turn: Turn, body: dict[str, Any]) -> Turn:
    """The chat turn as one tool call where the request asks for one; else unchanged."""
    call = tool_call(body)
    return turn if call is None else Turn(turn.model, turn.prompt, TOOL_TOKENS, False, call)


class _Mock:
    """Handlers bound to one server's options; holds only read-only precomputed pieces."""

    def __init__(self, opts: MockOptions) -> None:
        self.opts = opts
        self.models = frozenset(opts.models)
        self.default_plan = _Plan(opts.ttft_ms, opts.chunk_ms, opts.tokens, opts.context)
        self.rng = random.Random()
        self.fault: Fault | None = None
        self.fault_left = 0  # requests the fault still applies to, when it has a count
        # Bodies kept as parsed, not copied: cheap, and the handlers only read them.
        self.requests: deque[tuple[str, dict[str, Any], dict[str, str]]] = deque(maxlen=REQUEST_LOG)
        created = int(time.time())
        listing = [
            {"id": m, "object": "model", "created": created, "owned_by": opts.name}
            for m in opts.models
        ]
        self.models_body = orjson.dumps({"object": "list", "data": listing})

    async def tag(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[SERVER_HEADER] = self.opts.name

    def guarded(self, handler: Routed, shape: Renderer) -> Handler:
        async def run(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request, self.plan(request))
            except Reject as err:
                answer = _json((err.shape or shape)(err), err.status)
                answer.headers.update(err.headers or {})
                return answer

        return run

    def plan(self, request: web.Request) -> _Plan:
        headers, base = request.headers, self.default_plan
        if STATUS_HEADER in headers:
            raise self.scripted_failure(headers)
        if self.opts.fail_rate and self.rng.random() < self.opts.fail_rate:
            raise Reject(503, f"mock {self.opts.name} failed on purpose", code="mock_failure")
        if any(name in headers for name in _OVERRIDES):
            base = _Plan(
                _header(headers, TTFT_HEADER, base.ttft_ms),
                _header(headers, CHUNK_HEADER, base.chunk_ms),
                int(_header(headers, TOKENS_HEADER, base.tokens, integral=True)),
                int(_header(headers, CONTEXT_HEADER, base.context, integral=True)),
            )
        return base if self.fault is None else self.faulty(base, self.fault)

    def faulty(self, plan: _Plan, fault: Fault) -> _Plan:
        if fault.count:  # this request is one of the fault's last `count`
            self.fault_left -= 1
            self.fault = self.fault if self.fault_left > 0 else None
        if fault.status and self.rng.random() < fault.rate:
            message = f"mock {self.opts.name} fails on purpose (fault {fault.status})"
            retry = {"Retry-After": fault.retry_after} if fault.retry_after else None
            raise Reject(fault.status, message, code="mock_fault", headers=retry)
        ttft, chunk = plan.ttft_ms + fault.ttft_ms, plan.chunk_ms + fault.chunk_ms
        stop_after, stop = fault.stream_stop()
        return _Plan(ttft, chunk, plan.tokens, plan.context, stop_after, stop, fault.partial)

    # --- test control -------------------------------------------------------------

    async def set_fault(self, request: web.Request) -> web.StreamResponse:
        try:
            _, body = await _read_json(request)
            self.fault = Fault(**body) if body else None
            self.fault_left = self.fault.count if self.fault else 0
        except Reject as err:
            return _json(openai_error(err), err.status)
        except (TypeError, ValueError) as exc:  # an unknown field, a bad value
            return _json(openai_error(Reject(400, f"bad fault: {exc}")), 400)
        return await self.get_fault(request)

    async def get_fault(self, request: web.Request) -> web.StreamResponse:
        fault = self.fault or Fault()
        left = self.fault_left if fault.count else None  # None: until the next POST
        return _json({"active": self.fault is not None, **dataclasses.asdict(fault), "left": left})

    async def list_requests(self, request: web.Request) -> web.StreamResponse:
        return _json(
            [{"path": p, "body": body, "headers": headers} for p, body, headers in self.requests]
        )

    async def clear_requests(self, request: web.Request) -> web.StreamResponse:
        self.requests.clear()
        return web.Response(status=204)

    async def received(self, request: web.Request) -> tuple[bytes, dict[str, Any]]:
        """A model endpoint's body, read, parsed and logged. Requests refused before it is read
        (a scripted status, fail_rate, a fault's status, an unspoken dialect) are not logged."""
        raw, body = await _read_json(request)
        # The header fields too (lower-cased; repeated ones joined by ", "): what a key looked like.
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        self.requests.append((request.path, body, headers))
        return raw, body

    def scripted_failure(self, headers: Mapping[str, str]) -> Reject:
        status = int(_header(headers, STATUS_HEADER, 0, integral=True))
        if not 400 <= status <= 599:
            return Reject(400, f"{STATUS_HEADER} must be within 400..599, got {status}")
        message = f"scripted failure from mock {self.opts.name}"
        return Reject(status, message, code="mock_status", shape=openai_error)

    async def model_body(self, request: web.Request) -> tuple[bytes, dict[str, Any], str]:
        raw, body = await self.received(request)
        model = body.get("model")
        if not isinstance(model, str) or model not in self.models:
            message = f"The model `{model}` does not exist on mock {self.opts.name}"
            raise Reject(404, message, param="model", code="model_not_found")
        return raw, body, model

    def turn(
        self, model: str, prompt: int, plan: _Plan, limit: int | None, dialect: str, held: int = 0
    ) -> Turn:
        """The answer from token held+1 on, `limit` tokens at most; refused with the dialect's
        400 where the prompt and the completion asked for (the limit, else all the answer has
        left) exceed the plan's context."""
        left = max(0, plan.tokens - held)
        asked = left if limit is None else limit
        if plan.context and prompt + asked > plan.context:
            raise context_reject(dialect, plan.context, prompt, asked)
        if limit is None or limit >= left:
            return Turn(model, prompt, left, truncated=False, start=held)
        return Turn(model, prompt, limit, truncated=True, start=held)

    def common(self, model: str, chat: bool, stream: bool) -> dict[str, Any]:
        """Fields every OpenAI answer and chunk shares."""
        return {
            "id": _new_id("chatcmpl-" if chat else "cmpl-"),
            "object": _OPENAI_OBJECTS[chat, stream],
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": self.opts.name,
        }

    # --- OpenAI -----------------------------------------------------------------

    async def chat(self, request: web.Request, plan: _Plan) -> web.StreamResponse:
        return await self.openai(request, plan, chat=True)

    async def completions(self, request: web.Request, plan: _Plan) -> web.StreamResponse:
        return await self.openai(request, plan, chat=False)

    async def openai(self, request: web.Request, plan: _Plan, chat: bool) -> web.StreamResponse:
        _, body, model = await self.model_body(request)
        # Only one of messages / prompt is present, so summing serves both endpoints.
        prompt = prompt_words(body.get("messages"), "content") + words(body.get("prompt"))
        limit = limit_of(body, "max_completion_tokens", "max_tokens")
        turn = self.turn(model, prompt, plan, limit, OPENAI, openai_held(body, chat))
        turn = _called(turn, body) if chat else turn
        if body.get("stream") is True:
            base = self.common(turn.model, chat, stream=True)
            events = openai_events(base, turn, chat, _include_usage(body))
            return await _stream(request, plan, events)
        answer = self.common(turn.model, chat, stream=False)
        text: dict[str, Any] = {"message": turn.chat_message()} if chat else {"text": turn.text}
        answer["choices"] = [{"index": 0, **text, "logprobs": None, "finish_reason": turn.finish}]
        answer["usage"] = openai_usage(turn)
        await _pause(plan.ttft_ms)
        return _json(answer)

    async def embeddings(self, request: web.Request, plan: _Plan) -> web.StreamResponse:
        _, body, model = await self.model_body(request)
        inputs = embedding_inputs(body.get("input"))
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise Reject(400, "encoding_format must be float or base64", param="encoding_format")
        data = [
            {"object": "embedding", "index": i, "embedding": encode_vector(vector(item), encoding)}
            for i, item in enumerate(inputs)
        ]
        used = sum(words(item) for item in inputs)
        usage = {"prompt_tokens": used, "total_tokens": used}
        await _pause(plan.ttft_ms)
        return _json({"object": "list", "data": data, "model": model, "usage": usage})

    async def rerank(self, request: web.Request, plan: _Plan) -> web.StreamResponse:
        _, body, model = await self.model_body(request)
        query, docs = body.get("query"), body.get("documents")
        if not isinstance(query, str) or not isinstance(docs, list):
            raise Reject(400, "rerank needs a query string and a documents list")
        texts = [rerank_text(doc) for doc in docs]
        top_n = limit_of(body, "top_n")
        scored = [{"index": i, "relevance_score": relevance(query, t)} for i, t in enumerate(texts)]
        scored.sort(key=lambda r: -r["relevance_score"])
        usage = {"total_tokens": words(query) + words(texts)}
        await _pause(plan.ttft_ms)
        results = scored if top_n is None else scored[:top_n]
        return _json({"id": _new_id("rerank-"), "model": model, "results": results, "usage": usage})

    async def echo(self, request: web.Request, plan: _Plan) -> web.StreamResponse:
        raw, _, _ = await self.model_body(request)
        headers: dict[str, str] = {}
        seen: dict[str, str] = {}  # lower-cased name -> first spelling received
        for name, value in request.headers.items():
            key = seen.setdefault(name.lower(), str(name))  # orjson rejects istr keys
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        await _pause(plan.ttft_ms)
        return _json(
            {
                "server": self.opts.name,
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "headers": headers,
                "body_sha256": hashlib.sha256(raw).hexdigest(),
                "body_len": len(raw),
            }
        )

    # --- Anthropic ----------------------------------------------------------------

    async def messages(self, request: web.Request, plan: _Plan) -> web.StreamResponse:
        _, body, model = await self.model_body(request)
        messages = body.get("messages")
        prompt = words(body.get("system")) + prompt_words(messages, "content")
        held = prefilled(messages, "assistant", "content")
        turn = self.turn(model, prompt, plan, limit_of(body, "max_tokens"), ANTHROPIC, held)
        message = self.anthropic_message(turn)
        if body.get("stream") is True:
            return await _stream(request, plan, anthropic_events(message, turn))
        message["content"] = [{"type": "text", "text": turn.text}]
        message["stop_reason"] = "max_tokens" if turn.truncated else "end_turn"
        message["usage"]["output_tokens"] = turn.completion
        await _pause(plan.ttft_ms)
        return _json(message)

    def anthropic_message(self, turn: Turn) -> dict[str, Any]:
        return {
            "id": _new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": turn.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": turn.prompt, "output_tokens": 1},
        }

    # --- Gemini -------------------------------------------------------------------

    async def gemini(self, request: web.Request, plan: _Plan) -> web.StreamResponse:
        model, _, method = request.match_info["target"].rpartition(":")
        if method not in ("generateContent", "streamGenerateContent"):
            raise Reject(404, f"method {method!r} is not served by mock {self.opts.name}")
        if model not in self.models:
            raise Reject(404, f"models/{model} is not found on mock {self.opts.name}")
        _, body = await self.received(request)
        config = body.get("generationConfig")
        limit = limit_of(config, "maxOutputTokens") if isinstance(config, dict) else None
        system, contents = body.get("systemInstruction"), body.get("contents")
        prompt = prompt_words(contents, "parts")
        prompt += words(system.get("parts")) if isinstance(system, dict) else 0
        held = prefilled(contents, "model", "parts")
        chunks = gemini_chunks(self.turn(model, prompt, plan, limit, GEMINI, held))
        if method == "generateContent":
            await _pause(plan.ttft_ms)
            return _json(gemini_merge(chunks))
        if request.query.get("alt") == "sse":
            return await _stream(request, plan, gemini_sse(chunks))
        return await _stream(request, plan, json_array(chunks), "application/json")

    # --- misc ---------------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.models_body, content_type="application/json")

    async def health(self, request: web.Request) -> web.StreamResponse:
        return _json({"status": "ok"})

    async def model_health(self, request: web.Request) -> web.StreamResponse:
        model = request.match_info["model"]
        if model in self.models:
            return _json({"status": "ok", "model": model})
        return _json({"status": "not_found", "model": model}, 404)


def build_app(opts: MockOptions) -> web.Application:
    mock = _Mock(opts)
    app = web.Application()
    app.on_response_prepare.append(mock.tag)
    add = app.router.add_post
    add("/v1/chat/completions", mock.guarded(mock.chat, openai_error))
    add("/v1/completions", mock.guarded(mock.completions, openai_error))
    add("/v1/embeddings", mock.guarded(mock.embeddings, openai_error))
    add("/v1/rerank", mock.guarded(mock.rerank, openai_error))
    _speak(app, mock, ANTHROPIC, "/v1/messages", mock.guarded(mock.messages, anthropic_error))
    gemini = mock.guarded(mock.gemini, google_error)
    _speak(app, mock, GEMINI, "/v1beta/models/{target:.+}", gemini)
    _speak(app, mock, GEMINI, "/v1/models/{target:.+}", gemini)  # the SDK's default since 2.0
    app.router.add_route("*", "/v1/echo", mock.guarded(mock.echo, openai_error))
    app.router.add_get("/v1/models", mock.list_models)
    app.router.add_get("/health", mock.health)
    app.router.add_get("/health/{model:.+}", mock.model_health)
    app.router.add_post("/_mock/fault", mock.set_fault)
    app.router.add_get("/_mock/fault", mock.get_fault)
    app.router.add_get("/_mock/requests", mock.list_requests)
    app.router.add_delete("/_mock/requests", mock.clear_requests)
    return app


def _speak(app: web.Application, mock: _Mock, dialect: str, path: str, handler: Handler) -> None:
    # An unspoken dialect's path answers as vLLM answers any unrouted one, for every method, so
    # the edge can learn the gap from a 404 the way it will from a real engine.
    if dialect in mock.opts.speaks:
        app.router.add_post(path, handler)
    else:
        app.router.add_route("*", path, _unspoken)


def _non_negative(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
        if value < 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {raw!r}")
        return value

    return parse


def _probability(raw: str) -> float:
    value = _non_negative(float)(raw)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be within [0, 1]: {raw!r}")
    return value


def _dialect_list(raw: str) -> tuple[str, ...]:
    speaks = tuple(name.strip() for name in raw.split(","))
    try:
        MockOptions(speaks=speaks)  # one rule, MockOptions's
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return speaks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = MockOptions()
    parser.add_argument("--port", type=int, default=d.port, help="TCP port (0 picks a free one)")
    parser.add_argument("--host", default=d.host, help="address to bind")
    parser.add_argument(
        "--model", action="append", help=f"model to serve; repeatable (default {d.models[0]})"
    )
    parser.add_argument("--name", default=d.name, help="server id sent in X-Mock-Server")
    parser.add_argument("--ttft-ms", type=_non_negative(float), default=d.ttft_ms)
    parser.add_argument("--chunk-ms", type=_non_negative(float), default=d.chunk_ms)
    parser.add_argument("--tokens", type=_non_negative(int), default=d.tokens)
    parser.add_argument(
        "--context", type=_non_negative(int), default=d.context,
        help="the model's context length in tokens (prompt words + completion); 0: unlimited",
    )  # fmt: skip
    parser.add_argument("--fail-rate", type=_probability, default=d.fail_rate)
    parser.add_argument(
        "--keepalive-s", type=_non_negative(float), default=d.keepalive_s,
        help="idle keep-alive connections are closed after this",
    )  # fmt: skip
    parser.add_argument(
        "--speaks", type=_dialect_list, default=d.speaks,
        help="dialects served, comma-separated, openai included (default openai,anthropic,gemini)",
    )  # fmt: skip


def options_from_args(ns: argparse.Namespace) -> MockOptions:
    return MockOptions(
        port=ns.port,
        host=ns.host,
        models=tuple(ns.model) if ns.model else MockOptions().models,
        name=ns.name,
        ttft_ms=ns.ttft_ms,
        chunk_ms=ns.chunk_ms,
        tokens=int(ns.tokens),
        fail_rate=ns.fail_rate,
        keepalive_s=ns.keepalive_s,
        speaks=ns.speaks,
        context=int(ns.context),
    )


async def serve(opts: MockOptions) -> None:
    """Serve until cancelled; the printed line doubles as a readiness signal for scripts."""
    runner = web.AppRunner(
        build_app(opts), handle_signals=False, access_log=None, keepalive_timeout=opts.keepalive_s
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, opts.host, opts.port, reuse_address=True)
        await site.start()
        port = runner.addresses[0][1] if runner.addresses else opts.port
        models = ",".join(opts.models)
        print(f"mock {opts.name} serving {models} on http://{opts.host}:{port}", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()

"""What the mock model server (edge/dev/mock.py) writes in each dialect: OpenAI's usage and tool
calls, Anthropic's SSE events, Gemini's chunks and JSON-array stream, all built from one generated
`Turn`; its errors (`Reject`) in each dialect's shape, vLLM's own among them (context length, a
stream that fails mid-answer); the `Fault` it can be told to commit; what it reads from a request
(its tokens by word count, its limits, and how much of the answer a prefill already holds: the
mock's own "tok1 ... tokk " ending it, for a continuation); and its deterministic embedding vectors
and rerank scores."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import orjson

from edge.dialects import ANTHROPIC, GEMINI

SSE_DONE = b"data: [DONE]\n\n"
# What vLLM streams when generation fails mid-answer (its GenerationError; an engine that died
# says "EngineCore encountered an issue..." in the same shape), and Google's text for a 500.
STREAM_FAILURE = "Internal server error"
GEMINI_FAILURE = (
    "An internal error has occurred. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting"
)
_EMBEDDING_DIM = 8
_VECTOR = struct.Struct(f"<{_EMBEDDING_DIM}f")
_RAW_VECTOR = struct.Struct(f"<{_EMBEDDING_DIM}i")


# A required tool argument of each JSON-schema type, filled so that the call validates.
_FILLERS: dict[str, Any] = {
    "string": "mock",
    "integer": 1,
    "number": 1.5,
    "boolean": True,
    "array": [],
    "object": {},
}
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
# status -> (Anthropic error type, Google status name)
_DIALECT_NAMES = {
    400: ("invalid_request_error", "INVALID_ARGUMENT"),
    401: ("authentication_error", "UNAUTHENTICATED"),
    403: ("permission_error", "PERMISSION_DENIED"),
    404: ("not_found_error", "NOT_FOUND"),
    429: ("rate_limit_error", "RESOURCE_EXHAUSTED"),
    500: ("api_error", "INTERNAL"),
    503: ("overloaded_error", "UNAVAILABLE"),
    529: ("overloaded_error", "UNAVAILABLE"),
}


@dataclass(eq=False)
class Reject(Exception):
    """A request answered with an error; the route picks the dialect unless shape is set."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    shape: Callable[[Reject], dict[str, Any]] | None = None
    kind: str | None = None  # the error's type name, where the shape's default is not the one
    headers: dict[str, str] | None = None  # sent with the answer (a fault's Retry-After)


def vllm_error(err: Reject) -> dict[str, Any]:
    """vLLM's ErrorResponse (v0.10.1 and later: nested, `code` the HTTP status as a number)."""
    kind = err.kind or ("InternalServerError" if err.status >= 500 else "BadRequestError")
    return {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.status}}


def openai_failure(sent: int) -> tuple[bytes, ...]:
    """vLLM's end of a chat or completions stream whose generation failed: the error as one more
    `data:` event, then [DONE] all the same (serving_chat.py, serving_completion.py: the except
    around the generator, then `yield "data: [DONE]"`), so the body ends cleanly."""
    return (sse(vllm_error(Reject(500, STREAM_FAILURE))), SSE_DONE)


def context_reject(dialect: str, context: int, prompt: int, completion: int) -> Reject:
    """The 400 for a prompt of `prompt` tokens that asks for `completion` more where the model
    holds `context`, worded as each host words it."""
    total = prompt + completion
    if dialect == ANTHROPIC:  # Anthropic's API: the prompt alone, or with max_tokens
        if prompt > context:
            return Reject(400, f"prompt is too long: {prompt} tokens > {context} maximum")
        message = (
            f"input length and `max_tokens` exceed context limit: {prompt} + {completion} > "
            f"{context}, decrease input length or `max_tokens` and try again"
        )
        return Reject(400, message)
    if dialect == GEMINI:  # Google counts the input only; the budget's share is the mock's
        extra = "" if prompt > context else f" plus maxOutputTokens ({completion})"
        message = (
            f"The input token count ({prompt}){extra} exceeds the maximum number of tokens "
            f"allowed ({context})."
        )
        return Reject(400, message)
    # vLLM v0.18 .. v0.30 (vllm/renderers/params.py, a VLLMValidationError whose str() appends
    # the parameter): older ones said "However, you requested T tokens (P in the messages, M in
    # the completion)"; "maximum context length is C tokens" is in every version's text.
    message = (
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{completion} output tokens and your prompt contains at least {prompt} input tokens, "
        f"for a total of at least {total} tokens. Please reduce the length of the input prompt "
        f"or the number of requested output tokens. (parameter=input_tokens, value={prompt})"
    )
    return Reject(400, message, param="input_tokens", shape=vllm_error)


def continuation_refusal(body: dict[str, Any]) -> Reject | None:
    """vLLM's 400 for `continue_final_message` without `add_generation_prompt: false`: set true,
    its request validator refuses (a FastAPI validation error: type "Bad Request"); left out (it
    defaults to true), the chat template does (transformers' apply_chat_template)."""
    if not body.get("continue_final_message"):
        return None
    generation_prompt = body.get("add_generation_prompt")
    if generation_prompt:
        message = (
            "Value error, Cannot set both `continue_final_message` and "
            "`add_generation_prompt` to True."
        )
        return Reject(400, message, kind="Bad Request", shape=vllm_error)
    if generation_prompt is None:
        message = (
            "continue_final_message and add_generation_prompt are not compatible. Use "
            "continue_final_message when you want the model to continue the final message, and "
            "add_generation_prompt when you want to add a header that will prompt it to start a "
            "new assistant message instead."
        )
        return Reject(400, message, shape=vllm_error)
    return None


def openai_error(err: Reject) -> dict[str, Any]:
    fallback = "server_error" if err.status >= 500 else "invalid_request_error"
    kind = _OPENAI_TYPES.get(err.status, fallback)
    return {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}


def _dialect_names(status: int) -> tuple[str, str]:
    return _DIALECT_NAMES.get(status) or _DIALECT_NAMES[500 if status >= 500 else 400]


def anthropic_error(err: Reject) -> dict[str, Any]:
    kind = _dialect_names(err.status)[0]
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def google_error(err: Reject) -> dict[str, Any]:
    status = _dialect_names(err.status)[1]
    return {"error": {"code": err.status, "message": err.message, "status": status}}


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The one function call an OpenAI chat answer makes instead of text."""

    id: str
    name: str
    arguments: str  # a JSON object, as a string: OpenAI's wire shape

    def message(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": self.arguments}
        call = {"id": self.id, "type": "function", "function": function}
        return {"role": "assistant", "content": None, "tool_calls": [call]}

    def deltas(self) -> Iterator[dict[str, Any]]:
        """Streamed as OpenAI does: the call named with empty arguments, then the arguments in
        pieces, so that clients (and translators) must join them."""
        function = {"name": self.name, "arguments": ""}
        yield {
            "tool_calls": [{"index": 0, "id": self.id, "type": "function", "function": function}]
        }
        for piece in _thirds(self.arguments):
            yield {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}


@dataclass(frozen=True, slots=True)
class Turn:
    """One generated answer: who asked, how much was read, how much is written, the tool call it
    makes instead of text, if any, and how many of the answer's tokens the request already held
    (a continuation writes tok(start+1) onwards)."""

    model: str
    prompt: int
    completion: int
    truncated: bool
    call: ToolCall | None = None
    start: int = 0

    @property
    def text(self) -> str:
        return "".join(self.pieces())

    def pieces(self) -> Iterator[str]:
        return token_texts(self.completion, self.start)

    @property
    def finish(self) -> str:
        if self.call is not None:
            return "tool_calls"
        return "length" if self.truncated else "stop"

    def chat_message(self) -> dict[str, Any]:
        if self.call is not None:
            return self.call.message()
        return {"role": "assistant", "content": self.text}


@dataclass(frozen=True, slots=True)
class Events:
    """A stream's events: head right after TTFT, body paced one per chunk delay, then tail; or,
    where a fault fails the stream after `sent` body events, error(sent) instead of the rest."""

    head: Iterable[bytes]
    body: Iterable[bytes]
    tail: Iterable[bytes]
    error: Callable[[int], tuple[bytes, ...]]


@dataclass(frozen=True, slots=True)
class Fault:
    """What the mock does wrong to the requests that follow a `POST /_mock/fault` (a test control
    of the mock: edge/dev/mock.py): to every one until the next POST, or to the next `count`.

    Of the stream faults (cut_after, stall_after, error_after) one at most is set; each counts
    body events (tokens), after the head (OpenAI's role delta, Anthropic's message_start...).
    Non-streamed answers are whole whatever they say."""

    ttft_ms: float = 0.0  # added to each request's time to first token ...
    chunk_ms: float = 0.0  # ... and to the pause before each streamed event
    status: int = 0  # answer this status (400..599) instead, ...
    rate: float = 1.0  # ... to this share of requests, ...
    retry_after: str = ""  # ... with this Retry-After header (needs status)
    cut_after: int = -1  # streams: the connection is dropped after this many events; -1: never
    partial: bool = False  # ... with half of the next event's chunk sent (it died mid-write)
    # streams: silent after this many events, the connection left open (a hung host) until the
    # client leaves, or STALL_CAP_S (edge/dev/mock.py) has passed; -1: never
    stall_after: int = -1
    # streams: after this many events, the dialect's error event (vLLM's when its engine dies
    # mid-stream), and the stream ends as a whole body; -1: never
    error_after: int = -1
    count: int = 0  # model requests this fault applies to before it clears itself; 0: all

    def __post_init__(self) -> None:
        numbers = (self.ttft_ms, self.chunk_ms, self.rate)
        if any(isinstance(v, bool) or not isinstance(v, int | float) for v in numbers):
            raise ValueError("ttft_ms, chunk_ms and rate must be numbers")
        integers = (self.status, self.cut_after, self.stall_after, self.error_after, self.count)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in integers):
            raise ValueError("status, count and the *_after fields must be integers")
        if not isinstance(self.partial, bool):
            raise ValueError("partial must be true or false")
        if self.ttft_ms < 0 or self.chunk_ms < 0 or not 0.0 <= self.rate <= 1.0:
            raise ValueError("delays must be >= 0 and rate within [0, 1]")
        if self.status and not 400 <= self.status <= 599 or self.count < 0:
            raise ValueError("status must be 0 or 400..599, count >= 0")
        self._check_stream_faults()
        self._check_retry_after()

    def _check_stream_faults(self) -> None:
        afters = (self.cut_after, self.stall_after, self.error_after)
        if any(v < -1 for v in afters):
            raise ValueError("cut_after, stall_after and error_after must be >= -1")
        if sum(v >= 0 for v in afters) > 1:
            raise ValueError("one of cut_after, stall_after and error_after at most")

    def _check_retry_after(self) -> None:
        value = self.retry_after
        if not isinstance(value, str) or not all(" " <= c <= "~" for c in value):
            raise ValueError("retry_after must be a string of printable ASCII")
        if value and not self.status:
            raise ValueError("retry_after is sent with a status: set status too")

    def stream_stop(self) -> tuple[int, str]:
        """(events before the stream stops, how: "cut", "stall" or "error"); (-1, "") if never."""
        for after, how in (
            (self.cut_after, "cut"),
            (self.stall_after, "stall"),
            (self.error_after, "error"),
        ):
            if after >= 0:
                return after, how
        return -1, ""


def sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def token_texts(count: int, start: int = 0) -> Iterator[str]:
    """The answer's tokens tok(start+1) .. tok(start+count), each with its trailing space."""
    return (f"tok{i} " for i in range(start + 1, start + count + 1))


def text_of(content: object) -> str:
    """The text of a message's content: a string, or the text parts of a list (OpenAI's content
    parts, Anthropic's blocks, Gemini's parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and _is_text(p))
    return ""


def _is_text(part: dict[str, Any]) -> bool:
    return isinstance(part.get("text"), str)


def held_prefix(text: str) -> int:
    """k where `text` starts with the mock's own tok1 .. tokk: what a prefilled assistant message
    already holds of the answer."""
    held = at = 0
    while text.startswith(piece := f"tok{held + 1} ", at):
        held, at = held + 1, at + len(piece)
    return held


def held_suffix(text: str) -> int:
    """k where `text` ends with exactly the run tok1 .. tokk (a whole word run): what a legacy
    completions prompt already holds of the answer; 0 if it ends otherwise."""
    words = text.rsplit(maxsplit=1) if text.endswith(" ") else []
    last = words[-1] if words else ""
    number = last[3:]
    if not last.startswith("tok") or not number.isdigit() or not number.isascii():
        return 0
    held = int(number)
    if not 0 < held <= len(text) // 5:  # each token takes 5 characters at least
        return 0
    run = "".join(token_texts(held))
    whole = len(text) == len(run) or text[-len(run) - 1].isspace()
    return held if whole and text.endswith(run) else 0


def words(value: object) -> int:
    """Deterministic token estimate: words of strings, one per token id, text of parts."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(words(item) for item in value)
    if isinstance(value, dict):
        return words(value.get("text"))
    return 0


def prompt_words(messages: object, key: str) -> int:
    """Words over all messages plus one per message, mimicking per-message template cost."""
    if not isinstance(messages, list):
        return 0
    return sum(words(m.get(key)) + 1 for m in messages if isinstance(m, dict))


def prefilled(messages: object, role: str, key: str) -> int:
    """How many of the answer's tokens the final message holds when it is `role`'s (a prefill to
    continue); 0 otherwise."""
    last = messages[-1] if isinstance(messages, list) and messages else None
    if not isinstance(last, dict) or last.get("role") != role:
        return 0
    return held_prefix(text_of(last.get(key)))


def limit_of(body: dict[str, Any], *keys: str) -> int | None:
    """The first of `keys` the body sets (a non-negative integer, else a 400); None if none."""
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise Reject(400, f"{key} must be a non-negative integer", param=key)
        return value
    return None


def openai_held(body: dict[str, Any], chat: bool) -> int:
    """The answer's tokens a chat request's final assistant message, or a completions prompt's
    end, already holds; vLLM's 400 for continue_final_message with a generation prompt."""
    if not chat:
        prompt = body.get("prompt")
        return held_suffix(prompt) if isinstance(prompt, str) else 0
    refusal = continuation_refusal(body)
    if refusal is not None:
        raise refusal
    return prefilled(body.get("messages"), "assistant", "content")


def openai_usage(turn: Turn) -> dict[str, int]:
    p, c = turn.prompt, turn.completion
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def openai_events(base: dict[str, Any], turn: Turn, chat: bool, include_usage: bool) -> Events:
    """An OpenAI chat or completions stream; `base` holds the fields each chunk repeats (id,
    object, created, model, system_fingerprint)."""

    def chunk(piece: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, **piece, "logprobs": None, "finish_reason": finish}
        return sse({**base, "choices": [choice]})

    def token(text: str) -> dict[str, Any]:
        return {"delta": {"content": text}} if chat else {"text": text}

    head = [chunk({"delta": {"role": "assistant", "content": ""}})] if chat else []
    tail = [chunk({"delta": {}} if chat else {"text": ""}, turn.finish)]
    if include_usage:
        tail.append(sse({**base, "choices": [], "usage": openai_usage(turn)}))
    tail.append(SSE_DONE)
    if turn.call is not None:
        body = (chunk({"delta": d}) for d in turn.call.deltas())
        return Events(head, body, tail, openai_failure)
    return Events(head, (chunk(token(t)) for t in turn.pieces()), tail, openai_failure)


def tool_call(body: dict[str, Any]) -> ToolCall | None:
    """The call an OpenAI chat request gets instead of text: with `tools`, unless tool_choice is
    "none" or the last message is a tool's result (the model then answers in words) or an
    assistant's (the model continues it in words)."""
    tools = _functions(body.get("tools"))
    name = _chosen(body.get("tool_choice"), tools)
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if name is None or isinstance(last, dict) and last.get("role") in ("tool", "assistant"):
        return None
    arguments = orjson.dumps(_required(tools[name])).decode()
    return ToolCall("call_" + os.urandom(8).hex(), name, arguments)


def _functions(tools: object) -> dict[str, object]:
    """Function name -> its parameters schema, in the request's order; a malformed tool is
    refused rather than skipped, so a translator's mistake shows in tests."""
    if tools is None:
        return {}
    if not isinstance(tools, list):
        raise Reject(400, "tools must be a list", param="tools")
    found: dict[str, object] = {}
    for i, tool in enumerate(tools):
        function = _typed(tool, "function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise Reject(400, f"tools[{i}] must be a function tool with a name", param="tools")
        found[function["name"]] = function.get("parameters")
    return found


def _typed(item: object, kind: str) -> object:
    """`item[kind]` where item is `{"type": kind, kind: ...}`, OpenAI's tagged shape; else None."""
    return item.get(kind) if isinstance(item, dict) and item.get("type") == kind else None


def _chosen(choice: object, tools: dict[str, object]) -> str | None:
    """The function tool_choice picks: a named one, else the first; None for "none" or no tools."""
    if choice in (None, "auto", "required"):
        return next(iter(tools), None)
    if choice == "none":
        return None
    function = _typed(choice, "function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        message = "tool_choice must be none, auto, required or a function"
        raise Reject(400, message, param="tool_choice")
    if name not in tools:
        message = f"tool_choice names {name!r}, which is not in tools"
        raise Reject(400, message, param="tool_choice")
    return name


def _required(schema: object) -> dict[str, Any]:
    """Each required property of a parameters schema, filled by its type (or its first enum)."""
    if not isinstance(schema, dict) or not isinstance(schema.get("required"), list):
        return {}
    properties = schema.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    return {n: _filler(properties.get(n)) for n in schema["required"] if isinstance(n, str)}


def _filler(prop: object) -> Any:
    if not isinstance(prop, dict):
        return None
    if isinstance(prop.get("enum"), list) and prop["enum"]:
        return prop["enum"][0]
    kinds = prop.get("type")
    for kind in kinds if isinstance(kinds, list) else [kinds]:
        if isinstance(kind, str) and kind in _FILLERS:
            return _FILLERS[kind]
    return None  # no type, or "null": JSON's null fits


def _thirds(text: str) -> list[str]:
    step = max(1, len(text) // 3)
    pieces = [text[:step], text[step : 2 * step], text[2 * step :]]
    return [p for p in pieces if p]


def anthropic_event(kind: str, **fields: Any) -> bytes:
    """One Anthropic SSE event; the event name always equals the payload's type."""
    return (
        b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"
    )


def anthropic_events(message: dict[str, Any], turn: Turn) -> Events:
    """Anthropic's event sequence; a stream failed mid-answer ends with an `error` event (its
    shape for an overloaded or failing API), no message_stop."""

    def delta(text: str) -> bytes:
        return anthropic_event(
            "content_block_delta", index=0, delta={"type": "text_delta", "text": text}
        )

    head = (
        anthropic_event("message_start", message=message),
        anthropic_event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        anthropic_event("ping"),
    )
    stop = {"stop_reason": "max_tokens" if turn.truncated else "end_turn", "stop_sequence": None}
    tail = (
        anthropic_event("content_block_stop", index=0),
        anthropic_event("message_delta", delta=stop, usage={"output_tokens": turn.completion}),
        anthropic_event("message_stop"),
    )
    return Events(head, (delta(t) for t in turn.pieces()), tail, _anthropic_failure)


def _anthropic_failure(sent: int) -> tuple[bytes, ...]:
    error = anthropic_error(Reject(500, STREAM_FAILURE))
    return (anthropic_event("error", error=error["error"]),)


def gemini_chunks(turn: Turn) -> list[dict[str, Any]]:
    """One chunk per token; the last one carries the finish reason and usage, like Gemini."""
    texts = list(turn.pieces()) or [""]
    chunks: list[dict[str, Any]] = [
        {"candidates": [_candidate(t)], "modelVersion": turn.model} for t in texts
    ]
    chunks[-1]["candidates"][0]["finishReason"] = "MAX_TOKENS" if turn.truncated else "STOP"
    p, c = turn.prompt, turn.completion
    usage = {"promptTokenCount": p, "candidatesTokenCount": c, "totalTokenCount": p + c}
    chunks[-1]["usageMetadata"] = usage
    return chunks


def _candidate(text: str) -> dict[str, Any]:
    return {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}


def gemini_merge(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    text = "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks)
    last = chunks[-1]
    return {**last, "candidates": [{**last["candidates"][0], **_candidate(text)}]}


def gemini_sse(chunks: list[dict[str, Any]]) -> Events:
    """Gemini's SSE stream (alt=sse); a failure mid-answer is one more `data:` event holding
    Google's error object, and the stream ends."""
    return Events((), map(sse, chunks), (), _gemini_sse_failure)


def _gemini_sse_failure(sent: int) -> tuple[bytes, ...]:
    return (sse(google_error(Reject(500, GEMINI_FAILURE))),)


def json_array(chunks: list[dict[str, Any]]) -> Events:
    """Gemini's non-SSE stream: one JSON array whose elements arrive as they are generated; a
    failure mid-answer is Google's error object as the array's last element."""
    body = ((b"[" if i == 0 else b",\r\n") + orjson.dumps(c) for i, c in enumerate(chunks))
    return Events((), body, (b"]",), _json_array_failure)


def _json_array_failure(sent: int) -> tuple[bytes, ...]:
    error = orjson.dumps(google_error(Reject(500, GEMINI_FAILURE)))
    return ((b",\r\n" if sent else b"[") + error, b"]")


def _is_tokens(value: object) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


def embedding_inputs(value: Any) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if _is_tokens(value):
            return [value]
        if all(isinstance(v, str) for v in value) or all(_is_tokens(v) for v in value):
            return list(value)
    raise Reject(400, "input must be a string, strings, or token id lists", param="input")


def rerank_text(doc: object) -> str:
    if isinstance(doc, str):
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("text"), str):
        return str(doc["text"])
    raise Reject(400, "documents must be strings or objects with text", param="documents")


def vector(item: str | list[int]) -> tuple[float, ...]:
    """A unit vector from the input's hash, rounded to float32 so both encodings agree."""
    raw = item.encode() if isinstance(item, str) else orjson.dumps(item)
    ints = _RAW_VECTOR.unpack(hashlib.sha256(raw).digest())
    norm = math.sqrt(sum(i * i for i in ints)) or 1.0
    return _VECTOR.unpack(_VECTOR.pack(*(i / norm for i in ints)))


def encode_vector(values: tuple[float, ...], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(_VECTOR.pack(*values)).decode()
    return list(values)


def relevance(query: str, doc: str) -> float:
    digest = hashlib.sha256(query.encode() + b"\x00" + doc.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


def cut_connection(transport: asyncio.BaseTransport, event: bytes) -> None:
    """Drop the connection as a host that dies mid-answer: no end of body; with `event`, half of
    its chunk written first, straight to the socket (a death in the middle of a write)."""
    transport = cast(asyncio.Transport, transport)  # uvloop's is one, not a subclass of it
    if event:
        transport.write(b"%x\r\n" % len(event) + event[: len(event) // 2])
    transport.close()  # after what was written (an abort's reset could drop it): a FIN

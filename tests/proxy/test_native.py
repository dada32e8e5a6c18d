"""edge/proxy/native.py: a stream in Anthropic's or Gemini's own dialect, broken mid-answer, read
back, and continued from an OpenAI host through splice.Splice and the dialect's resumed Stream.

The native streams are the mock's own (edge/dev/mockwire.py) and the shapes real hosts write:
llama.cpp's /v1/messages (tools/server/server-task.cpp, to_json_anthropic and
to_json_anthropic_stream; format_anthropic_sse: `event:` then `data:`, keys sorted as nlohmann's
json keeps them; message_start and the first text delta in one write; `:` keep-alives; its error
as `event: error` with its own error object) and Google's (CRLF framing, responseId and
usageMetadata on every element). Each is cut at every byte: only a cut at an event's end that
leaves an answer of text going on is continuable. The continuation is what vLLM streams for a
continued final assistant message (mockwire.openai_events: a role chunk, a chunk per token, the
finish, the usage, [DONE]), fed in pieces. The client's bytes, its first part and the resumed
output, must read as ONE stream of the dialect, checked against a grammar and by the official
SDK's own parsing and accumulation.
"""

from __future__ import annotations

from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from google import genai
from google.genai import types as gtypes

from edge.dev.mockwire import (
    Turn,
    anthropic_event,
    anthropic_events,
    gemini_chunks,
    gemini_sse,
    openai_events,
    token_texts,
)
from edge.dialects import ANTHROPIC, GEMINI
from edge.proxy.native import Native, broken_anthropic, broken_gemini
from edge.proxy.splice import Splice

PROMPT = 7
MODEL = "claude-ish"
PIECE = 7  # the continuation arrives in pieces of this many bytes: lines cut anywhere


def whole(n: int) -> str:
    return "".join(token_texts(n))


def boundaries(events: list[bytes]) -> dict[int, int]:
    """Byte offset of each event's end -> how many events the client then holds."""
    offsets, at = {0: 0}, 0
    for k, event in enumerate(events, 1):
        at += len(event)
        offsets[at] = k
    return offsets


def continuation(had_tokens: int, n: int, model: str) -> bytes:
    """vLLM's stream for the rest of the answer: tok(held+1) .. tok(n), usage counting only
    what it wrote, its prompt holding the prefill."""
    base = {"id": "chatcmpl-next", "object": "chat.completion.chunk", "created": 1, "model": model}
    turn = Turn(model, PROMPT + had_tokens, n - had_tokens, False, start=had_tokens)
    events = openai_events(base, turn, chat=True, include_usage=True)
    return b"".join([*events.head, *events.body, *events.tail])


def resume(native: Native, upstream: bytes) -> bytes:
    """What the client gets after its first part: the next host's stream, fed in pieces, through
    the splice and the resumed translator."""
    splice, stream, out = Splice(native.had, chat=True), native.events(""), []
    for at in range(0, len(upstream), PIECE):
        out.append(stream.feed(splice.feed(upstream[at : at + PIECE])))
    out.append(stream.feed(splice.end()))
    out.append(stream.end())
    assert splice.done and not splice.failed
    return b"".join(out)


def transport(body: bytes) -> httpx2.Client:
    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})

    return httpx2.Client(transport=httpx2.MockTransport(answer))


# -- Anthropic ----------------------------------------------------------------------------------


def mock_anthropic(n: int) -> list[bytes]:
    """The mock's stream: message_start, content_block_start, ping, a delta per token, then
    content_block_stop, message_delta, message_stop."""
    message: dict[str, Any] = {
        "id": "msg_mock1", "type": "message", "role": "assistant", "model": MODEL,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": PROMPT, "output_tokens": 1},
    }  # fmt: skip
    events = anthropic_events(message, Turn(MODEL, PROMPT, n, False))
    return [*events.head, *events.body, *events.tail]


def llama_event(kind: str, **fields: Any) -> bytes:
    data = orjson.dumps({"type": kind, **fields}, option=orjson.OPT_SORT_KEYS)
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def llama_delta(text: str) -> bytes:
    delta = {"text": text, "type": "text_delta"}
    return llama_event("content_block_delta", delta=delta, index=0)


def llama_anthropic(n: int) -> list[bytes]:
    """llama.cpp's /v1/messages stream, one list item per write: its first token's write holds
    message_start, content_block_start and the delta; a keep-alive comment mid-answer."""
    usage = {"cache_read_input_tokens": 2, "input_tokens": PROMPT - 2, "output_tokens": 0}
    message: dict[str, Any] = {
        "content": [], "id": "chatcmpl-llama1", "model": MODEL, "role": "assistant",
        "stop_reason": None, "stop_sequence": None, "type": "message", "usage": usage,
    }  # fmt: skip
    block = {"text": "", "type": "text"}
    texts = list(token_texts(n))
    first = (
        llama_event("message_start", message=message)
        + llama_event("content_block_start", content_block=block, index=0)
        + llama_delta(texts[0])
    )
    body = [llama_delta(text) for text in texts[1:]]
    body.insert(len(body) // 2, b":\n\n")
    stop = {"stop_reason": "end_turn", "stop_sequence": None}
    tail = (
        llama_event("content_block_stop", index=0)
        + llama_event("message_delta", delta=stop, usage={"output_tokens": n})
        + llama_event("message_stop")
    )
    return [first, *body, tail]


def anthropic_grammar(out: bytes) -> list[dict[str, Any]]:
    """The client's events, checked: each `event:` + `data:` of the same type (comments and pings
    aside), one message_start, one text block at index 0 (start, deltas, stop), one
    message_delta, one message_stop, last."""
    found: list[dict[str, Any]] = []
    assert out.endswith(b"\n\n")
    for raw in out[:-2].split(b"\n\n"):
        if raw.startswith(b":"):
            continue
        name, data = raw.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: ")
        doc = orjson.loads(data[6:])
        assert doc["type"] == name[7:].decode()
        if doc["type"] != "ping":
            found.append(doc)
    kinds = [doc["type"] for doc in found]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) <= {"content_block_delta"}
    assert all(doc.get("index", 0) == 0 for doc in found)
    return found


def sdk_message(body: bytes) -> tuple[Any, str]:
    """The official SDK's final message and streamed text for the client's bytes."""
    sdk = anthropic.Anthropic(
        api_key="k", base_url="http://edge.test", http_client=transport(body), max_retries=0
    )
    asked: Any = [{"role": "user", "content": "hi"}]
    with sdk.messages.stream(model=MODEL, max_tokens=100, messages=asked) as stream:
        text = "".join(stream.text_stream)
        return stream.get_final_message(), text


def event_ends(stream: bytes) -> set[int]:
    """Where the client holds whole events only: after each blank line (LF or CRLF), or after
    a comment line that follows one (a comment is no part of an event)."""
    ends = {0}
    for p in range(1, len(stream) + 1):
        if stream[:p].endswith((b"\n\n", b"\r\n\r\n")):
            ends.add(p)
        elif stream[:p].endswith(b":\n") and p - 2 in ends:
            ends.add(p)
    return ends


@pytest.mark.parametrize(
    ("events", "ident", "input_tokens"),
    [(mock_anthropic(6), "msg_mock1", PROMPT), (llama_anthropic(6), "chatcmpl-llama1", 5)],
    ids=["mock", "llama.cpp"],
)
def test_an_anthropic_stream_cut_at_every_byte_goes_on_as_one_stream(events, ident, input_tokens):
    n = 6
    stream = b"".join(events)
    ends = event_ends(stream)
    continued = 0
    for cut in range(len(stream) + 1):
        got = stream[:cut]
        native = broken_anthropic(got)
        # Continuable: whole events, message_start in, the text block not closed yet.
        if cut not in ends or not cut or b"content_block_stop" in got:
            assert native is None, cut
            continue
        assert native is not None, cut
        held = got.count(b"text_delta")
        had = native.had
        assert (native.dialect, had.id, had.model) == (ANTHROPIC, ident, MODEL)
        assert (had.text, had.tokens, had.finish_reason) == (whole(held), held, None)
        assert native.input_tokens == input_tokens
        assert native.block == (0 if b"content_block_start" in got else -1)
        out = got + resume(native, continuation(had.tokens, n, "served-by-vllm"))
        docs = anthropic_grammar(out)
        assert docs[0]["message"]["id"] == ident
        assert docs[-2]["usage"] == {"input_tokens": input_tokens, "output_tokens": n}
        message, text = sdk_message(out)
        assert text == whole(n) and [b.type for b in message.content] == ["text"]
        assert message.content[0].text == whole(n) and message.id == ident
        assert message.stop_reason == "end_turn" and message.usage.output_tokens == n
        assert message.usage.input_tokens == input_tokens
        continued += 1
    assert continued >= n  # after message_start, and after each delta but the last one's tail


def test_the_mock_stream_before_its_first_block_goes_on_with_one():
    events = mock_anthropic(3)
    native = broken_anthropic(events[0])
    assert native is not None and native.block == -1 and native.had.text == ""
    out = events[0] + resume(native, continuation(0, 3, "m"))
    assert [d["type"] for d in anthropic_grammar(out)].count("content_block_start") == 1
    assert sdk_message(out)[0].content[0].text == whole(3)


START = anthropic_event(
    "message_start",
    message={"id": "msg_1", "type": "message", "role": "assistant", "model": MODEL,
             "content": [], "usage": {"input_tokens": 3, "output_tokens": 1}},
)  # fmt: skip
TEXT_BLOCK = anthropic_event(
    "content_block_start", index=0, content_block={"type": "text", "text": ""}
)
DELTA = anthropic_event("content_block_delta", index=0, delta={"type": "text_delta", "text": "a"})


@pytest.mark.parametrize(
    "tail",
    [
        anthropic_event("content_block_start", index=0,
                        content_block={"type": "tool_use", "id": "t", "name": "f", "input": {}}),
        anthropic_event("content_block_start", index=0,
                        content_block={"type": "thinking", "thinking": ""}),
        TEXT_BLOCK + anthropic_event("content_block_delta", index=0,
                                     delta={"type": "citations_delta", "citation": {}}),
        TEXT_BLOCK + anthropic_event("content_block_delta", index=0,
                                     delta={"type": "input_json_delta", "partial_json": "{"}),
        TEXT_BLOCK + anthropic_event("content_block_delta", index=1,
                                     delta={"type": "text_delta", "text": "a"}),
        anthropic_event("content_block_start", index=1, content_block={"type": "text", "text": ""}),
        TEXT_BLOCK + DELTA + anthropic_event("content_block_stop", index=0),
        TEXT_BLOCK + anthropic_event("content_block_stop", index=0) + TEXT_BLOCK,
        TEXT_BLOCK + DELTA + anthropic_event(
            "message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 1}),
        anthropic_event("message_stop"),
        START,  # a second message_start
        TEXT_BLOCK + DELTA
        + anthropic_event("error", error={"type": "overloaded_error", "message": "Overloaded"}),
        # llama.cpp's error ending: its own error object under `event: error`
        TEXT_BLOCK + b'event: error\ndata: {"code":500,"message":"x","type":"server_error"}\n\n',
        TEXT_BLOCK + DELTA + b"data: [DONE]\n\n",
        TEXT_BLOCK + b"event: content_block_delta\ndata: {not json}\n\n",
        TEXT_BLOCK + b'event: content_block_delta\ndata: ["a"]\n\n',
        TEXT_BLOCK + DELTA.replace(b"event: content_block_delta", b"event: content_block_stop"),
        TEXT_BLOCK + anthropic_event("some_future_event"),
        TEXT_BLOCK + DELTA[:-1],  # the last event without its blank line
        TEXT_BLOCK + DELTA[:20],  # part of a line
    ],
    ids=[
        "tool_use", "thinking", "citations", "input_json", "delta-elsewhere", "block-1",
        "block-stopped", "second-block", "message_delta", "message_stop", "second-start",
        "error", "llama-error", "done", "bad-json", "not-an-object", "name-not-type",
        "unknown-event", "unfinished-event", "partial-line",
    ],
)  # fmt: skip
def test_what_cannot_soundly_go_on_is_none_anthropic(tail):
    assert broken_anthropic(START + tail) is None


def test_nothing_or_no_message_start_is_none_anthropic():
    assert broken_anthropic(b"") is None
    assert broken_anthropic(anthropic_event("ping")) is None
    assert broken_anthropic(TEXT_BLOCK + DELTA) is None
    no_id = START.replace(b'"id":"msg_1",', b"")
    assert broken_anthropic(no_id + TEXT_BLOCK) is None


def test_comments_crlf_and_split_data_lines_are_read_as_sse():
    crlf = (START + TEXT_BLOCK + DELTA).replace(b"\n", b"\r\n")
    native = broken_anthropic(b": hello\r\n\r\n" + crlf + b": bye\r\n")
    assert native is not None and native.had.text == "a"
    assert broken_anthropic(crlf + b" ") is None  # the start of a line the next would extend
    split = b'event: content_block_delta\ndata: {"type":"content_block_delta",\ndata: "index":0,'
    split += b'"delta":{"type":"text_delta","text":"b"}}\n\n'
    native = broken_anthropic(START + TEXT_BLOCK + split)
    assert native is not None and native.had.text == "b"


# -- Gemini -------------------------------------------------------------------------------------


def sse_crlf(element: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(element) + b"\r\n\r\n"


def google_gemini(n: int) -> list[bytes]:
    """Google's own stream: CRLF framing; responseId, modelVersion and usageMetadata on every
    element (the candidates' count where it has one); the last text element with the finish."""
    out = []
    for i, text in enumerate(token_texts(n), 1):
        candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
        usage = {"promptTokenCount": PROMPT, "candidatesTokenCount": i,
                 "totalTokenCount": PROMPT + i}  # fmt: skip
        if i == n:
            candidate["finishReason"] = "STOP"
        element = {"candidates": [candidate], "usageMetadata": usage,
                   "modelVersion": "gemini-ish", "responseId": "resp-1"}  # fmt: skip
        out.append(sse_crlf(element))
    return out


def gemini_grammar(out: bytes) -> tuple[str, list[dict[str, Any]]]:
    """The client's elements, checked: every one `data: {json}` and a blank line (LF or CRLF),
    the SDK's types take it, one model and one responseId (or none) throughout, the finish once
    and last; the text, and the elements."""
    found = []
    for raw in out.replace(b"\r\n", b"\n").split(b"\n\n"):
        if raw:
            assert raw.startswith(b"data: ") and b"\n" not in raw
            found.append(orjson.loads(raw[6:]))
    for element in found:
        gtypes.GenerateContentResponse.model_validate(element)
        assert "error" not in element
        assert element["modelVersion"] == found[0]["modelVersion"]
        assert element.get("responseId") == found[0].get("responseId")
    finishes = [c.get("finishReason") for e in found for c in e.get("candidates", ())]
    assert [f for f in finishes if f] == ["STOP"] and finishes[-1] == "STOP"
    texts = [
        p["text"] for e in found for c in e.get("candidates", ()) for p in c["content"]["parts"]
    ]
    return "".join(texts), found


def sdk_text(body: bytes, model: str) -> tuple[str, Any]:
    options = gtypes.HttpOptions(base_url="http://edge.test", httpx_client=transport(body))
    client = genai.Client(api_key="k", http_options=options)
    chunks = list(client.models.generate_content_stream(model=model, contents="hi"))
    return "".join(c.text or "" for c in chunks), chunks[-1]


def mock_gemini(n: int) -> list[bytes]:
    return list(gemini_sse(gemini_chunks(Turn("gemma", PROMPT, n, False))).body)


@pytest.mark.parametrize(
    ("events", "ident", "model"),
    [(mock_gemini(6), "", "gemma"), (google_gemini(6), "resp-1", "gemini-ish")],
    ids=["mock", "google"],
)
def test_a_gemini_stream_cut_at_every_byte_goes_on_as_one_stream(events, ident, model):
    n = 6
    stream = b"".join(events)
    ends = boundaries(events)
    for cut in range(len(stream) + 1):
        got = stream[:cut]
        native = broken_gemini(got)
        k = ends.get(cut)
        if k is None or k == 0 or k == len(events):  # nothing yet, half an event, or finished
            assert native is None, cut
            continue
        assert native is not None, cut
        had = native.had
        assert (native.dialect, had.id, had.model, had.text) == (GEMINI, ident, model, whole(k))
        assert had.tokens == k and had.finish_reason is None
        out = got + resume(native, continuation(had.tokens, n, "served-by-vllm"))
        text, found = gemini_grammar(out)
        assert text == whole(n)
        assert found[-1]["usageMetadata"]["candidatesTokenCount"] == n
        assert found[-1]["usageMetadata"]["promptTokenCount"] == PROMPT
        streamed, last = sdk_text(out, model)
        assert streamed == whole(n)
        assert last.candidates[0].finish_reason == gtypes.FinishReason.STOP
        assert last.model_version == model and last.response_id == (ident or None)


def test_the_usage_in_the_stream_counts_the_tokens_gemini():
    usage = {"candidatesTokenCount": 5, "promptTokenCount": 1}
    first = {"candidates": [{"content": {"parts": [{"text": "ab"}]}}], "usageMetadata": usage}
    second = {"candidates": [{"content": {"parts": [{"text": "c"}, {"text": "d"}]}}]}
    native = broken_gemini(sse_crlf(first) + sse_crlf(second) + sse_crlf({"usageMetadata": {}}))
    assert native is not None and native.had.text == "abcd" and native.had.tokens == 6


GEM = {"candidates": [{"content": {"parts": [{"text": "a"}], "role": "model"}, "index": 0}]}


def gem(**candidate: Any) -> bytes:
    return sse_crlf({"candidates": [{**GEM["candidates"][0], **candidate}]})


@pytest.mark.parametrize(
    "tail",
    [
        gem(content={"parts": [{"functionCall": {"name": "f", "args": {}}}], "role": "model"}),
        gem(content={"parts": [{"text": "hm", "thought": True}], "role": "model"}),
        gem(content={"parts": [{"inlineData": {"mimeType": "image/png", "data": ""}}]}),
        gem(content={"parts": "text"}),
        gem(finishReason="STOP"),
        gem(finishReason="MAX_TOKENS"),
        gem(index=1),
        sse_crlf({"candidates": [GEM["candidates"][0], {**GEM["candidates"][0], "index": 1}]}),
        sse_crlf({"candidates": {"index": 0}}),
        sse_crlf({"promptFeedback": {"blockReason": "SAFETY"}}),
        sse_crlf({"error": {"code": 500, "message": "x", "status": "INTERNAL"}}),
        b'event: error\ndata: {"message": "x"}\n\n',
        b"data: {not json\n\n",
        b"data: [1]\n\n",
        gem()[:-2],  # the last element without its blank line
        gem()[:30],  # part of a line
    ],
    ids=[
        "functionCall", "thought", "inlineData", "parts-not-a-list", "finished", "max-tokens",
        "index-1", "two-candidates", "candidates-not-a-list", "blocked", "error", "error-event",
        "bad-json", "not-an-object", "unfinished-event", "partial-line",
    ],
)  # fmt: skip
def test_what_cannot_soundly_go_on_is_none_gemini(tail):
    assert broken_gemini(gem() + tail) is None


def test_nothing_yet_is_none_and_comments_alone_are_nothing_gemini():
    assert broken_gemini(b"") is None
    assert broken_gemini(b": keep-alive\n\n") is None
    native = broken_gemini(b": keep-alive\n\n" + gem() + b"\n")
    assert native is not None and native.had.text == "a" and native.had.id == ""

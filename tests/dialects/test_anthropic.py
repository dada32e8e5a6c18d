"""edge/dialects/anthropic.py: Anthropic's Messages API through an OpenAI-only host.

Each mapping of a request field, the answer in the SDK's own types, the stream checked against a
grammar of Anthropic's events and the SDK's event types, fed whole and cut anywhere, and the
official SDK talking to the translators through an in-memory transport (no socket).
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from edge.dialects import anthropic as tr
from edge.errors import BadRequest
from tests.dialects.openai_shape import CHUNKS, STREAM, USAGE, call, chunk, image_parts, sse, walk

EVENT = TypeAdapter(RawMessageStreamEvent)
SECRET = "the-prompt-text-never-echoed"
PROPERTY = settings(
    max_examples=100, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip


def req(messages: Any = None, **fields: Any) -> dict[str, Any]:
    hi = [{"role": "user", "content": "hi"}]
    doc = {"max_tokens": 64, "messages": hi if messages is None else messages}
    return {**doc, **fields}


def translate(doc: dict[str, Any], stream: bool = False) -> dict[str, Any]:
    return tr.request(doc, "m", stream)


def refused(doc: Any) -> str:
    with pytest.raises(BadRequest) as caught:
        tr.request(doc, "m", False)
    assert caught.value.status == 400 and SECRET not in caught.value.message
    return caught.value.message


USE = {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}
ASKED = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": [USE]}]
RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "12 C"}
IMAGE = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}


# The request, field by field


def test_the_envelope_model_max_tokens_stream():
    body = translate(req(stream=False), stream=True)
    assert body["model"] == "m" and body["max_tokens"] == 64 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    body = translate(req(stream=True), stream=False)
    assert body["stream"] is False and "stream_options" not in body
    assert body["messages"] == [{"role": "user", "content": "hi"}]


def test_system_a_string_or_text_blocks_joined():
    first = translate(req(system="Be brief."))["messages"][0]
    assert first == {"role": "system", "content": "Be brief."}
    blocks = [{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}}]
    blocks.append({"type": "text", "text": "B"})
    assert translate(req(system=blocks))["messages"][0] == {"role": "system", "content": "A\n\nB"}
    assert translate(req(system=""))["messages"][0]["role"] == "user"
    assert "system" in refused(req(system=[{"type": "image", "text": SECRET}]))


def test_user_blocks_a_lone_text_is_a_string_more_are_parts():
    one = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert translate(req(one))["messages"] == [{"role": "user", "content": "hi"}]
    two = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert translate(req(two))["messages"] == [{"role": "user", "content": parts}]


def image(source: dict[str, Any]) -> list[dict[str, Any]]:
    blocks = [{"type": "image", "source": source}, {"type": "text", "text": "what is it?"}]
    return [{"role": "user", "content": blocks}]


def test_an_image_base64_or_url():
    source = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    parts = translate(req(image(source)))["messages"][0]["content"]
    assert parts[0] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
    }
    assert parts[1] == {"type": "text", "text": "what is it?"}
    url = {"type": "url", "url": "https://example.com/cat.jpg"}
    part = translate(req(image(url)))["messages"][0]["content"][0]
    assert part == {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}


@pytest.mark.parametrize(
    "source",
    [
        {"type": "base64", "media_type": "text/html;x", "data": SECRET},
        {"type": "base64", "media_type": "image/png"},
        {"type": "file", "file_id": SECRET},
        {"type": "url"},
        "a string",
    ],
)
def test_an_image_that_cannot_be_sent_is_refused(source):
    assert "messages[0].content[0].source" in refused(req(image(source)))


def test_a_tool_call_round_trip():
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "12 C"}
    turn = {"role": "user", "content": [{"type": "text", "text": "thanks"}, result]}
    messages = translate(req([*ASKED, turn]))["messages"]
    call = {"id": "toolu_1", "type": "function",
            "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}}  # fmt: skip
    assert messages[1] == {"role": "assistant", "content": None, "tool_calls": [call]}
    # The tool's answer comes first: it answers the turn before; the user's words after it.
    assert messages[2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "12 C"}
    assert messages[3] == {"role": "user", "content": "thanks"}


def test_tool_results_text_blocks_joined_errors_kept_as_text():
    blocks = [{"type": "text", "text": "no such"}, {"type": "text", "text": "city"}]
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": blocks, "is_error": True}
    messages = translate(req([*ASKED, {"role": "user", "content": [result]}]))["messages"]
    assert messages[2:] == [{"role": "tool", "tool_call_id": "toolu_1", "content": "no such\ncity"}]
    bare = {"type": "tool_result", "tool_use_id": "toolu_1"}
    assert (
        translate(req([*ASKED, {"role": "user", "content": [bare]}]))["messages"][2]["content"]
        == ""
    )


def test_an_assistant_turn_with_text_and_a_tool_call():
    text = {"type": "text", "text": "Let me look."}
    turn = {"role": "assistant", "content": [text, USE]}
    message = translate(req([ASKED[0], turn]))["messages"][1]
    assert message["content"] == "Let me look." and message["tool_calls"][0]["id"] == "toolu_1"


def test_thinking_blocks_are_dropped():
    thinking = {"type": "thinking", "thinking": SECRET, "signature": "sig"}
    redacted = {"type": "redacted_thinking", "data": "xyz"}
    text = {"type": "text", "text": "4"}
    messages = [
        {"role": "user", "content": "2+2"},
        {"role": "assistant", "content": [thinking, redacted, text]},
    ]
    assert translate(req(messages))["messages"][1] == {"role": "assistant", "content": "4"}


@pytest.mark.parametrize(
    ("messages", "where"),
    [
        ([{"role": "user", "content": [{"type": "document", "source": SECRET}]}], "document"),
        ([{"role": "user", "content": [{"type": SECRET, "text": SECRET}]}], "this block type"),
        ([{"role": "user", "content": [USE]}], "tool_use blocks are not supported in a user turn"),
        ([{"role": "user", "content": []}], "must not be empty"),
        ([{"role": "user", "content": [SECRET]}], "messages[0].content[0]"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "system", "content": SECRET}], "messages[0].role"),
        ([SECRET], "messages[0]"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], ".text"),
        ([{"role": "user", "content": [{**RESULT, "tool_use_id": "x"}]}], "tool_use_id"),
        ([*ASKED, {"role": "user", "content": [{**RESULT, "content": [IMAGE]}]}], "only text"),
        ([{"role": "assistant", "content": [IMAGE]}], "image blocks are not supported in an"),
        ([{"role": "assistant", "content": [{**USE, "input": SECRET}]}], ".input"),
        ([{"role": "assistant", "content": [{**USE, "id": ""}]}], ".id"),
        ([{"role": "assistant", "content": [{**USE, "name": None}]}], ".name"),
    ],
)  # fmt: skip
def test_messages_that_cannot_be_translated_are_refused_by_place(messages, where):
    assert where in refused(req(messages))


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": SECRET}, "messages"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": False}, "top_p"),
        ({"top_k": 1.5}, "top_k"),
        ({"stop_sequences": SECRET}, "stop_sequences"),
        ({"stop_sequences": [1]}, "stop_sequences"),
        ({"system": 3}, "system"),
        ({"tools": {}}, "tools"),
        ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
        ({"tools": [{"input_schema": {}}]}, "tools[0].name"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": {"type": "some"}}, "tool_choice.type"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
        ({"output_config": {"format": {"type": "xml"}}}, "output_config.format.type"),
        ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format.schema"),
    ],
)
def test_fields_that_are_invalid_are_refused_by_name(fields, where):
    assert where in refused(req(**fields))


def test_a_body_that_is_not_an_object_is_refused():
    refused([SECRET])


def test_sampling_stops_and_user():
    fields = {"temperature": 0.5, "top_p": 1, "top_k": 40, "stop_sequences": ["END", "\n\n"]}
    body = translate(req(**fields, metadata={"user_id": "u-1"}))
    assert (body["temperature"], body["top_p"], body["top_k"]) == (0.5, 1, 40)
    assert body["stop"] == ["END", "\n\n"] and body["user"] == "u-1"
    body = translate(req(stop_sequences=[], metadata={}))
    assert "stop" not in body and "user" not in body


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_tools_become_functions():
    tools = [{"name": "weather", "description": "Now.", "input_schema": SCHEMA,
              "cache_control": {"type": "ephemeral"}},
             {"type": "custom", "name": "clock", "input_schema": {"type": "object"}}]  # fmt: skip
    body = translate(req(tools=tools))
    weather = {"name": "weather", "parameters": SCHEMA, "description": "Now."}
    clock = {"name": "clock", "parameters": {"type": "object"}}
    assert body["tools"] == [{"type": "function", "function": f} for f in (weather, clock)]
    assert "tool_choice" not in body and "parallel_tool_calls" not in body


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        (
            {"type": "tool", "name": "weather"},
            {"type": "function", "function": {"name": "weather"}},
        ),
    ],
)
def test_tool_choice(choice, expected):
    tools = [{"name": "weather", "input_schema": SCHEMA}]
    body = translate(req(tools=tools, tool_choice=choice))
    assert body["tool_choice"] == expected and "parallel_tool_calls" not in body
    body = translate(req(tools=tools, tool_choice={**choice, "disable_parallel_tool_use": True}))
    assert body["tool_choice"] == expected and body["parallel_tool_calls"] is False
    assert "tool_choice" not in translate(req(tool_choice=choice))  # no tools: moot


def test_structured_output_becomes_a_json_schema_response_format():
    body = translate(req(output_config={"format": {"type": "json_schema", "schema": SCHEMA}}))
    assert body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "output", "schema": SCHEMA},
    }  # fmt: skip


# The answer


def completion(message: dict[str, Any], finish: str = "stop", **choice: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "model": "engine-name",
        "choices": [{"index": 0, "message": {"role": "assistant", **message},
                     "finish_reason": finish, **choice}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }  # fmt: skip


def test_a_text_answer():
    doc = tr.response(completion({"content": "Hello."}), "claude-ish")
    message = Message.model_validate(doc)
    assert message.id == "msg_chatcmpl-1" and message.model == "claude-ish"
    assert doc["content"] == [{"type": "text", "text": "Hello."}]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, 7)


def tool_call(call_id: str | None, name: str, arguments: str) -> dict[str, Any]:
    function = {"name": name, "arguments": arguments}
    return {"type": "function", "function": function} | ({"id": call_id} if call_id else {})


def test_a_tool_calling_answer():
    calls = [
        tool_call("call_1", "weather", '{"city": "Oslo"}'), tool_call("call_2", "clock", ""),
        tool_call(None, "broken", "{not json"),
    ]  # fmt: skip
    doc = tr.response(completion({"content": "Checking.", "tool_calls": calls}, "tool_calls"), "m")
    message = Message.model_validate(doc)
    assert message.stop_reason == "tool_use"
    text, first, second, third = doc["content"]
    assert text == {"type": "text", "text": "Checking."}
    assert first == {
        "type": "tool_use",
        "id": "call_1",
        "name": "weather",
        "input": {"city": "Oslo"},
    }
    assert second["input"] == {} and third["input"] == {} and third["id"].startswith("toolu_")
    # Some engines finish a tool call with "stop": Anthropic's clients wait for "tool_use".
    doc = tr.response(completion({"content": None, "tool_calls": calls[:1]}), "m")
    assert doc["stop_reason"] == "tool_use" and len(doc["content"]) == 1


@pytest.mark.parametrize(
    ("finish", "reason"),
    [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"),
     ("content_filter", "refusal"), (None, "end_turn"), ("abort", "end_turn")],
)  # fmt: skip
def test_finish_reasons(finish, reason):
    doc = tr.response(completion({"content": "x"}, finish), "m")
    assert doc["stop_reason"] == reason and Message.model_validate(doc)


@pytest.mark.parametrize(
    ("choice", "sequence"),
    [({"stop_reason": "END"}, "END"), ({"matched_stop": "##"}, "##"),
     ({"stop_reason": 128001}, None), ({"matched_stop": 2}, None), ({}, None)],
)  # fmt: skip
def test_the_stop_sequence_where_the_engine_names_it(choice, sequence):
    doc = tr.response(completion({"content": "x"}, **choice), "m")
    assert doc["stop_sequence"] == sequence
    assert doc["stop_reason"] == ("stop_sequence" if sequence else "end_turn")


def test_an_answer_without_id_usage_or_choices_is_still_a_message():
    doc = tr.response({"choices": []}, "m")
    message = Message.model_validate(doc)
    assert message.id.startswith("msg_") and len(message.id) > 10 and message.content == []
    assert (message.usage.input_tokens, message.usage.output_tokens) == (0, 0)
    assert tr.response({}, "m")["id"] != doc["id"]


# The stream


def events(out: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each event, checked: every event is `event:` then `data:`."""
    assert out.endswith(b"\n\n") or not out
    found = []
    for raw in out[:-2].split(b"\n\n") if out else []:
        name, data = raw.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: ")
        doc = orjson.loads(data[6:])
        assert doc["type"] == name[7:].decode()
        found.append((doc["type"], doc))
    return found


def check(out: bytes) -> dict[str, Any]:
    """Anthropic's grammar, checked on `out`; what it says: the blocks (text, or tool_use with
    its input's JSON text), the message_delta, whether it ended in an error."""
    state, delta, error = "new", None, False
    blocks: list[list[Any]] = []
    for kind, doc in events(out):
        assert not error, "nothing after an error event"
        if kind == "error":
            assert doc["error"]["type"] == "api_error" and doc["error"]["message"]
            error = True
            continue
        EVENT.validate_python(doc)  # the SDK's own event types take it
        if kind == "message_start":
            assert state == "new" and doc["message"]["content"] == []
            state = "between"
        elif kind == "content_block_start":
            assert state == "between" and doc["index"] == len(blocks)
            block = doc["content_block"]
            blocks.append(["text", ""] if block["type"] == "text" else ["tool_use", "", block])
            state = "in_block"
        elif kind == "content_block_delta":
            assert state == "in_block" and doc["index"] == len(blocks) - 1
            want = "text_delta" if blocks[-1][0] == "text" else "input_json_delta"
            assert doc["delta"]["type"] == want
            blocks[-1][1] += doc["delta"]["text" if want == "text_delta" else "partial_json"]
        elif kind == "content_block_stop":
            assert state == "in_block" and doc["index"] == len(blocks) - 1
            state = "between"
        elif kind == "message_delta":
            assert state == "between" and doc["delta"]["stop_reason"]
            state, delta = "delta", doc
        else:
            assert kind == "message_stop" and state == "delta"
            state = "stopped"
    assert state == "stopped" or error, "a stream ends with message_stop or an error"
    return {"blocks": blocks, "delta": delta, "error": error}


def accumulate(out: bytes) -> Any:
    """The SDK's own accumulation of the events into its final message."""
    snapshot: Any = None
    bufs: dict[int, bytes] = {}
    for kind, doc in events(out):
        if kind != "error":
            event = EVENT.validate_python(doc)
            snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=bufs)
    return snapshot


def run(body: bytes, cuts: list[int] | None = None) -> bytes:
    """What a Stream writes for `body` fed in pieces cut at `cuts` (whole without), then end()."""
    stream, out, at = tr.Stream("claude-ish"), [], 0
    for cut in sorted(set(cuts or [])):
        out.append(stream.feed(body[at:cut]))
        at = cut
    out.append(stream.feed(body[at:]))
    out.append(stream.end())
    return b"".join(out)


def test_a_stream_of_text_and_tool_calls():
    out = run(STREAM)
    said = check(out)
    assert [b[:2] for b in said["blocks"]] == [
        ["text", "Héllo ✓"], ["tool_use", '{"city": "Oslo"}'], ["tool_use", '{"tz": "UTC"}']
    ]  # fmt: skip
    assert said["blocks"][1][2] == {
        "type": "tool_use",
        "id": "call_a",
        "name": "weather",
        "input": {},
    }
    assert said["delta"]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    # The input tokens come last, with the usage: message_delta carries them too.
    assert said["delta"]["usage"] == {"input_tokens": 5, "output_tokens": 9}
    final = accumulate(out)
    assert final.id == "msg_chatcmpl-9" and final.model == "claude-ish"
    assert final.content[0].text == "Héllo ✓"
    assert [(b.name, b.input) for b in final.content[1:]] == [
        ("weather", {"city": "Oslo"}),
        ("clock", {"tz": "UTC"}),
    ]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (5, 9)


def test_any_single_cut_or_byte_by_byte_writes_the_same_events():
    whole = run(STREAM)
    for cut in range(1, len(STREAM)):
        assert run(STREAM, [cut]) == whole
    assert run(STREAM, list(range(1, len(STREAM)))) == whole


def test_comments_event_lines_keepalives_crlf_and_unknown_fields_are_ignored():
    body = (
        b": keep-alive\r\n\r\nevent: chunk\r\nid: 3\r\n"
        + b'data:{"id":"x","choices":[{"index":0,"delta":{"content":"a","reasoning":null},'
        + b'"finish_reason":"stop","logprobs":null}],"system_fingerprint":"fp"}\r\n\r\n\n'
        + b'data: {"choices":[{"index":1,"delta":{"content":"other choice"}}]}\n\n'
        + b"data: [DONE]\r\n\r\n"
    )
    said = check(run(body))
    assert said["blocks"] == [["text", "a"]]
    assert said["delta"]["delta"]["stop_reason"] == "end_turn"


def test_done_then_end_writes_nothing_more_and_the_rest_is_ignored():
    stream = tr.Stream("m")
    out = stream.feed(sse(chunk({"content": "a"}, "stop")) + b'data: {"choices":[]}\n\n')
    assert check(out)["blocks"] == [["text", "a"]]
    assert stream.feed(sse(chunk({"content": "b"}))) == b"" and stream.end() == b""
    assert stream.fail("late") == b""


def test_a_clean_end_without_done_closes_the_message():
    body = sse(chunk({"content": "a"}), chunk({}, "length"), USAGE, done=False)
    said = check(run(body))
    assert said["delta"]["delta"]["stop_reason"] == "max_tokens" and not said["error"]
    last = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'  # no newline
    assert check(run(sse(chunk({"content": "a"}), done=False) + last))["delta"]


def test_a_clean_end_with_no_finish_is_a_cut_answer_not_a_whole_one():
    said = check(run(sse(chunk({"content": "a"}), done=False)))
    assert said["error"] and said["delta"] is None
    assert check(run(b""))["error"]


def test_done_alone_is_an_empty_message():
    said = check(run(b"data: [DONE]\n\n"))
    assert said["blocks"] == [] and said["delta"]["delta"]["stop_reason"] == "end_turn"


def test_the_stop_sequence_in_a_stream():
    stop = {"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "END"}
    body = sse(chunk({"content": "a"}), {"choices": [stop]})
    assert check(run(body))["delta"]["delta"] == {
        "stop_reason": "stop_sequence",
        "stop_sequence": "END",
    }


def test_fail_closes_nothing_more_and_ends_with_the_error_event():
    stream = tr.Stream("m")
    out = stream.feed(sse(chunk({"content": "partial"}), done=False))
    tail = stream.fail("The model server failed.")
    said = check(out + tail)
    assert said["error"] and said["blocks"] == [["text", "partial"]]
    assert events(tail)[0][1]["error"]["message"] == "The model server failed."
    assert (
        stream.feed(b"data: [DONE]\n\n") == b"" and stream.end() == b"" and stream.fail("x") == b""
    )


def test_an_error_event_from_the_engine_ends_the_stream_without_repeating_it():
    error = {"error": {"message": SECRET, "type": "BadRequestError", "code": 400}}
    out = run(sse(chunk({"content": "a"}), error, chunk({"content": "b"})))
    said = check(out)
    assert said["error"] and said["blocks"] == [["text", "a"]] and SECRET.encode() not in out


def test_a_line_longer_than_the_bound_is_refused_whole_or_in_pieces():
    long = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * 200 + b'"}}]}\n\n'
    assert check(run(long))["blocks"] == [["text", "x" * 200]]  # the default bound: far away
    for pieces in ([long], [long[:150], long[150:]], [long[:150]]):
        stream = tr.Stream("m", max_line=100)
        with pytest.raises(ValueError, match="longer than 100"):
            for piece in pieces:
                stream.feed(piece)
    assert tr.MAX_LINE == 1 << 20


def test_an_event_that_is_not_json_is_refused():
    with pytest.raises(ValueError, match="not JSON"):
        tr.Stream("m").feed(b"data: {oops\n\n")


def test_tool_calls_without_indexes_are_told_apart_by_id():
    deltas = [{"id": "c1", "function": {"name": "f", "arguments": "{}"}},
              {"id": "c2", "function": {"name": "g", "arguments": "{"}},
              {"function": {"arguments": "}"}}]  # fmt: skip
    body = sse(*(chunk({"tool_calls": [d]}) for d in deltas), chunk({}, "tool_calls"))
    said = check(run(body))
    assert [(b[2]["id"], b[1]) for b in said["blocks"]] == [("c1", "{}"), ("c2", "{}")]


def test_a_late_fragment_of_an_earlier_call_goes_to_its_block_by_index():
    body = sse(
        chunk({"tool_calls": [call(0, '{"a":', "c1", "f")]}),
        chunk({"tool_calls": [call(1, "{}", "c2", "g")]}),
        chunk({"tool_calls": [call(0, "1}")]}),
        chunk({}, "tool_calls"),
    )
    final = accumulate(run(body))
    assert [b.input for b in final.content] == [{"a": 1}, {}]


# Properties

KEY = st.text(max_size=5)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEY, inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
OBJECT = st.dictionaries(st.text(max_size=6), JSON, max_size=4)
TEXT = st.text(max_size=20)
NAME = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,10}", fullmatch=True)
TEXT_BLOCK = st.builds(lambda t: {"type": "text", "text": t}, TEXT)
MEDIA = st.sampled_from(["image/png", "image/jpeg", "image/gif", "image/webp"])
BASE64 = st.builds(
    lambda m, d: {"type": "base64", "media_type": m, "data": d},
    MEDIA, st.from_regex(r"[A-Za-z0-9+/]{4,12}", fullmatch=True),
)  # fmt: skip
URL = st.builds(lambda u: {"type": "url", "url": "https://x.test/" + u}, NAME)
IMAGE_BLOCK = st.builds(lambda source: {"type": "image", "source": source}, BASE64 | URL)
TOOL = st.builds(lambda n, d: {"name": n, "description": d, "input_schema": SCHEMA}, NAME, TEXT)
CHOICES = [{"type": "auto"}, {"type": "any"}, {"type": "none"}]
OPTIONAL = {
    "system": st.one_of(TEXT, st.lists(TEXT_BLOCK, max_size=3)),
    "temperature": st.floats(0, 1), "top_p": st.floats(0, 1), "top_k": st.integers(1, 100),
    "stop_sequences": st.lists(st.text(min_size=1, max_size=5), max_size=3),
    "metadata": st.builds(lambda u: {"user_id": u}, NAME),
    "tools": st.lists(TOOL, max_size=3),
    "tool_choice": st.sampled_from([*CHOICES, {"type": "tool", "name": "f"}]).map(
        lambda c: c | {"disable_parallel_tool_use": True} if c["type"] == "tool" else c
    ),
}  # fmt: skip


def user_turn(draw: st.DrawFn, pending: list[str]) -> dict[str, Any]:
    """Text and images, and tool_result blocks (anywhere among them) for most pending calls."""
    blocks = [draw(TEXT_BLOCK | IMAGE_BLOCK) for _ in range(draw(st.integers(0, 2)))]
    for call_id in pending:
        if draw(st.integers(0, 3)):  # most calls answered, some left open
            result = {
                "type": "tool_result",
                "tool_use_id": call_id,
                "is_error": draw(st.booleans()),
            }
            content = draw(st.one_of(st.none(), TEXT, st.lists(TEXT_BLOCK, max_size=2)))
            if content is not None:
                result["content"] = content
            blocks.insert(draw(st.integers(0, len(blocks))), result)
    if not blocks or (not pending and draw(st.integers(0, 4)) == 0):
        return {"role": "user", "content": draw(TEXT)}
    return {"role": "user", "content": blocks}


def assistant_turn(draw: st.DrawFn, pending: list[str], serial: int) -> dict[str, Any]:
    """A string, or text, thinking and tool_use blocks (their ids appended to `pending`)."""
    if draw(st.integers(0, 3)) == 0:
        return {"role": "assistant", "content": draw(TEXT)}
    blocks: list[dict[str, Any]] = []
    for kind in draw(st.lists(st.sampled_from(["text", "tool_use", "thinking"]), max_size=3)):
        if kind == "text":
            blocks.append(draw(TEXT_BLOCK))
        elif kind == "thinking":
            blocks.append({"type": "thinking", "thinking": draw(TEXT), "signature": "s"})
        else:
            pending.append(f"toolu_{serial}_{len(blocks)}")
            use = {"type": "tool_use", "id": pending[-1], "name": draw(NAME)}
            blocks.append(use | {"input": draw(OBJECT)})
    return {"role": "assistant", "content": blocks}


@st.composite
def conversations(draw: st.DrawFn) -> dict[str, Any]:
    """A valid Messages request: turns alternate from the user's; each tool_use an assistant
    turn makes is answered (or not) by tool_result blocks of the next user turn."""
    messages: list[dict[str, Any]] = []
    pending: list[str] = []
    for turn in range(draw(st.integers(1, 6))):
        if turn % 2 == 0:
            messages.append(user_turn(draw, pending))
            pending = []
        else:
            messages.append(assistant_turn(draw, pending, turn))
    doc: dict[str, Any] = {"max_tokens": draw(st.integers(1, 4096)), "messages": messages}
    for key, strategy in OPTIONAL.items():
        if draw(st.booleans()):
            doc[key] = draw(strategy)
    return doc


def check_openai(body: dict[str, Any], doc: dict[str, Any]) -> None:
    """A well-formed chat completions request that says what `doc` said."""
    calls, answered = walk(body)
    uses = [b for m in doc["messages"] if isinstance(m["content"], list) for b in m["content"]]
    for use in (b for b in uses if b["type"] == "tool_use"):
        assert orjson.loads(calls[use["id"]]["function"]["arguments"]) == use["input"]
    assert answered == [b["tool_use_id"] for b in uses if b["type"] == "tool_result"]
    assert sum(1 for b in uses if b["type"] == "image") == image_parts(body)
    assert body["max_tokens"] == doc["max_tokens"] and body["stream"] is True


@given(conversations())
@PROPERTY
def test_valid_requests_translate_to_well_formed_openai_requests(doc):
    check_openai(tr.request(doc, "m", True), doc)


@st.composite
def openai_streams(draw: st.DrawFn) -> tuple[bytes, list[list[str]], str]:
    """A chat.completion.chunk stream as an engine writes it, with noise between events; what
    it says, as blocks (text, or tool_use and its arguments); the stop_reason expected."""
    chunks: list[Any] = [chunk({"role": "assistant", "content": ""})] if draw(st.booleans()) else []
    blocks: list[list[str]] = []
    tools = 0
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            pieces = draw(st.lists(st.text(max_size=6), min_size=1, max_size=4))
            chunks += [chunk({"content": piece}) for piece in pieces]
            if "".join(pieces):
                if blocks and blocks[-1][0] == "text":
                    blocks[-1][1] += "".join(pieces)
                else:
                    blocks.append(["text", "".join(pieces)])
            continue
        arguments = orjson.dumps(draw(OBJECT)).decode()
        cuts = sorted(draw(st.lists(st.integers(0, len(arguments)), max_size=3)))
        fragments = [
            arguments[a:b] for a, b in zip([0, *cuts], [*cuts, len(arguments)], strict=True)
        ]
        chunks.append(chunk({"tool_calls": [call(tools, "", f"call_{tools}", draw(NAME))]}))
        chunks += [chunk({"tool_calls": [call(tools, fragment)]}) for fragment in fragments]
        blocks.append(["tool_use", arguments])
        tools += 1
    finish = draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"]))
    chunks.append(chunk({}, finish))
    if draw(st.booleans()):
        chunks.append(USAGE)
    lines = [b"data: " + orjson.dumps(c) for c in chunks]
    if draw(st.booleans()):
        lines.append(b"data: [DONE]")
    noise = st.sampled_from([b"", b": keep-alive", b"event: delta", b"id: 7"])
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    body = b"".join(line + eol + draw(noise) + eol for line in lines)
    reason = tr.STOP_REASONS[finish]
    return body, blocks, "tool_use" if tools and reason == "end_turn" else reason


@given(openai_streams(), st.lists(st.integers(0, 4096), max_size=8))
@PROPERTY
def test_random_streams_cut_anywhere_write_the_same_well_formed_events(drawn, cuts):
    body, blocks, reason = drawn
    whole = run(body)
    assert run(body, [c for c in cuts if c < len(body)]) == whole
    assert run(body, list(range(1, len(body)))) == whole  # byte by byte
    said = check(whole)
    assert not said["error"] and [b[:2] for b in said["blocks"]] == blocks
    assert said["delta"]["delta"]["stop_reason"] == reason
    final = accumulate(whole)
    for block, (kind, text) in zip(final.content, blocks, strict=True):
        assert block.type == kind
        assert block.text == text if kind == "text" else block.input == json.loads(text)


# The official SDK, through the translators, in memory


class Host:
    """An OpenAI-only model host behind the translators, as the SDK's transport: it checks each
    translated request and answers with `answer` (a chat.completion, or chunks to stream)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.sent: list[dict[str, Any]] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        doc = json.loads(request.content)
        body = tr.request(doc, doc["model"], bool(doc.get("stream")))
        self.sent.append(body)
        if not body["stream"]:
            return httpx2.Response(200, json=tr.response(self.answer, doc["model"]))
        stream = tr.Stream(doc["model"])
        out = stream.feed(sse(*self.answer)) + stream.end()
        return httpx2.Response(200, content=out, headers={"content-type": "text/event-stream"})


def client(host: Host) -> Any:
    """The SDK's client on `host`, typed Any: the tests pass plain dicts where it types
    TypedDicts, and read blocks by their type without narrowing each."""
    transport = httpx2.Client(transport=httpx2.MockTransport(host))
    return anthropic.Anthropic(
        api_key="k", base_url="http://edge.test", http_client=transport, max_retries=0
    )


TOOLS = [{"name": "weather", "description": "Weather now.", "input_schema": SCHEMA}]


def test_the_sdk_round_trip_of_a_tool_call():
    calls = [
        {
            "id": "call_7",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
        }
    ]
    host = Host(completion({"content": None, "tool_calls": calls}, "tool_calls"))
    sdk = client(host)
    asked = [{"role": "user", "content": "Weather in Oslo?"}]
    first = sdk.messages.create(
        model="m", max_tokens=100, tools=TOOLS, messages=asked, system="Be brief."
    )
    assert first.stop_reason == "tool_use" and first.content[0].input == {"city": "Oslo"}
    host.answer = completion({"content": "12 C in Oslo."})
    result = {"type": "tool_result", "tool_use_id": first.content[0].id, "content": "12 C"}
    second = sdk.messages.create(
        model="m", max_tokens=100, tools=TOOLS,
        messages=[*asked, first.to_param(), {"role": "user", "content": [result]}],
    )  # fmt: skip
    assert second.content[0].text == "12 C in Oslo." and second.stop_reason == "end_turn"
    roles = [m["role"] for m in host.sent[1]["messages"]]
    assert roles == ["user", "assistant", "tool"]
    assert host.sent[1]["messages"][2]["tool_call_id"] == "call_7"


def test_the_sdk_streams_text_and_a_tool_call():
    host = Host(CHUNKS)
    sdk = client(host)
    source = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    content = [{"type": "image", "source": source}, {"type": "text", "text": "What is it?"}]
    with sdk.messages.stream(
        model="m", max_tokens=50, tools=TOOLS, messages=[{"role": "user", "content": content}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Héllo ✓" and final.content[0].text == text
    assert final.content[1].input == {"city": "Oslo"} and final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (5, 9)
    image_url = host.sent[0]["messages"][0]["content"][0]["image_url"]["url"]
    assert image_url == "data:image/png;base64,iVBORw0KGgo=" and host.sent[0]["stream"]


def test_the_sdk_raises_on_the_error_ending():
    class Broken(Host):
        def __call__(self, request):
            stream = tr.Stream("m")
            out = stream.feed(sse(chunk({"content": "part"}), done=False)) + stream.fail("Gone.")
            return httpx2.Response(200, content=out, headers={"content-type": "text/event-stream"})

    sdk = client(Broken(None))
    with pytest.raises(anthropic.APIStatusError, match="Gone."):
        with sdk.messages.stream(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            stream.get_final_message()


# A resumed stream: the client's own stream, begun by a host that speaks Anthropic's API, goes on
# from an OpenAI host (edge/proxy/native.py)

BEGUN = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), done=False)
REST = [  # the next host's stream, as the splice passes it on: no role, the usage billed whole
    chunk({"content": "lo "}),
    chunk({"content": "✓"}),
    chunk({}, "stop"),
    {"id": "chatcmpl-9", "choices": [], "usage": {"prompt_tokens": 99, "completion_tokens": 4}},
]


def test_a_resumed_stream_writes_the_open_blocks_deltas_then_the_messages_end():
    first = tr.Stream("claude-ish").feed(BEGUN)  # what the client got before the break
    out = tr.Stream.resumed("claude-ish", 0, 11).feed(sse(*REST))
    kinds = [(kind, doc.get("index")) for kind, doc in events(out)]
    assert kinds == [
        ("content_block_delta", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("message_delta", None), ("message_stop", None),
    ]  # fmt: skip
    said = check(first + out)
    assert said["blocks"] == [["text", "Hello ✓"]] and not said["error"]
    # The input tokens as message_start said them; the output as the (billed) usage says.
    assert said["delta"]["usage"] == {"input_tokens": 11, "output_tokens": 4}
    final = accumulate(first + out)
    assert final.content[0].text == "Hello ✓" and len(final.content) == 1
    assert final.id == "msg_chatcmpl-9" and final.stop_reason == "end_turn"


def test_a_resumed_stream_before_any_block_opens_the_first():
    first = tr.Stream("m").feed(sse(chunk({"role": "assistant", "content": ""}), done=False))
    assert [kind for kind, _ in events(first)] == ["message_start"]
    out = tr.Stream.resumed("m", -1, 3, output_tokens=2).feed(sse(*REST[:3]))
    said = check(first + out)
    assert said["blocks"] == [["text", "lo ✓"]]
    # No usage came: the output tokens are the client's, as given.
    assert said["delta"]["usage"] == {"input_tokens": 3, "output_tokens": 2}


def test_a_resumed_stream_goes_on_at_its_block_and_a_tool_call_takes_the_next():
    stream = tr.Stream.resumed("m", 2, 0)
    body = sse(
        chunk({"content": "x"}), chunk({"tool_calls": [call(0, "{}", "call_z", "f")]}),
        chunk({}, "tool_calls"),
    )  # fmt: skip
    found = [(kind, doc.get("index")) for kind, doc in events(stream.feed(body))]
    assert found[:4] == [
        ("content_block_delta", 2), ("content_block_stop", 2), ("content_block_start", 3),
        ("content_block_delta", 3),
    ]  # fmt: skip
    assert found[4:] == [("content_block_stop", 3), ("message_delta", None), ("message_stop", None)]


def test_a_resumed_stream_cut_again_ends_with_the_error_event_once():
    stream = tr.Stream.resumed("m", 0, 1)
    out = stream.feed(sse(chunk({"content": "more"}), done=False))
    end = stream.end()  # a clean end with no finish: cut short, not whole
    assert [kind for kind, _ in events(out + end)] == ["content_block_delta", "error"]
    assert stream.end() == b"" and stream.fail("x") == b"" and stream.feed(sse(*REST)) == b""
    failed = tr.Stream.resumed("m", 0, 1)
    assert [kind for kind, _ in events(failed.fail("Gone."))] == ["error"]

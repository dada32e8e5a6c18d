"""edge/dialects/gemini.py: Gemini's REST API through an OpenAI-only host.

Each mapping of a request field (and the JSON the google-genai SDK really sends), the answer
checked against the SDK's own types, the stream (SSE and the JSON array) checked against a
grammar of Gemini's stream, fed whole and cut anywhere, and property tests of both directions.
The SDK checks run where google-genai is installed; the grammar checks run everywhere.
"""

from __future__ import annotations

import json
from typing import Any

import httpx2
import orjson
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as gtypes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.chat.completion_create_params import CompletionCreateParamsBase
from pydantic import TypeAdapter

from edge.dialects import GEMINI
from edge.dialects import gemini as tr
from edge.dialects.errors import error_event
from edge.errors import BadRequest
from tests.dialects.openai_shape import CHUNKS, STREAM, USAGE, call, chunk, image_parts, sse, walk

OPENAI_REQUEST = TypeAdapter(CompletionCreateParamsBase)
SECRET = "the-prompt-text-never-echoed"
PROPERTY = settings(
    max_examples=100, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip


def sdk(doc: dict[str, Any]) -> Any:
    """The SDK's GenerateContentResponse of `doc`: its types forbid unknown fields."""
    return gtypes.GenerateContentResponse.model_validate(doc)


def req(contents: Any = None, **fields: Any) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": "hi"}]}] if contents is None
            else contents, **fields}  # fmt: skip


def translate(doc: dict[str, Any], stream: bool = False) -> dict[str, Any]:
    body = tr.request(doc, "m", stream)
    checked = OPENAI_REQUEST.validate_python(body)  # the openai SDK's own request type
    list(checked["messages"])  # an Iterable: its items are checked as it is consumed
    list(checked.get("tools", ()))
    return body


def refused(doc: Any) -> str:
    with pytest.raises(BadRequest) as caught:
        tr.request(doc, "m", False)
    assert caught.value.status == 400 and SECRET not in caught.value.message
    return caught.value.message


def user(*parts: Any, role: str | None = "user") -> dict[str, Any]:
    return {"parts": list(parts)} | ({"role": role} if role else {})


def model(*parts: Any) -> dict[str, Any]:
    return {"role": "model", "parts": list(parts)}


def text(value: str) -> dict[str, Any]:
    return {"text": value}


def fcall(name: str, args: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"functionCall": {"name": name, "args": args or {}, **extra}}


def fresponse(name: str, response: Any = None, **extra: Any) -> dict[str, Any]:
    return {"functionResponse": {"name": name, "response": response or {"ok": 1}, **extra}}


# The request, field by field


def test_the_envelope_model_stream_and_usage_asked_for():
    body = translate(req(), stream=True)
    assert body["model"] == "m" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    body = translate(req())
    assert body["stream"] is False and "stream_options" not in body
    assert body["messages"] == [{"role": "user", "content": "hi"}]


def test_roles_user_model_and_none_is_user_and_the_system_instruction_joined():
    contents = [user(text("a"), role=None), model(text("b"), text("c")), user(text("d"))]
    system = {"parts": [text("Be brief."), text("Be kind.")]}
    body = translate(req(contents, systemInstruction=system))
    assert body["messages"] == [
        {"role": "system", "content": "Be brief.\nBe kind."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "bc"},
        {"role": "user", "content": "d"},
    ]
    snake = translate(req(system_instruction={"role": "user", "parts": [text("S")]}))
    assert snake["messages"][0] == {"role": "system", "content": "S"}
    assert translate(req(systemInstruction="plain"))["messages"][0]["content"] == "plain"
    assert translate(req(systemInstruction={"parts": []}))["messages"][0]["role"] == "user"
    assert "systemInstruction" in refused(req(systemInstruction={"parts": [{"inlineData": {}}]}))


def test_several_user_parts_are_typed_parts():
    body = translate(req([user(text("a"), text("b"))]))
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "a"},
        {"type": "text", "text": "b"},
    ]


def test_an_image_becomes_a_data_uri_in_either_spelling():
    png = {"inlineData": {"mimeType": "image/png", "data": "iVBORw=="}}
    jpeg = {"inline_data": {"mime_type": "image/jpeg", "data": "/9j/"}}
    body = translate(req([user(text("what?"), png, jpeg)]))
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "what?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw=="}},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/"}},
    ]


def test_parts_that_cannot_be_sent_are_refused_by_place_and_kind():
    pdf = {"inlineData": {"mimeType": "application/pdf", "data": SECRET}}
    message = refused(req([user(text(SECRET), pdf)]))
    assert "contents[0].parts[1]" in message and '"application/pdf"' in message
    odd = {"inlineData": {"mimeType": SECRET + "\n" * 80, "data": "x"}}
    assert "(unnamed)" in refused(req([user(odd)]))
    uri = {"fileData": {"mimeType": "image/png", "fileUri": "gs://" + SECRET}}
    assert "fileData" in refused(req([user(uri)]))
    code = {"executableCode": {"language": "PYTHON", "code": SECRET}}
    assert '"executableCode"' in refused(req([user(code)]))
    png = {"inlineData": {"mimeType": "image/png", "data": "iVBORw=="}}
    assert '"inlineData"' in refused(req([user(text("q")), model(png)]))  # no images from it


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        ({}, "contents"),
        ({"contents": []}, "contents"),
        ({"contents": "hi"}, "contents"),
        ({"contents": ["hi"]}, "contents[0]"),
        ({"contents": [{"role": "user"}]}, "contents[0].parts"),
        ({"contents": [{"role": "user", "parts": []}]}, "contents[0].parts"),
        ({"contents": [{"role": "system", "parts": [text(SECRET)]}]}, "contents[0].role"),
        ({"contents": [user(text(SECRET), {"text": 3})]}, "contents[0].parts[1].text"),
        ({"contents": [model(fcall(SECRET, None) | {"functionCall": {"args": {}}})]}, "name"),
        ({"contents": [model({"functionCall": {"name": "f", "args": [SECRET]}})]}, "args"),
        ({"contents": [user(fresponse("f"))]}, "contents[0].parts[0]"),
        (req(generationConfig={"temperature": SECRET}), "generationConfig.temperature"),
        (req(generationConfig={"temperature": True}), "generationConfig.temperature"),
        (req(generationConfig={"maxOutputTokens": 1.5}), "generationConfig.maxOutputTokens"),
        (req(generationConfig={"stopSequences": [SECRET, 1]}), "stopSequences"),
        (req(generationConfig={"responseMimeType": "text/x.enum"}), '"text/x.enum"'),
        (req(generationConfig=[SECRET]), "generationConfig"),
        (req(tools=[{"googleSearch": {}}]), '"googleSearch"'),
        (req(tools={"functionDeclarations": []}), "tools"),
        (req(tools=[{"functionDeclarations": [{"description": SECRET}]}]), "name"),
    ],
)
def test_invalid_or_untranslatable_requests_are_refused_by_place(doc, where):
    assert where in refused(doc)


def test_a_body_that_is_not_an_object_is_refused():
    assert "object" in refused([SECRET])


def test_generation_config_every_field_in_either_spelling():
    camel = {
        "temperature": 0.5, "topP": 0.9, "topK": 20.0, "maxOutputTokens": 50,
        "stopSequences": ["x", "y"], "candidateCount": 2, "seed": 3,
        "presencePenalty": 0.1, "frequencyPenalty": -0.2,
        "thinkingConfig": {"thinkingBudget": 0}, "responseModalities": ["TEXT"],
    }  # fmt: skip
    expected = {
        "temperature": 0.5, "top_p": 0.9, "top_k": 20, "max_tokens": 50, "stop": ["x", "y"],
        "n": 2, "seed": 3, "presence_penalty": 0.1, "frequency_penalty": -0.2,
    }  # fmt: skip
    body = translate(req(generationConfig=camel))
    assert {k: body[k] for k in expected} == expected and isinstance(body["top_k"], int)
    assert set(body) == {"model", "messages", "stream", *expected}
    snake = {
        "temperature": 0.5, "top_p": 0.9, "top_k": 20, "max_output_tokens": 50,
        "stop_sequences": ["x", "y"], "candidate_count": 2, "seed": 3,
        "presence_penalty": 0.1, "frequency_penalty": -0.2,
    }  # fmt: skip
    body = translate(req(generation_config=snake))
    assert {k: body[k] for k in expected} == expected


def test_safety_settings_and_cached_content_are_ignored():
    safety = [{"category": "HARM_CATEGORY_HATE_SPEECH", "threshold": "BLOCK_NONE"}]
    body = translate(req(safetySettings=safety, cachedContent="cachedContents/1", labels={}))
    assert set(body) == {"model", "messages", "stream"}


def test_json_output_with_and_without_a_schema():
    def fmt(**config: Any) -> Any:
        return translate(req(generationConfig=config)).get("response_format")

    assert fmt(responseMimeType="text/plain") is None
    assert fmt(responseMimeType="application/json") == {"type": "json_object"}
    schema = {
        "type": "OBJECT",
        "properties": {
            "TYPE": {"type": "STRING", "nullable": True, "enum": ["A", "B"]},
            "any_of": {"type": "ARRAY", "items": {"type": "INTEGER"}, "max_items": 3},
            "either": {"any_of": [{"type": "NUMBER"}, {"type": "BOOLEAN"}]},
        },
        "required": ["TYPE"],
        "propertyOrdering": ["TYPE", "any_of"],
    }
    assert fmt(responseMimeType="application/json", responseSchema=schema) == {
        "type": "json_schema",
        "json_schema": {
            "name": "response",
            "schema": {
                "type": "object",
                "properties": {  # property names are names: kept as they are
                    "TYPE": {"type": ["string", "null"], "enum": ["A", "B"]},
                    "any_of": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
                    "either": {"anyOf": [{"type": "number"}, {"type": "boolean"}]},
                },
                "required": ["TYPE"],
            },
        },
    }
    raw = {"type": "object", "properties": {"a": {"type": ["string", "null"]}}}
    said = fmt(response_mime_type="application/json", response_json_schema=raw)
    assert said["json_schema"]["schema"] == raw  # JSON Schema already: as it came
    deep: dict[str, Any] = {"type": "STRING"}
    for _ in range(80):
        deep = {"type": "ARRAY", "items": deep}
    assert "too deeply" in refused(
        req(generationConfig={"responseMimeType": "application/json", "responseSchema": deep})
    )


WEATHER = {
    "name": "weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "OBJECT",
        "properties": {"city": {"type": "STRING"}, "days": {"type": "INTEGER"}},
        "required": ["city"],
    },
}
CLOCK = {"name": "clock", "parameters_json_schema": {"type": "object", "properties": {}}}
NOARGS = {"name": "ping"}


def test_function_declarations_become_tools():
    tools = [{"functionDeclarations": [WEATHER, CLOCK]}, {"function_declarations": [NOARGS]}]
    body = translate(req(tools=tools))
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "The weather in a city.",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                    "required": ["city"],
                },
            },
        },
        {"type": "function", "function": CLOCK_FUNCTION},
        {"type": "function", "function": {"name": "ping", "parameters": EMPTY_OBJECT}},
    ]
    assert "tool_choice" not in body
    assert "tools" not in translate(req(tools=[]))


CLOCK_FUNCTION = {"name": "clock", "parameters": {"type": "object", "properties": {}}}
EMPTY_OBJECT = {"type": "object", "properties": {}}


@pytest.mark.parametrize(
    ("config", "choice", "names"),
    [
        ({"mode": "AUTO"}, "auto", ["weather", "clock", "ping"]),
        ({"mode": "VALIDATED"}, "auto", ["weather", "clock", "ping"]),
        ({"mode": "NONE"}, "none", ["weather", "clock", "ping"]),
        ({"mode": "ANY"}, "required", ["weather", "clock", "ping"]),
        ({"mode": "MODE_UNSPECIFIED"}, None, ["weather", "clock", "ping"]),
        ({}, None, ["weather", "clock", "ping"]),
        (
            {"mode": "ANY", "allowedFunctionNames": ["clock"]},
            {"type": "function", "function": {"name": "clock"}},
            ["clock"],
        ),
        (
            {"mode": "ANY", "allowed_function_names": ["clock", "ping"]},
            "required",
            ["clock", "ping"],
        ),
    ],
)
def test_function_calling_config_becomes_tool_choice(config, choice, names):
    tools = [{"functionDeclarations": [WEATHER, CLOCK, NOARGS]}]
    body = translate(req(tools=tools, toolConfig={"functionCallingConfig": config}))
    assert body.get("tool_choice") == choice
    assert [tool["function"]["name"] for tool in body["tools"]] == names


def test_function_calling_config_that_cannot_hold_is_refused():
    tools = [{"functionDeclarations": [WEATHER]}]
    bad = {"functionCallingConfig": {"mode": "SOMETIMES"}}
    assert "mode" in refused(req(tools=tools, toolConfig=bad))
    none = {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["nope"]}}
    assert "allowedFunctionNames" in refused(req(tools=tools, toolConfig=none))
    # No tools: nothing to choose from, and OpenAI refuses a tool_choice alone.
    assert "tool_choice" not in translate(
        req(toolConfig={"functionCallingConfig": {"mode": "ANY"}})
    )


def test_a_tool_call_round_trip_ids_stable_and_answered_by_name_in_order():
    contents = [
        user(text("Weather in Oslo and Paris, and the time?")),
        model(text("Let me look."), fcall("weather", {"city": "Oslo"}),
              fcall("weather", {"city": "Paris"}), fcall("clock")),
        user(fresponse("clock", {"t": "12:00"}), fresponse("weather", {"sky": "rain"}),
             fresponse("weather", {"sky": "sun"}), text("Thanks.")),
        model(text("Rain in Oslo, sun in Paris, noon.")),
    ]  # fmt: skip
    body = translate(req(contents))
    assert body["messages"][1:4] == [
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                tool_call("call_1_0", "weather", {"city": "Oslo"}),
                tool_call("call_1_1", "weather", {"city": "Paris"}),
                tool_call("call_1_2", "clock", {}),
            ],
        },
        {"role": "tool", "tool_call_id": "call_1_2", "content": '{"t":"12:00"}'},
        {"role": "tool", "tool_call_id": "call_1_0", "content": '{"sky":"rain"}'},
    ]
    assert body["messages"][4] == {
        "role": "tool",
        "tool_call_id": "call_1_1",
        "content": '{"sky":"sun"}',
    }
    assert body["messages"][5:] == [
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "Rain in Oslo, sun in Paris, noon."},
    ]
    assert translate(req(contents)) == body  # the same history, the same ids: the same prompt


def tool_call(call_id: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    function = {"name": name, "arguments": json.dumps(args, separators=(",", ":"))}
    return {"id": call_id, "type": "function", "function": function}


def test_calls_with_ids_are_answered_by_id_and_a_call_alone_has_no_content():
    contents = [
        user(text("go")),
        model(fcall("f", {"n": 1}, id="a"), fcall("f", {"n": 2}, id="b")),
        user(fresponse("f", {"r": 2}, id="b"), fresponse("f", {"r": 1}, id="a")),
    ]
    messages = translate(req(contents))["messages"]
    assert messages[1]["content"] is None
    assert [m["tool_call_id"] for m in messages[2:]] == ["call_1_1", "call_1_0"]
    # A response with an unknown id still answers the open call of its name.
    contents[2] = user(fresponse("f", id="zzz"))
    assert translate(req(contents))["messages"][2]["tool_call_id"] == "call_1_0"


def test_odd_values_are_refused_not_crashed_on():
    tools = [{"functionDeclarations": [WEATHER]}]
    for calling in ({"mode": ["ANY"]}, {"mode": {"a": 1}}):
        assert "mode" in refused(req(tools=tools, toolConfig={"functionCallingConfig": calling}))
    odd = {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [{"a": 1}]}}
    assert "allowedFunctionNames" in refused(req(tools=tools, toolConfig=odd))
    assert "role" in refused(req([{"role": ["user"], "parts": [text(SECRET)]}]))


def test_an_odd_answer_is_read_as_far_as_it_goes():
    doc = {"choices": ["x", {"message": "y", "finish_reason": ["stop"]}], "usage": [1]}
    said = tr.response(doc, "m")
    assert said["candidates"] == [
        {"content": {"role": "model", "parts": []}, "index": 0, "finishReason": "OTHER"}
    ]
    sdk(said)


def test_a_function_response_must_answer_the_previous_model_turn():
    asked = [user(text("go")), model(fcall("f"))]
    assert "contents[2].parts[0]" in refused(req([*asked, user(fresponse("g"))]))
    twice = [*asked, user(fresponse("f")), user(fresponse("f"))]
    assert "contents[3].parts[0]" in refused(req(twice))
    later = [*asked, model(text("ok")), user(fresponse("f"))]
    assert "previous model turn" in refused(req(later))
    # Older clients send the answers in a turn of role "function".
    body = translate(req([*asked, {"role": "function", "parts": [fresponse("f")]}]))
    assert body["messages"][-1]["role"] == "tool"


def test_thought_parts_of_the_model_are_not_replayed():
    contents = [
        user(text("q")),
        model({"text": "hmm", "thought": True}, text("a")),
        user(text("b")),
    ]
    assert translate(req(contents))["messages"][1] == {"role": "assistant", "content": "a"}
    alone = [user(text("q")), model({"text": "hmm", "thought": True}), user(text("b"))]
    assert translate(req(alone))["messages"][1] == {"role": "assistant", "content": ""}


# What the google-genai SDK (2.25) sends, captured: snake_case inside inlineData and function
# declarations, topK as a float, systemInstruction with a role.
SDK_REQUEST: dict[str, Any] = {
    "contents": [
        {"parts": [{"text": "hello"},
                   {"inlineData": {"data": "iVBORw==", "mime_type": "image/png"}}],
         "role": "user"},
        {"parts": [{"functionCall": {"args": {"city": "Paris"}, "name": "weather"}}],
         "role": "model"},
        {"parts": [{"functionResponse": {"name": "weather", "response": {"result": "sun"}}}],
         "role": "user"},
    ],
    "systemInstruction": {"parts": [{"text": "be brief"}], "role": "user"},
    "safetySettings": [{"category": "HARM_CATEGORY_HATE_SPEECH", "threshold": "BLOCK_NONE"}],
    "tools": [{"functionDeclarations": [
        {"description": "w", "name": "weather",
         "parameters": {"properties": {"city": {"type": "STRING"}}, "required": ["city"],
                        "type": "OBJECT"}},
        {"description": "Get weather.", "name": "forecast",
         "parameters_json_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                    "required": ["city"]},
         "response_json_schema": {"type": "string"}},
    ]}],
    "toolConfig": {"functionCallingConfig": {"allowedFunctionNames": ["weather"], "mode": "ANY"}},
    "generationConfig": {
        "temperature": 0.5, "topP": 0.9, "topK": 20.0, "candidateCount": 1, "maxOutputTokens": 50,
        "stopSequences": ["x"], "presencePenalty": 0.1, "frequencyPenalty": 0.2, "seed": 3,
        "responseMimeType": "application/json",
        "responseSchema": {"properties": {"a": {"type": "STRING"}}, "type": "OBJECT"},
    },
}  # fmt: skip


def test_the_request_the_sdk_sends():
    body = translate(SDK_REQUEST, stream=True)
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "tool"]
    assert body["messages"][1]["content"][1]["image_url"]["url"] == "data:image/png;base64,iVBORw=="
    assert body["messages"][3] == {
        "role": "tool",
        "tool_call_id": "call_1_0",
        "content": '{"result":"sun"}',
    }
    assert body["tools"] == [
        {"type": "function", "function": {"name": "weather", "description": "w", "parameters": {
            "properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"}}}
    ]  # fmt: skip
    assert body["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert body["top_k"] == 20 and body["max_tokens"] == 50 and body["n"] == 1
    assert body["response_format"]["json_schema"]["schema"] == {
        "properties": {"a": {"type": "string"}},
        "type": "object",
    }


# The answer


def completion(message: dict[str, Any], finish: str | None = "stop", **doc: Any) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}
    usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    return {"id": "chatcmpl-1", "object": "chat.completion", "choices": [choice],
            "usage": usage} | doc  # fmt: skip


def test_a_text_answer():
    doc = tr.response(completion({"content": "Hello ✓"}), "gemma")
    assert doc == {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": "Hello ✓"}]},
                "index": 0,
                "finishReason": "STOP",
            }
        ],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 7, "totalTokenCount": 12},
        "modelVersion": "gemma",
        "responseId": "chatcmpl-1",
    }
    parsed = sdk(doc)
    assert parsed.text == "Hello ✓" and parsed.usage_metadata.total_token_count == 12


def test_a_tool_calling_answer():
    calls = [
        {"id": "c1", "type": "function",
         "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}},
        {"id": "c2", "type": "function", "function": {"name": "clock", "arguments": ""}},
    ]  # fmt: skip
    doc = tr.response(completion({"content": None, "tool_calls": calls}, "tool_calls"), "m")
    candidate = doc["candidates"][0]
    assert candidate["content"]["parts"] == [
        {"functionCall": {"name": "weather", "args": {"city": "Oslo"}}},
        {"functionCall": {"name": "clock", "args": {}}},
    ]
    assert candidate["finishReason"] == "STOP"
    assert [(c.name, c.args) for c in sdk(doc).function_calls] == [
        ("weather", {"city": "Oslo"}),
        ("clock", {}),
    ]


@pytest.mark.parametrize("arguments", ['{"city": "Os', "[1, 2]", "null", '"text"'])
def test_arguments_that_are_not_a_json_object_are_a_malformed_call(arguments):
    calls = [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": arguments}},
        {"id": "c2", "type": "function", "function": {"name": "clock", "arguments": "{}"}},
    ]
    doc = tr.response(completion({"content": "so", "tool_calls": calls}, "tool_calls"), "m")
    candidate = doc["candidates"][0]
    assert candidate["content"]["parts"] == [
        {"text": "so"},
        {"functionCall": {"name": "clock", "args": {}}},
    ]
    assert candidate["finishReason"] == "MALFORMED_FUNCTION_CALL"
    assert candidate["finishMessage"] == f"Malformed function call: weather {arguments}"
    sdk(doc)


@pytest.mark.parametrize(
    ("finish", "reason"),
    [
        ("stop", "STOP"), ("length", "MAX_TOKENS"), ("tool_calls", "STOP"),
        ("function_call", "STOP"), ("content_filter", "SAFETY"), ("abort", "OTHER"), (None, None),
    ],
)  # fmt: skip
def test_finish_reasons(finish, reason):
    candidate = tr.response(completion({"content": "x"}, finish), "m")["candidates"][0]
    assert candidate.get("finishReason") == reason
    sdk({"candidates": [candidate]})


def test_reasoning_a_thought_part_and_thought_and_cached_tokens_apart():
    usage = {
        "prompt_tokens": 10, "completion_tokens": 30, "total_tokens": 40,
        "completion_tokens_details": {"reasoning_tokens": 20},
        "prompt_tokens_details": {"cached_tokens": 8},
    }  # fmt: skip
    message = {"content": "42", "reasoning_content": "think"}
    doc = tr.response(completion(message, usage=usage), "m")
    assert doc["candidates"][0]["content"]["parts"] == [
        {"text": "think", "thought": True},
        {"text": "42"},
    ]
    assert doc["usageMetadata"] == {
        "promptTokenCount": 10, "candidatesTokenCount": 10, "totalTokenCount": 40,
        "thoughtsTokenCount": 20, "cachedContentTokenCount": 8,
    }  # fmt: skip
    assert sdk(doc).text == "42"  # the SDK leaves thoughts out of the text
    also = tr.response(completion({"content": "", "reasoning": "r"}), "m")
    assert also["candidates"][0]["content"]["parts"] == [{"text": "r", "thought": True}]


def test_several_choices_are_candidates_and_a_bare_answer_is_still_one():
    doc = completion({"content": "a"})
    doc["choices"].append({"index": 1, "message": {"content": "b"}, "finish_reason": "length"})
    said = tr.response(doc, "m")
    assert [(c["index"], c["content"]["parts"], c["finishReason"]) for c in said["candidates"]] == [
        (0, [{"text": "a"}], "STOP"),
        (1, [{"text": "b"}], "MAX_TOKENS"),
    ]
    sdk(said)
    bare = tr.response({}, "m")
    assert bare == {"candidates": [], "modelVersion": "m"}
    sdk(bare)


# The stream


META = {"promptTokenCount": 5, "candidatesTokenCount": 9, "totalTokenCount": 14}


def run(body: bytes, cuts: list[int] | None = None, sse: bool = True, close: str = "end") -> bytes:
    """What a Stream writes for `body` fed in pieces cut at `cuts` (whole without), then its
    end() (or fail(), or nothing)."""
    stream, out, at = tr.Stream("gemma", sse), [], 0
    for cut in sorted(set(cuts or [])):
        out.append(stream.feed(body[at:cut]))
        at = cut
    out.append(stream.feed(body[at:]))
    if close == "end":
        out.append(stream.end())
    elif close == "fail":
        out.append(stream.fail("The model server failed."))
    return b"".join(out)


ERROR = {"error": {"code": 502, "message": "The model server failed.", "status": "UNAVAILABLE"}}


def elements(out: bytes, sse: bool) -> list[dict[str, Any]]:
    """The elements of Gemini's stream, its framing checked: SSE events `data: {json}` ended by
    a blank line (CRLF; the edge's error event LF), or one JSON array, elements split by
    `,\\r\\n`. JSON holds no raw newline, so each element is found by the framing alone."""
    found = []
    if not sse:
        assert out[:1] == b"[" and out[-1:] == b"]", out[:20]
        inner = out[1:-1]
        found = [orjson.loads(piece) for piece in inner.split(b",\r\n")] if inner else []
        assert found == orjson.loads(out)
        return found
    rest = out
    while rest:
        assert rest.startswith(b"data: ")
        end = rest.index(b"\n")
        if rest[end - 1 : end] == b"\r":
            assert rest[end - 1 : end + 3] == b"\r\n\r\n"
            found.append(orjson.loads(rest[6 : end - 1]))
            rest = rest[end + 3 :]
        else:
            assert rest[end : end + 2] == b"\n\n" and "error" in orjson.loads(rest[6:end])
            found.append(orjson.loads(rest[6:end]))
            rest = rest[end + 2 :]
    return found


def check(out: bytes, sse: bool = True) -> dict[str, Any]:
    """Gemini's stream grammar, checked on `out`: elements that the SDK's types take, each
    candidate's finishReason once and nothing of it after, usage once and on the last element
    with candidates or after, an error element only last. What it says, per candidate: the text,
    the thoughts, the calls, the finishReason; the usage; whether it ended in an error."""
    said: dict[str, Any] = {"candidates": {}, "usage": None, "error": None}
    found = elements(out, sse)
    for at, element in enumerate(found):
        assert said["error"] is None, "nothing after an error"
        if "error" in element:
            assert element == {"error": element["error"]} and at == len(found) - 1
            assert set(element["error"]) == {"code", "message", "status"}
            said["error"] = element["error"]
            continue
        sdk(element)
        assert element["modelVersion"] == "gemma" and said["usage"] is None
        said["usage"] = element.get("usageMetadata")
        for candidate in element.get("candidates", ()):
            mine = said["candidates"].setdefault(
                candidate["index"], {"text": "", "thoughts": "", "calls": [], "finish": None}
            )
            assert mine["finish"] is None, "nothing of a candidate after its finishReason"
            assert candidate["content"]["role"] == "model"
            assert candidate["content"]["parts"] or "finishReason" in candidate
            for part in candidate["content"]["parts"]:
                if "functionCall" in part:
                    call = part["functionCall"]
                    assert set(call) == {"name", "args"} and isinstance(call["args"], dict)
                    mine["calls"].append((call["name"], call["args"]))
                else:
                    assert part["text"] and set(part) <= {"text", "thought"}
                    mine["thoughts" if part.get("thought") else "text"] += part["text"]
            mine["finish"] = candidate.get("finishReason")
    return said


def test_a_stream_of_text_and_tool_calls_sse():
    out = run(STREAM)
    assert out.count(b"\r\n\r\n") == 3  # two texts, then the calls with the reason and usage
    said = check(out)
    assert said == {
        "candidates": {
            0: {
                "text": "Héllo ✓",
                "thoughts": "",
                "calls": [("weather", {"city": "Oslo"}), ("clock", {"tz": "UTC"})],
                "finish": "STOP",
            }
        },
        "usage": META,
        "error": None,
    }
    last = elements(out, True)[-1]
    assert last["responseId"] == "chatcmpl-9" and last["usageMetadata"] == META


def test_a_stream_as_a_json_array():
    out = run(STREAM, sse=False)
    assert out.startswith(b'[{"candidates"') and out.count(b",\r\n") == 2 and out.endswith(b"}]")
    assert check(out, sse=False) == check(run(STREAM))


def test_each_chunk_goes_out_as_it_arrives():
    stream = tr.Stream("gemma", True)
    assert stream.feed(b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}') == b""
    first = stream.feed(b"\n")
    assert elements(first, True)[0]["candidates"][0]["content"]["parts"] == [{"text": "a"}]
    # The finish waits for the usage chunk that follows it, then goes out with it.
    assert stream.feed(sse(chunk({}, "stop"), done=False)) == b""
    assert elements(stream.feed(sse(USAGE, done=False)), True)[0]["usageMetadata"] == META
    assert stream.feed(b"data: [DONE]\n\n") == b"" and stream.end() == b""


def test_without_a_usage_chunk_the_finish_goes_out_at_done_or_at_the_end():
    stream = tr.Stream("gemma", True)
    assert stream.feed(sse(chunk({"content": "a"}, "length"), done=False)) == b""
    said = check(stream.feed(b"data: [DONE]\n\n"))
    assert said["candidates"][0]["finish"] == "MAX_TOKENS" and said["usage"] is None
    said = check(run(sse(chunk({"content": "a"}, "stop"), done=False)))
    assert said["candidates"][0] == {"text": "a", "thoughts": "", "calls": [], "finish": "STOP"}


def test_usage_in_the_finish_chunk_goes_out_at_once():
    both = chunk({"content": "a"}, "stop") | {"usage": USAGE["usage"]}
    out = tr.Stream("gemma", True).feed(sse(both, done=False))
    assert check(out)["usage"] == META


def test_any_single_cut_or_byte_by_byte_writes_the_same_stream():
    for framing in (True, False):
        whole = run(STREAM, sse=framing)
        for cut in range(1, len(STREAM)):
            assert run(STREAM, [cut], sse=framing) == whole
        assert run(STREAM, list(range(1, len(STREAM))), sse=framing) == whole


def test_comments_event_lines_keepalives_crlf_and_unknown_fields_are_ignored():
    noisy = (
        b": keep-alive\r\n\r\nevent: chunk\r\nid: 3\r\n"
        b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"a","x":1},"logprobs":null,'
        b'"finish_reason":null}],"system_fingerprint":"f","new":{"field":[]}}\r\n\r\n'
        b"data:\r\n\r\n"
        b'data:{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\r\n\r\n'
        b"data: [DONE]\r\n\r\n"
    )
    said = check(run(noisy))
    assert said["candidates"][0] == {"text": "a", "thoughts": "", "calls": [], "finish": "STOP"}


def test_reasoning_deltas_are_thought_parts():
    body = sse(chunk({"reasoning_content": "hm"}), chunk({"reasoning": "m"}),
               chunk({"content": "ok"}, "stop"))  # fmt: skip
    said = check(run(body))["candidates"][0]
    assert said["thoughts"] == "hmm" and said["text"] == "ok"


def test_several_choices_gather_their_calls_apart():
    body = sse(
        chunk({"content": "a"}, index=0),
        chunk({"tool_calls": [call(0, '{"x"', "c0", "f")]}, index=1),
        chunk({"content": "b"}, index=0),
        chunk({"tool_calls": [call(0, ": 1}")]}, index=1),
        chunk({}, "stop", index=0),
        chunk({}, "tool_calls", index=1),
        USAGE,
    )
    said = check(run(body))
    assert said["candidates"][0] == {"text": "ab", "thoughts": "", "calls": [], "finish": "STOP"}
    assert said["candidates"][1]["calls"] == [("f", {"x": 1})] and said["usage"] == META


def test_a_malformed_call_in_a_stream():
    body = sse(chunk({"tool_calls": [call(0, '{"x": ', "c0", "f")]}), chunk({}, "tool_calls"))
    last = elements(run(body), True)[-1]["candidates"][0]
    assert last["finishReason"] == "MALFORMED_FUNCTION_CALL" and last["content"]["parts"] == []
    assert last["finishMessage"] == 'Malformed function call: f {"x": '


def test_tool_calls_without_indexes_are_told_apart_by_id():
    no_index = [
        {"id": "a", "function": {"name": "f", "arguments": "{}"}},
        {"id": "b", "function": {"name": "g", "arguments": '{"y"'}},
        {"function": {"arguments": ": 2}"}},
    ]
    body = sse(chunk({"tool_calls": no_index}), chunk({}, "tool_calls"))
    assert check(run(body))["candidates"][0]["calls"] == [("f", {}), ("g", {"y": 2})]


def test_calls_of_a_choice_never_finished_go_out_whole_at_done():
    body = sse(chunk({"tool_calls": [call(0, '{"a": 1}', "c0", "f")]}), done=True)
    said = check(run(body))
    assert said["candidates"][0]["calls"] == [("f", {"a": 1})]
    assert said["candidates"][0]["finish"] is None and said["error"] is None


@pytest.mark.parametrize("framing", [True, False])
def test_a_clean_end_without_done_or_finish_is_a_cut_answer(framing):
    said = check(run(sse(chunk({"content": "a"}), done=False), sse=framing), sse=framing)
    assert said["error"]["status"] == "UNAVAILABLE" and said["candidates"][0]["text"] == "a"
    assert check(run(b"", sse=framing), sse=framing)["error"]
    calls = sse(chunk({"tool_calls": [call(0, '{"a": 1}', "c0", "f")]}), done=False)
    said = check(run(calls, sse=framing), sse=framing)
    assert said["error"] and not said["candidates"]  # half a call is no call


def test_a_last_line_without_its_newline_is_read_at_the_end():
    last = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
    said = check(run(sse(chunk({"content": "a"}), done=False) + last))
    assert said["candidates"][0]["finish"] == "STOP" and said["error"] is None


def test_done_alone_or_nothing_at_all():
    assert run(b"data: [DONE]\n\n") == b"" and run(b"data: [DONE]\n\n", sse=False) == b"[]"


def test_done_then_nothing_more():
    stream = tr.Stream("gemma", True)
    out = stream.feed(sse(chunk({"content": "a"}, "stop")) + sse(chunk({"content": "b"})))
    assert check(out)["candidates"][0]["text"] == "a"
    assert stream.feed(sse(chunk({"content": "c"}))) == b""
    assert stream.fail("late") == b""  # after [DONE] a failure is a clean end: nothing to add
    assert stream.end() == b""


@pytest.mark.parametrize("framing", [True, False])
def test_fail_ends_with_the_error_element_then_nothing(framing):
    stream = tr.Stream("gemma", framing)
    out = stream.feed(sse(chunk({"content": "partial"}), done=False))
    tail = stream.fail("The model server failed.")
    said = check(out + tail, sse=framing)
    assert said["error"] == ERROR["error"] and said["candidates"][0]["text"] == "partial"
    if framing:
        assert tail == error_event(GEMINI, "The model server failed.")
    else:
        assert tail == b",\r\n" + orjson.dumps(ERROR) + b"]"
    assert stream.feed(b"data: [DONE]\n\n") == b"" and stream.end() == b""
    assert stream.fail("x") == b""
    assert run(b"", sse=False, close="fail") == b"[" + orjson.dumps(ERROR) + b"]"


def test_an_error_event_from_the_engine_ends_the_stream_without_repeating_it():
    for error in (
        {"error": {"message": SECRET, "code": 400}},
        {"object": "error", "message": SECRET},
    ):
        out = run(sse(chunk({"content": "a"}), error, chunk({"content": "b"})))
        said = check(out)
        assert said["error"] and said["candidates"][0]["text"] == "a"
        assert SECRET.encode() not in out


def test_a_line_longer_than_the_bound_is_refused_whole_or_in_pieces():
    long = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * 200 + b'"}}]}\n\n'
    assert check(run(long + b"data: [DONE]\n\n"))  # the default bound is far away
    for pieces in ([long], [long[:150], long[150:]], [long[:150]]):
        stream = tr.Stream("gemma", True, max_line=100)
        with pytest.raises(ValueError, match="longer than 100"):
            for piece in pieces:
                stream.feed(piece)
    assert tr.MAX_LINE == 1 << 20


def test_an_event_that_is_not_json_is_refused():
    with pytest.raises(ValueError):
        tr.Stream("gemma", True).feed(b"data: {nope\n\n")


def test_tool_call_arguments_are_bounded():
    stream = tr.Stream("gemma", True)
    stream.feed(sse(chunk({"tool_calls": [call(0, "", "c", "f")]}), done=False))
    piece = sse(chunk({"tool_calls": [call(0, "x" * (1 << 19))]}), done=False)
    for _ in range(tr.MAX_CALL_ARGS >> 19):
        assert stream.feed(piece) == b""
    with pytest.raises(ValueError, match="arguments"):
        stream.feed(piece)


# The official SDK, through the translators, in memory


class Host:
    """An OpenAI-only model host behind the translators, as the SDK's transport: it translates
    each request and answers with `answer` (a chat.completion, or chunks to stream)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.sent: list[dict[str, Any]] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        name, method = request.url.path.rsplit("/", 1)[1].split(":")
        stream = method == "streamGenerateContent"
        body = translate(json.loads(request.content), stream=stream)
        self.sent.append(body)
        if not stream:
            return httpx2.Response(200, json=tr.response(self.answer, name))
        framing = request.url.params.get("alt") == "sse"
        translator = tr.Stream(name, framing)
        out = translator.feed(sse(*self.answer)) + translator.end()
        return httpx2.Response(200, content=out, headers={"content-type": "text/event-stream"})


def client(host: Host) -> Any:
    """The SDK's client on `host`, typed Any: the tests pass plain dicts where it has types."""
    options = gtypes.HttpOptions(
        base_url="http://edge.test",
        httpx_client=httpx2.Client(transport=httpx2.MockTransport(host)),
    )
    return genai.Client(api_key="k", http_options=options)


DECLARATION = {
    "name": "weather",
    "description": "Weather now.",
    "parameters": WEATHER["parameters"],
}


def test_the_sdk_round_trip_of_a_tool_call():
    calls = [{"id": "c7", "type": "function",
              "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}}]  # fmt: skip
    host = Host(completion({"content": None, "tool_calls": calls}, "tool_calls"))
    models = client(host).models
    config = {
        "system_instruction": "Be brief.",
        "tools": [{"function_declarations": [DECLARATION]}],
    }
    asked = [gtypes.UserContent(parts=[gtypes.Part.from_text(text="Weather in Oslo?")])]
    first = models.generate_content(model="gemma", contents=asked, config=config)
    assert [(c.name, c.args) for c in first.function_calls] == [("weather", {"city": "Oslo"})]
    assert first.candidates[0].finish_reason == gtypes.FinishReason.STOP
    assert first.model_version == "gemma" and first.response_id == "chatcmpl-1"
    host.answer = completion({"content": "12 C in Oslo."})
    answer = gtypes.Part.from_function_response(name="weather", response={"temp": 12})
    history = [*asked, first.candidates[0].content, gtypes.UserContent(parts=[answer])]
    second = models.generate_content(model="gemma", contents=history, config=config)
    assert second.text == "12 C in Oslo." and second.usage_metadata.prompt_token_count == 5
    sent = host.sent[1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool"]
    assert sent[3] == {"role": "tool", "tool_call_id": "call_1_0", "content": '{"temp":12}'}
    assert sent[2]["tool_calls"][0]["id"] == "call_1_0"


def test_the_sdk_streams_text_and_a_tool_call():
    host = Host(CHUNKS)
    picture = gtypes.Part.from_bytes(data=b"\x89PNG", mime_type="image/png")
    chunks = list(
        client(host).models.generate_content_stream(
            model="gemma", contents=[picture, "What is it?"],
            config={"temperature": 0.2, "max_output_tokens": 30},
        )
    )  # fmt: skip
    parts = [part for c in chunks for part in c.candidates[0].content.parts]
    assert "".join(p.text for p in parts if p.text) == "Héllo ✓"
    assert [(p.function_call.name, p.function_call.args) for p in parts if p.function_call] == [
        ("weather", {"city": "Oslo"}),
        ("clock", {"tz": "UTC"}),
    ]
    last = chunks[-1]
    assert last.candidates[0].finish_reason == gtypes.FinishReason.STOP
    assert last.usage_metadata.candidates_token_count == 9
    sent = host.sent[0]
    assert sent["stream"] and sent["temperature"] == 0.2 and sent["max_tokens"] == 30
    url = sent["messages"][0]["content"][0]["image_url"]["url"]
    assert url == "data:image/png;base64,iVBORw=="


def test_the_sdk_raises_on_the_error_ending():
    class Broken(Host):
        def __call__(self, request: httpx2.Request) -> httpx2.Response:
            stream = tr.Stream("gemma", True)
            out = stream.feed(sse(chunk({"content": "part"}), done=False)) + stream.fail("Gone.")
            return httpx2.Response(200, content=out, headers={"content-type": "text/event-stream"})

    chunks = client(Broken(None)).models.generate_content_stream(model="gemma", contents="hi")
    with pytest.raises(genai_errors.APIError, match="Gone."):
        for _ in chunks:
            pass


# Property tests

NAMES = st.sampled_from(["weather", "clock", "lookup"])
TEXT = st.text(max_size=12)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-99, 99), TEXT)
OBJECT = st.dictionaries(st.text(max_size=5), st.one_of(SCALAR, st.lists(SCALAR, max_size=3)),
                         max_size=3)  # fmt: skip
IMAGE = st.builds(
    lambda mime, data, snake: {"inline_data": {"mime_type": mime, "data": data}}
    if snake else {"inlineData": {"mimeType": mime, "data": data}},
    st.sampled_from(["image/png", "image/jpeg", "image/webp"]),
    st.from_regex(r"[A-Za-z0-9+/]{4,12}", fullmatch=True), st.booleans(),
)  # fmt: skip


@st.composite
def conversations(draw: st.DrawFn) -> dict[str, Any]:
    """A valid GenerateContentRequest: user and model turns; the calls of a model turn are
    answered (some, in any order, by name) by functionResponse parts of the next user turn."""
    contents: list[dict[str, Any]] = []
    pending: list[str] = []
    for turn in range(draw(st.integers(1, 6))):
        if turn % 2 == 0:
            parts = [draw(st.one_of(TEXT.map(text), IMAGE)) for _ in range(draw(st.integers(0, 2)))]
            for name in draw(st.permutations(pending)):
                if draw(st.booleans()):
                    parts.insert(draw(st.integers(0, len(parts))), fresponse(name, draw(OBJECT)))
            role = draw(st.sampled_from(["user", None, "user"]))
            contents.append(user(*(parts or [text("")]), role=role))
            pending = []
            continue
        parts = []
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(["text", "call", "thought"]))
            if kind == "call":
                pending.append(name := draw(NAMES))
                parts.append(fcall(name, draw(OBJECT)))
            else:
                parts.append(
                    {"text": draw(TEXT)} | ({"thought": True} if kind == "thought" else {})
                )
        contents.append(model(*parts))
    doc: dict[str, Any] = {"contents": contents}
    declarations = [
        {"name": n, "parameters": {"type": "OBJECT"}} for n in ["weather", "clock", "lookup"]
    ]
    optional = {
        "systemInstruction": st.lists(TEXT.map(text), min_size=1, max_size=2).map(
            lambda p: {"parts": p}),
        "generationConfig": st.fixed_dictionaries({}, optional={
            "temperature": st.floats(0, 2), "topP": st.floats(0, 1), "topK": st.integers(1, 100),
            "maxOutputTokens": st.integers(1, 4096), "stopSequences": st.lists(TEXT, max_size=2),
            "candidateCount": st.integers(1, 2), "seed": st.integers(0, 99),
            "responseMimeType": st.sampled_from(["text/plain", "application/json"]),
        }),
        "tools": st.just([{"functionDeclarations": declarations}]),
        "toolConfig": st.sampled_from(["AUTO", "ANY", "NONE"]).map(
            lambda m: {"functionCallingConfig": {"mode": m}}),
    }  # fmt: skip
    for key, strategy in optional.items():
        if draw(st.booleans()):
            doc[key] = draw(strategy)
    return doc


def check_openai(body: dict[str, Any], doc: dict[str, Any]) -> None:
    """A well-formed chat completions request that says what `doc` said."""
    calls, answered = walk(body, data_urls_only=True, json_results=True)
    parts = [p for c in doc["contents"] for p in c["parts"]]
    made = [p["functionCall"] for p in parts if "functionCall" in p]
    assert [(c["name"], c["args"]) for c in made] == [
        (c["function"]["name"], orjson.loads(c["function"]["arguments"])) for c in calls.values()
    ]
    answers = [p["functionResponse"] for p in parts if "functionResponse" in p]
    assert [a["name"] for a in answers] == [calls[i]["function"]["name"] for i in answered]
    assert [a["response"] for a in answers] == [
        orjson.loads(m["content"]) for m in body["messages"] if m["role"] == "tool"
    ]
    images = sum(1 for p in parts if "inlineData" in p or "inline_data" in p)
    assert images == image_parts(body)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


@given(conversations())
@PROPERTY
def test_valid_requests_translate_to_well_formed_openai_requests(doc):
    check_openai(translate(doc, stream=True), doc)


@st.composite
def openai_streams(draw: st.DrawFn) -> tuple[bytes, dict[int, dict[str, Any]], bool]:
    """A chat.completion.chunk stream as an engine writes it, one or two choices interleaved,
    with noise between events; what each choice says; whether usage came."""
    per_choice: dict[int, list[dict[str, Any]]] = {}
    said: dict[int, dict[str, Any]] = {}
    for index in range(draw(st.integers(1, 2))):
        chunks = [chunk({"role": "assistant", "content": ""}, index=index)]
        mine: dict[str, Any] = {"text": "", "thoughts": "", "calls": [], "finish": None}
        for _ in range(draw(st.integers(0, 4))):
            kind = draw(st.sampled_from(["text", "reasoning", "call"]))
            if kind != "call":
                piece = draw(TEXT)
                key = "content" if kind == "text" else "reasoning_content"
                chunks.append(chunk({key: piece}, index=index))
                mine["text" if kind == "text" else "thoughts"] += piece
                continue
            args = draw(OBJECT)
            arguments = orjson.dumps(args).decode()
            cuts = sorted(draw(st.lists(st.integers(0, len(arguments)), max_size=3)))
            fragments = [
                arguments[a:b] for a, b in zip([0, *cuts], [*cuts, len(arguments)], strict=True)
            ]
            n, name = len(mine["calls"]), draw(NAMES)
            chunks.append(chunk({"tool_calls": [call(n, "", f"c{index}{n}", name)]}, index=index))
            chunks += [chunk({"tool_calls": [call(n, f)]}, index=index) for f in fragments]
            mine["calls"].append((name, args))
        finish = draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"]))
        chunks.append(chunk({}, finish, index=index))
        mine["finish"] = {"stop": "STOP", "length": "MAX_TOKENS", "tool_calls": "STOP",
                          "content_filter": "SAFETY"}[finish]  # fmt: skip
        per_choice[index], said[index] = chunks, mine
    merged: list[dict[str, Any]] = []
    while any(per_choice.values()):
        merged.append(
            per_choice[draw(st.sampled_from([i for i, c in per_choice.items() if c]))].pop(0)
        )
    usage = draw(st.booleans())
    if usage:
        merged.append(USAGE)
    lines = [b"data: " + orjson.dumps(c) for c in merged]
    if draw(st.booleans()):
        lines.append(b"data: [DONE]")
    noise = st.sampled_from([b"", b": keep-alive", b"event: delta", b"id: 7"])
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    body = b"".join(line + eol + draw(noise) + eol for line in lines)
    return body, said, usage


@given(openai_streams(), st.booleans(), st.data())
@PROPERTY
def test_streams_cut_anywhere_translate_alike_and_well_formed(stream, framing, data):
    body, expected, usage = stream
    whole = run(body, sse=framing)
    cuts = data.draw(st.lists(st.integers(1, max(len(body) - 1, 1)), max_size=8))
    assert run(body, cuts, sse=framing) == whole
    said = check(whole, sse=framing)
    assert said["error"] is None and said["candidates"] == expected
    assert said["usage"] == (META if usage else None)


@given(openai_streams(), st.booleans(), st.data())
@PROPERTY
def test_streams_broken_anywhere_end_well_formed(stream, framing, data):
    body, _, _ = stream
    stop = data.draw(st.integers(0, len(body)))
    whole = run(body[:stop], sse=framing, close="fail")
    assert run(body[:stop], list(range(1, stop)), sse=framing, close="fail") == whole
    said = check(whole, sse=framing)
    assert said["error"] or b"[DONE]" in body[:stop]


def test_every_byte_of_a_two_choice_stream():
    body = sse(
        chunk({"content": "é✓"}, index=0),
        chunk({"tool_calls": [call(0, '{"k": "v"}', "c", "f")]}, index=1),
        chunk({}, "stop", index=0),
        chunk({}, "tool_calls", index=1),
        USAGE,
    )
    for framing in (True, False):
        whole = run(body, sse=framing)
        assert run(body, list(range(1, len(body))), sse=framing) == whole
        assert check(whole, sse=framing)["candidates"][1]["calls"] == [("f", {"k": "v"})]


# A resumed stream: the client's own stream, begun by a host that speaks Gemini's API, goes on
# from an OpenAI host (edge/proxy/native.py)

BEGUN = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), done=False)
REST = [  # the next host's stream, as the splice passes it on: no role, the usage billed whole
    chunk({"content": "lo "}),
    chunk({"content": "✓"}),
    chunk({}, "stop"),
    USAGE,
]


@pytest.mark.parametrize("framing", [True, False], ids=["sse", "json-array"])
def test_a_resumed_stream_goes_on_with_candidate_0_and_ends_it(framing):
    first = tr.Stream("gemma", framing).feed(BEGUN)  # what the client got before the break
    stream = tr.Stream.resumed("gemma", "chatcmpl-9", framing)
    out = stream.feed(sse(*REST)) + stream.end()
    assert not out.startswith(b"[")  # the first part opened the array
    said = check(first + out, sse=framing)
    assert said["error"] is None and said["usage"] == META
    assert said["candidates"][0] == {
        "text": "Hello ✓", "thoughts": "", "calls": [], "finish": "STOP"
    }  # fmt: skip
    assert {e.get("responseId") for e in elements(first + out, framing)} == {"chatcmpl-9"}


def test_a_resumed_stream_whose_client_got_no_response_id_sends_none():
    stream = tr.Stream.resumed("gemma", "")
    out = stream.feed(sse(*[{**c, "id": ""} for c in REST])) + stream.end()
    found = elements(out, True)
    assert found and all("responseId" not in e for e in found)
    assert check(out)["candidates"][0]["finish"] == "STOP"


@pytest.mark.parametrize("framing", [True, False], ids=["sse", "json-array"])
def test_a_resumed_stream_cut_again_ends_with_the_error_element(framing):
    first = tr.Stream("gemma", framing).feed(BEGUN)
    stream = tr.Stream.resumed("gemma", "chatcmpl-9", framing)
    out = stream.feed(sse(chunk({"content": "lo"}), done=False))
    end = stream.end()  # a clean end with candidate 0 unfinished: cut short, not whole
    said = check(first + out + end, sse=framing)
    assert said["error"]["code"] == 502 and said["candidates"][0]["text"] == "Hello"
    assert said["candidates"][0]["finish"] is None
    assert stream.end() == b"" and stream.fail("x") == b""

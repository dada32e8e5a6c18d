"""A request's translation, as a unit: which calls translate, where the client's key goes, the
answer and an upstream error in the client's shape."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from edge.dialects import ANTHROPIC, GEMINI
from edge.errors import BadRequest, Unsupported
from edge.proxy.route import ProxyRequest
from edge.proxy.translate import Translation

MESSAGES: Any = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
CONTENTS: Any = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


def anthropic_request(stream: bool = False) -> ProxyRequest:
    body = orjson.dumps(MESSAGES)
    return ProxyRequest(ANTHROPIC, "messages", "m", stream, body, "/v1/messages", MESSAGES)


def gemini_request(target: str, route: str = "gemini", stream: bool = True) -> ProxyRequest:
    return ProxyRequest(GEMINI, route, "m", stream, orjson.dumps(CONTENTS), target, CONTENTS)


def test_the_client_s_key_moves_to_openai_s_field_and_dialect_fields_go():
    translation = Translation(anthropic_request())
    block = (
        b"Content-Type: application/json\r\nx-api-key: sk-1\r\nanthropic-version: 2023-06-01\r\n"
    )
    assert translation.headers(block, "") == (
        b"Content-Type: application/json\r\nAuthorization: Bearer sk-1\r\n"
    )
    # A client that sent OpenAI's own field keeps it, and no second one is added.
    both = b"Authorization: Bearer sk-2\r\nx-api-key: sk-1\r\n"
    assert translation.headers(both, "") == b"Authorization: Bearer sk-2\r\n"
    assert orjson.loads(translation.body)["messages"] == [{"role": "user", "content": "hi"}]


def test_gemini_s_key_in_the_query_and_its_stream_framing():
    sse = Translation(gemini_request("/v1beta/models/m:streamGenerateContent?alt=sse&key=g-1"))
    assert sse.sse and sse.content_type == b"text/event-stream"
    assert sse.headers(b"", "alt=sse&key=g-1") == b"Authorization: Bearer g-1\r\n"
    array = Translation(gemini_request("/v1beta/models/m:streamGenerateContent"))
    assert not array.sse and array.content_type == b"application/json"
    with pytest.raises(BadRequest, match="key="):
        sse.headers(b"", "key=a%0Db")


def test_only_generation_translates():
    with pytest.raises(Unsupported) as caught:
        Translation(gemini_request("/v1beta/models/m:countTokens", "count_tokens", False))
    assert caught.value.status == 501


def test_an_upstream_error_comes_back_in_the_client_s_shape():
    translation = Translation(anthropic_request())
    openai_error = orjson.dumps({"error": {"message": "max_tokens is too large", "type": "x"}})
    doc = orjson.loads(translation.error(400, openai_error))
    assert doc == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens is too large"},
    }
    vllm = orjson.loads(translation.error(404, b'{"detail":"Not Found"}'))
    assert vllm["error"]["message"] == "Not Found"
    gemini = Translation(gemini_request("/v1beta/models/m:generateContent", stream=False))
    doc = orjson.loads(gemini.error(503, b"<html>busy</html>"))
    assert doc["error"] == {
        "code": 503, "message": "The model server answered HTTP 503.", "status": "UNAVAILABLE",
    }  # fmt: skip

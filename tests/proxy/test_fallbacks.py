"""Model fallbacks, end to end: a real edge in front of mock servers, the official SDKs as clients.

A model whose every server is down moves to its fallback (`[routing.models."a"] fallbacks`, or
the body's `models` list); a server's answer that the prompt is longer than the model's context
moves too; any other 400 (a content-policy refusal) is passed through once and never sent again,
to any server of any model. And `context_exceeded` over each engine's own wording.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from edge.dialects import GEMINI, OPENAI
from edge.proxy.fallback import (
    ERROR_BYTES,
    MAX_BODY_MODELS,
    context_exceeded,
    fallback_models,
)
from edge.proxy.route import ProxyRequest, retarget
from edge.routing.fleet import HostTable
from tests.observe.test_metrics import scrape, total
from tests.procs import free_port

MESSAGES: Any = [{"role": "user", "content": "one two three four five six seven eight"}]
FALLBACKS = "edge_model_fallbacks_total"


def down() -> str:
    """A server that refuses connections: nothing listens on its port."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
async def sdk() -> AsyncIterator[Callable[[Any], openai.AsyncOpenAI]]:
    """OpenAI's SDK on an edge, closed at teardown."""
    made: list[openai.AsyncOpenAI] = []

    def client(edge: Any) -> openai.AsyncOpenAI:
        made.append(openai.AsyncOpenAI(base_url=f"{edge.url}/v1", api_key="k", max_retries=0))
        return made[-1]

    yield client
    for each in made:
        await each.close()


@contextlib.asynccontextmanager
async def claude(edge: Any) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=edge.url, api_key="k", max_retries=0) as c:
        yield c


async def sent_upstream(mock: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(f"{mock}/_mock/requests") as resp:
        requests: list[dict[str, Any]] = await resp.json()
    return requests


async def fallbacks(edge: Any, **labels: str) -> float:
    async with aiohttp.ClientSession() as session:
        return total(await scrape(session, edge.url), FALLBACKS, **labels)


class Refusing:
    """An OpenAI-compatible server that refuses every chat with OpenAI's content-policy 400, and
    counts what it was sent."""

    BODY: Any = {
        "error": {
            "message": "Your request was rejected as a result of our safety system. Your prompt "
            "may contain text that is not allowed by our safety system.",
            "type": "invalid_request_error",
            "param": None,
            "code": "content_policy_violation",
        }
    }

    def __init__(self) -> None:
        self.seen = 0

    async def chat(self, request: web.Request) -> web.Response:
        await request.read()
        self.seen += 1
        return web.json_response(self.BODY, status=400)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})


# --- every server of the model down --------------------------------------------------------


async def test_a_model_whose_servers_are_all_down_is_answered_by_its_fallback(
    sdk, start_mock, start_edge
):
    b = await start_mock(models=("b",), name="B", tokens=3)
    edge = await start_edge(
        {"a": [down(), down()], "b": [b]}, routing__models={"a": {"fallbacks": ["b"]}}
    )
    raw = await sdk(edge).chat.completions.with_raw_response.create(model="a", messages=MESSAGES)
    answer = raw.parse()
    assert raw.headers["X-Edge-Model"] == "b"
    assert answer.model == "b" and answer.system_fingerprint == "B"
    assert answer.choices[0].message.content == "tok1 tok2 tok3 "
    [sent] = await sent_upstream(b)
    assert sent["body"]["model"] == "b" and sent["body"]["messages"] == MESSAGES
    assert await fallbacks(edge, model="a", to="b", reason="unavailable") == 1
    # A stream moves the same way, before its first byte.
    stream = await sdk(edge).chat.completions.create(model="a", messages=MESSAGES, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "tok1 tok2 tok3 "


async def test_a_model_that_answers_carries_no_fallback_header(sdk, start_mock, start_edge):
    a = await start_mock(models=("a",), name="A", tokens=2)
    b = await start_mock(models=("b",), name="B", tokens=2)
    edge = await start_edge({"a": [a], "b": [b]}, routing__models={"a": {"fallbacks": ["b"]}})
    raw = await sdk(edge).chat.completions.with_raw_response.create(model="a", messages=MESSAGES)
    assert "X-Edge-Model" not in raw.headers and raw.parse().model == "a"
    assert await sent_upstream(b) == []


async def test_the_bodys_models_list_names_the_fallbacks(sdk, start_mock, start_edge):
    b = await start_mock(models=("b",), name="B", tokens=2)
    edge = await start_edge({"a": [down()], "b": [b]})
    listed = [7, "not-served-here", "b", "past-the-bound"]
    raw = await sdk(edge).chat.completions.with_raw_response.create(
        model="a", messages=MESSAGES, extra_body={"models": listed}
    )
    assert raw.headers["X-Edge-Model"] == "b" and raw.parse().model == "b"
    [sent] = await sent_upstream(b)
    # The rest of the body as it came, the list included: the engines ignore it.
    assert sent["body"]["model"] == "b" and sent["body"]["models"] == listed
    # Entries past MAX_BODY_MODELS are not read.
    late = ["not-served-here"] * MAX_BODY_MODELS + ["b"]
    with pytest.raises(openai.APIStatusError) as refused:
        await sdk(edge).chat.completions.create(
            model="a", messages=MESSAGES, extra_body={"models": late}
        )
    assert refused.value.status_code == 503


async def test_a_pinned_request_does_not_fall_back(sdk, start_mock, start_edge):
    a = down()
    b = await start_mock(models=("b",), name="B")
    edge = await start_edge({"a": [a], "b": [b]}, routing__models={"a": {"fallbacks": ["b"]}})
    with pytest.raises(openai.APIStatusError) as refused:
        await sdk(edge).chat.completions.create(
            model="a", messages=MESSAGES, extra_headers={"X-Edge-Server": a}
        )
    assert refused.value.status_code == 503
    assert await sent_upstream(b) == []


async def test_every_model_down_is_a_503_naming_every_server(sdk, start_mock, start_edge):
    a, b = down(), down()
    edge = await start_edge({"a": [a], "b": [b]}, routing__models={"a": {"fallbacks": ["b"]}})
    with pytest.raises(openai.APIStatusError) as refused:
        await sdk(edge).chat.completions.create(model="a", messages=MESSAGES)
    assert refused.value.status_code == 503
    error = refused.value.body
    assert isinstance(error, dict) and error["type"] == "service_unavailable"
    assert a in error["message"] and b in error["message"]
    assert "'a'" in error["message"] and "'b'" in error["message"]
    # In Anthropic's shape for an Anthropic client.
    async with claude(edge) as c:
        with pytest.raises(anthropic.APIStatusError) as failed:
            await c.messages.create(model="a", max_tokens=5, messages=MESSAGES)
    assert failed.value.status_code == 503
    body = failed.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert a in body["error"]["message"] and b in body["error"]["message"]


# --- the prompt longer than the model's context ---------------------------------------------


async def test_a_context_length_400_moves_to_the_fallback_model(sdk, start_mock, start_edge):
    a = await start_mock(models=("a",), name="A", tokens=4, context=10)
    b = await start_mock(models=("b",), name="B", tokens=4)
    edge = await start_edge({"a": [a], "b": [b]}, routing__models={"a": {"fallbacks": ["b"]}})
    raw = await sdk(edge).chat.completions.with_raw_response.create(
        model="a", messages=MESSAGES, max_tokens=4
    )
    assert raw.headers["X-Edge-Model"] == "b" and raw.parse().model == "b"
    assert raw.parse().choices[0].message.content == "tok1 tok2 tok3 tok4 "
    assert len(await sent_upstream(a)) == 1 and len(await sent_upstream(b)) == 1
    assert await fallbacks(edge, model="a", to="b", reason="context_length") == 1
    # Streamed: the 400 comes before any byte of a stream, and moves alike.
    stream = await sdk(edge).chat.completions.create(
        model="a", messages=MESSAGES, max_tokens=4, stream=True
    )
    chunks = [c async for c in stream]
    assert {c.model for c in chunks} == {"b"}
    # A prompt that fits stays on its model.
    short = await sdk(edge).chat.completions.create(
        model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert short.model == "a"


async def test_the_last_context_400_reaches_the_client_unchanged(sdk, start_mock, start_edge):
    a = await start_mock(models=("a",), name="A", context=10)
    b = await start_mock(models=("b",), name="B", context=12)
    edge = await start_edge({"a": [a], "b": [b]}, routing__models={"a": {"fallbacks": ["b"]}})
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk(edge).chat.completions.create(model="a", messages=MESSAGES, max_tokens=8)
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["message"].startswith("This model's maximum context length is 12 tokens.")
    assert error["param"] == "input_tokens"
    assert refused.value.response.headers["X-Edge-Model"] == "b"
    assert len(await sent_upstream(a)) == 1 and len(await sent_upstream(b)) == 1


async def test_an_anthropic_client_moves_on_anthropics_own_context_error(start_mock, start_edge):
    a = await start_mock(models=("a",), name="A", context=10)
    b = await start_mock(models=("b",), name="B", tokens=3)
    edge = await start_edge({"a": [a], "b": [b]}, routing__models={"a": {"fallbacks": ["b"]}})
    async with claude(edge) as c:
        raw = await c.messages.with_raw_response.create(model="a", max_tokens=8, messages=MESSAGES)
        message = await raw.parse()
    assert raw.headers["X-Edge-Model"] == "b" and message.model == "b"
    assert [block.type for block in message.content] == ["text"]
    [refused] = await sent_upstream(a)
    [sent] = await sent_upstream(b)
    assert refused["path"] == sent["path"] == "/v1/messages"
    assert sent["body"]["model"] == "b" and sent["body"]["max_tokens"] == 8


async def test_a_gemini_request_is_sent_on_the_fallback_models_path(start_mock, start_edge):
    b = await start_mock(models=("b",), name="B", tokens=2)
    edge = await start_edge({"a": [down()], "b": [b]}, routing__models={"a": {"fallbacks": ["b"]}})
    body = {"contents": [{"role": "user", "parts": [{"text": "hello there"}]}]}
    url = f"{edge.url}/v1beta/models/a:generateContent"
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Edge-Model"] == "b"
        await resp.read()
    [sent] = await sent_upstream(b)
    assert sent["path"] == "/v1beta/models/b:generateContent"


# --- any other 400: passed through once -------------------------------------------------------


async def test_a_content_policy_400_is_passed_through_once_and_never_retried(
    sdk, aiohttp_server, start_mock, start_edge
):
    first, second = Refusing(), Refusing()
    servers = [await aiohttp_server(r.app()) for r in (first, second)]
    a = [f"http://127.0.0.1:{s.port}" for s in servers]
    b = await start_mock(models=("b",), name="B")
    edge = await start_edge(
        {"a": a, "b": [b]}, routing__models={"a": {"fallbacks": ["b"]}}, routing__affinity=False
    )
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk(edge).chat.completions.create(
            model="a", messages=MESSAGES, extra_body={"models": ["b"]}
        )
    assert refused.value.code == "content_policy_violation"
    assert "X-Edge-Model" not in refused.value.response.headers
    assert first.seen + second.seen == 1
    assert await sent_upstream(b) == []
    assert await fallbacks(edge) == 0


async def test_a_scripted_400_from_the_mock_is_not_a_context_error(sdk, start_mock, start_edge):
    a = await start_mock(models=("a",), name="A")
    b = await start_mock(models=("b",), name="B")
    edge = await start_edge({"a": [a], "b": [b]}, routing__models={"a": {"fallbacks": ["b"]}})
    with pytest.raises(openai.BadRequestError) as refused:
        await sdk(edge).chat.completions.create(
            model="a", messages=MESSAGES, extra_headers={"X-Mock-Status": "400"}
        )
    assert refused.value.code == "mock_status"
    assert await sent_upstream(b) == []
    async with aiohttp.ClientSession() as session:
        samples = await scrape(session, edge.url)
    assert total(samples, "edge_upstream_attempts_total") == 1
    assert total(samples, FALLBACKS) == 0


# --- the pieces -------------------------------------------------------------------------------


def _error(message: str, **fields: Any) -> bytes:
    return orjson.dumps({"error": {"message": message, **fields}})


TOO_LONG = [
    # OpenAI
    (400, _error("This model's maximum context length is 8192 tokens. However, your messages "
                 "resulted in 9000 tokens. Please reduce the length of the messages.",
                 type="invalid_request_error", code="context_length_exceeded")),
    (400, _error("Something else.", code="context_length_exceeded")),
    (400, _error("Your input exceeds the context window of this model. Please adjust your input "
                 "and try again.", code=None)),
    # vLLM, current and older wordings, nested and flat ErrorResponse
    (400, _error("This model's maximum context length is 4096 tokens. However, you requested 512 "
                 "output tokens and your prompt contains at least 3585 input tokens, for a total "
                 "of at least 4097 tokens. (parameter=input_tokens, value=3585)",
                 type="BadRequestError", param="input_tokens", code=400)),
    (400, orjson.dumps({"object": "error", "type": "BadRequestError", "code": 400, "message":
        "'max_tokens' or 'max_completion_tokens' is too large: 8000. This model's maximum "
        "context length is 4096 tokens and your request has 2778 input tokens "
        "(8000 > 4096 - 2778)."})),
    (400, _error("Input length (5000) exceeds model's maximum context length (4096).")),
    (400, _error("The decoder prompt (length 8825) is longer than the maximum model length of "
                 "8192. Make sure that `max_model_len` is no smaller than the number of text "
                 "tokens.")),
    # SGLang
    (400, orjson.dumps({"object": "error", "message": "The input (5000 tokens) is longer than "
        "the model's context length (4096 tokens).", "type": "BadRequest", "param": None,
        "code": 400})),
    (400, orjson.dumps({"object": "error", "message": "Requested token count exceeds the "
        "model's maximum context length of 4096 tokens. You requested a total of 5000 tokens: "
        "4000 tokens from the input messages and 1000 tokens for the completion."})),
    # llama.cpp, by type and by each release's message
    (400, orjson.dumps({"error": {"code": 400, "message": "request (9412 tokens) exceeds the "
        "available context size (8192 tokens), try increasing it",
        "type": "exceed_context_size_error", "n_prompt_tokens": 9412, "n_ctx": 8192}})),
    (400, _error("the request exceeds the available context size, try increasing it",
                 type="invalid_request_error")),
    (400, _error("input is larger than the max context size. skipping")),
    # TGI (422, a flat error string)
    (422, orjson.dumps({"error": "Input validation error: `inputs` tokens + `max_new_tokens` "
        "must be <= 4096. Given: 4000 `inputs` tokens and 200 `max_new_tokens`",
        "error_type": "validation"})),
    (422, orjson.dumps({"error": "Input validation error: `inputs` must have less than 1024 "
        "tokens. Given: 2000", "error_type": "validation"})),
    # Ollama
    (400, orjson.dumps({"error": "the input length exceeds the context length"})),
    (413, orjson.dumps({"error": "the input length exceeds the context length"})),
    # Anthropic
    (400, orjson.dumps({"type": "error", "error": {"type": "invalid_request_error",
        "message": "prompt is too long: 210000 tokens > 200000 maximum"}})),
    (400, orjson.dumps({"type": "error", "error": {"type": "invalid_request_error",
        "message": "input length and `max_tokens` exceed context limit: 188240 + 21333 > "
        "200000, decrease input length or `max_tokens` and try again"}})),
    # Gemini, whole and as a streamed array
    (400, _error("The input token count (1196265) exceeds the maximum number of tokens allowed "
                 "(1048575).", code=400, status="INVALID_ARGUMENT")),
    (400, b'[' + _error("The input token count (9) exceeds the maximum number of tokens allowed "
                        "(8).", code=400, status="INVALID_ARGUMENT") + b']'),
    # FastAPI's detail string; a plain-text body
    (400, orjson.dumps({"detail": "The input (5000 tokens) is longer than the model's context "
        "length (4096 tokens)."})),
    (400, b"This model's maximum context length is 2048 tokens."),
]  # fmt: skip

NOT_TOO_LONG = [
    # Content policy: OpenAI, Azure OpenAI
    (400, _error("Your request was rejected as a result of our safety system.",
                 type="invalid_request_error", code="content_policy_violation")),
    (400, _error("The response was filtered due to the prompt triggering Azure OpenAI's content "
                 "management policy.", code="content_filter", status=400)),
    # Other 4xx of the engines
    (400, _error("max_tokens must be at least 1, got 0.", type="BadRequestError", code=400)),
    (422, orjson.dumps({"error": "Input validation error: `max_new_tokens` must be <= 4096. "
        "Given: 5000", "error_type": "validation"})),
    (413, orjson.dumps({"type": "error", "error": {"type": "request_too_large",
        "message": "Request exceeds the maximum size"}})),
    (400, orjson.dumps({"error": "invalid model: model name not found"})),
    # A validation error echoing the client's own text is no verdict.
    (400, orjson.dumps({"detail": [{"type": "string_type", "loc": ["body", "stop"],
        "msg": "Input should be a valid string", "input": "maximum context length"}]})),
    # The right words with a status that does not mean "too long": the host is broken.
    (500, _error("This model's maximum context length is 4096 tokens.")),
    (429, _error("prompt is too long")),
    # Nothing, or too much, to judge.
    (400, b""),
    (400, b"[]"),
    (400, _error("maximum context length" + " " * ERROR_BYTES)),
]  # fmt: skip


TOO_LONG_IDS = [
    "openai", "openai-code", "openai-responses", "vllm", "vllm-max-tokens", "vllm-input-length",
    "vllm-v1-decoder", "sglang-input", "sglang-total", "llama.cpp", "llama.cpp-older",
    "llama.cpp-oldest", "tgi-total", "tgi-input", "ollama", "ollama-413", "anthropic",
    "anthropic-max-tokens", "gemini", "gemini-stream", "fastapi-detail", "plain-text",
]  # fmt: skip
NOT_TOO_LONG_IDS = [
    "openai-content-policy", "azure-content-filter", "vllm-max-tokens-0", "tgi-max-new-tokens",
    "anthropic-request-size", "unknown-model", "validation-echo", "500", "429", "empty",
    "empty-list", "too-big",
]  # fmt: skip


@pytest.mark.parametrize(("status", "body"), TOO_LONG, ids=TOO_LONG_IDS)
def test_each_engines_context_length_error_is_recognised(status: int, body: bytes) -> None:
    assert context_exceeded(status, body)


@pytest.mark.parametrize(("status", "body"), NOT_TOO_LONG, ids=NOT_TOO_LONG_IDS)
def test_any_other_error_is_not_a_context_length_error(status: int, body: bytes) -> None:
    assert not context_exceeded(status, body)


def test_fallback_models_in_order_each_once_served_and_allowed() -> None:
    fleet = HostTable().build({m: ["http://127.0.0.1:1"] for m in ("a", "b", "c", "d")})
    assert fallback_models("a", ["c", "a", 1, None, "zz", "c"], ("b", "c", "d"), fleet) == [
        "c", "b", "d",
    ]  # fmt: skip
    assert fallback_models("a", "b", ("c",), fleet) == ["c"]  # not a list: ignored
    assert fallback_models("a", ["x", "y", "z", "b"], (), fleet) == []  # past the bound
    assert fallback_models("a", ["b"], ("c", "d"), fleet, frozenset({"a", "d"})) == ["d"]


def test_retarget_names_the_model_in_the_body_or_in_gemini_path() -> None:
    doc = {"model": "a", "models": ["b"], "messages": []}
    chat = ProxyRequest(OPENAI, "chat", "a", False, orjson.dumps(doc), "/v1/chat/completions", doc)
    moved = retarget(chat, "b")
    assert moved is not None and moved.model == "b" and moved.target == chat.target
    assert orjson.loads(moved.body) == {**doc, "model": "b"} and doc["model"] == "a"
    gemini = ProxyRequest(
        GEMINI, "gemini", "a", True, b"{}", "/v1beta/models/a:streamGenerateContent?alt=sse", {}
    )
    moved = retarget(gemini, "org/b:8b")
    assert moved is not None and moved.body == b"{}"
    assert moved.target == "/v1beta/models/org/b:8b:streamGenerateContent?alt=sse"
    assert retarget(gemini, "../admin") is None and retarget(gemini, "b%2Fc") is None

"""Model fallbacks: which models a request may move to, and whether a host's 4xx says the request
is longer than the model's context.

A request moves to the next model only before anything reached the client, and only when (a)
every host of its model failed (edge/routing/plan.py: the 503), or (b) a host answered 400 (413,
422) saying that the prompt plus the completion asked for is longer than the model's context. No
other 4xx moves it: a content-policy refusal, a bad parameter, a malformed body are answered once,
as the host wrote them, and never tried again anywhere (an upstream is never hammered with a
request that it refused).

The models, in order: the body's `models` list (OpenRouter's convention, read up to
MAX_BODY_MODELS entries), then `[routing.models."<model>"] fallbacks` of the model the request
named; each model once, never the one named, only models this edge serves and the client's key
may use. Nothing here runs on the happy path: the exchange builds the list only once a request
failed or got a 4xx, and reads a 4xx body only when there is a model to move to.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Final

import orjson

from edge.http.client import UpstreamError
from edge.proxy.forward import Upstream
from edge.routing.fleet import Fleet

# The reasons of Metrics.fell_back.
UNAVAILABLE: Final = "unavailable"
CONTEXT_LENGTH: Final = "context_length"

# Entries of a body's `models` list read (the rest are ignored): each model tried can cost a full
# round of attempts on its hosts. Gateways that take the list bound it alike (ElectronHub: "up to
# 3 fallback models", docs.electronhub.ai/routing/model-fallbacks).
MAX_BODY_MODELS: Final = 3
# Statuses a context-length refusal comes with: 400 (OpenAI, vLLM, SGLang, llama.cpp, Anthropic,
# Gemini, Ollama), 413 (Ollama's embeddings on some versions), 422 (TGI's validation errors).
REFUSALS: Final = frozenset({400, 413, 422})
# Of a refusal's body, the most that is read to judge it: an error is a few hundred bytes, and a
# bigger body is not one of the errors below.
ERROR_BYTES: Final = 64 * 1024
_MESSAGE_CHARS: Final = 2048  # of one message, the part searched

# Error codes and types that say it whatever the message.
_CODES: Final = frozenset(
    {
        # OpenAI: {"error": {"code": "context_length_exceeded", ...}} (platform.openai.com/docs/
        # guides/error-codes; the Chat Completions and Responses APIs alike).
        "context_length_exceeded",
        # llama.cpp's server: ERROR_TYPE_EXCEED_CONTEXT_SIZE, HTTP 400, {"error": {"type":
        # "exceed_context_size_error", "n_prompt_tokens": ..., "n_ctx": ...}} (ggml-org/llama.cpp
        # tools/server/server-context.cpp, server_task_result_error::to_json). Its message moves
        # between builds; the type does not.
        "exceed_context_size_error",
    }
)
# The engines' own wording, lower-cased; each is searched in the error's message only (never in
# the whole body: an echo of the client's own text is no verdict).
_PHRASES: Final = (
    # OpenAI: "This model's maximum context length is 8192 tokens. However, your messages
    # resulted in 9000 tokens. Please reduce the length of the messages."
    # vLLM (vllm/entrypoints/openai/serving_engine.py, _validate_input; newer releases in the
    # renderer): "This model's maximum context length is 4096 tokens. However, you requested
    # 512 output tokens and your prompt contains at least 3585 input tokens, for a total of at
    # least 4097 tokens. ... (parameter=input_tokens, value=3585)", and "'max_tokens' or
    # 'max_completion_tokens' is too large: 8000. This model's maximum context length is 4096
    # tokens and your request has 2778 input tokens (8000 > 4096 - 2778)."
    # vLLM (vllm/entrypoints/utils.py, get_max_tokens): "Input length (5000) exceeds model's
    # maximum context length (4096)."
    # SGLang (python/sglang/srt/managers/tokenizer_manager.py, _validate_one_request): "Requested
    # token count exceeds the model's maximum context length of 4096 tokens. You requested a
    # total of ... tokens".
    "maximum context length",
    # vLLM V1 (vllm/v1/engine/input_processor.py, _validate_prompt_len): "The decoder prompt
    # (length 8825) is longer than the maximum model length of 8192. Make sure that
    # `max_model_len` is no smaller than ...", and "... plus the number of requested output
    # tokens (at least 1) is longer than the maximum model length of 2048."
    "longer than the maximum model length",
    # SGLang (the same function): "The input (5000 tokens) is longer than the model's context
    # length (4096 tokens)."
    "longer than the model's context length",
    # llama.cpp (server-context.cpp): "request (9412 tokens) exceeds the available context size
    # (8192 tokens), try increasing it"; before it "the request exceeds the available context
    # size, try increasing it", and earlier "input is larger than the max context size".
    "exceeds the available context size",
    "larger than the max context size",
    # TGI (huggingface/text-generation-inference router/src/validation.rs, HTTP 422,
    # "error_type": "validation"): "Input validation error: `inputs` tokens + `max_new_tokens`
    # must be <= 4096. Given: 4000 `inputs` tokens and 200 `max_new_tokens`", and "`inputs`
    # must have less than 1024 tokens. Given: 2000".
    "`inputs` tokens + `max_new_tokens` must be",
    "`inputs` must have less than",
    # Ollama (llm/server.go, with truncation off and on /api/embed): "the input length exceeds
    # the context length".
    "input length exceeds the context length",
    # Anthropic (invalid_request_error, 400): "prompt is too long: 210000 tokens > 200000
    # maximum", and with the completion asked for: "input length and `max_tokens` exceed
    # context limit: 188240 + 21333 > 200000, decrease input length or `max_tokens` and try
    # again".
    "prompt is too long",
    "exceed context limit",
    # Gemini (INVALID_ARGUMENT, 400): "The input token count (1196265) exceeds the maximum
    # number of tokens allowed (1048575)."
    "exceeds the maximum number of tokens allowed",
    # OpenAI's Responses API: "Your input exceeds the context window of this model. Please
    # adjust your input and try again."
    "exceeds the context window",
)


def context_exceeded(status: int, body: bytes) -> bool:
    """Whether an upstream's error answer says the prompt plus the completion asked for is longer
    than the model's context. Only the error's code, type and message are read (JSON; a body that
    is not JSON is read as the message itself). A content-policy refusal, or any other 4xx, is
    not one."""
    if status not in REFUSALS or not body or len(body) > ERROR_BYTES:
        return False
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _says_too_long(body.decode("utf-8", "replace"))
    if isinstance(doc, list) and doc:
        doc = doc[0]  # Gemini's streamed answers, errors included, come as a JSON array
    return isinstance(doc, dict) and _judged(doc)


def _judged(doc: dict[str, Any]) -> bool:
    """The error shapes: OpenAI's and vLLM's {"error": {...}}, Anthropic's {"type": "error",
    "error": {...}}, Gemini's {"error": {"message", "status"}}, SGLang's and older vLLM's
    {"object": "error", "message"}, TGI's and Ollama's {"error": "..."}, FastAPI's {"detail":
    "..."}. A `detail` list (a validation error, which echoes the input) is not read."""
    inner = doc.get("error")
    texts: list[str] = []
    for part in (doc, inner):
        if not isinstance(part, dict):
            continue
        for key in ("code", "type", "error_type"):
            value = part.get(key)
            if isinstance(value, str) and value.lower() in _CODES:
                return True
        message = part.get("message")
        if isinstance(message, str):
            texts.append(message)
    for value in (inner, doc.get("detail")):
        if isinstance(value, str):
            texts.append(value)
    return any(_says_too_long(text) for text in texts)


def _says_too_long(text: str) -> bool:
    lowered = text[:_MESSAGE_CHARS].lower()
    return any(phrase in lowered for phrase in _PHRASES)


def fallback_models(
    first: str,
    listed: object,
    configured: Sequence[str],
    fleet: Fleet,
    allowed: Collection[str] = (),
) -> list[str]:
    """The models a request for `first` may move to, in order: `listed` (the body's `models`;
    its first MAX_BODY_MODELS entries; what is not a list, or not a string, is ignored), then
    `configured` (the fallbacks of `first`). Each once, never `first`; only models `fleet`
    serves and, when `allowed` is not empty (a key's grant), only those it holds."""
    seen = {first}
    found: list[str] = []
    entries = listed[:MAX_BODY_MODELS] if isinstance(listed, list) else []
    for model in (*entries, *configured):
        if not isinstance(model, str) or model in seen:
            continue
        seen.add(model)
        if fleet.hosts(model) and (not allowed or model in allowed):
            found.append(model)
    return found


async def too_long(up: Upstream) -> bool:
    """Whether `up`, an opened attempt with a 4xx status, says the request is longer than the
    model's context. Its body is read on, up to ERROR_BYTES (it normally came whole with the
    head), and kept in `up.first`, so that the relay sends it as it came if the answer stays."""
    response = up.response
    if response.status not in REFUSALS:
        return False
    if not response.complete and len(up.first) < ERROR_BYTES:
        parts, size = [up.first], len(up.first)
        try:
            while size < ERROR_BYTES and not response.complete:
                piece = await response.readany()
                if not piece:
                    break
                parts.append(piece)
                size += len(piece)
        except UpstreamError:
            pass  # a body that broke: the relay meets the same end, and no verdict is read
        up.first = b"".join(parts)
    return response.complete and context_exceeded(response.status, up.first)

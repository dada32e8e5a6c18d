"""Gemini's REST API served by a host that speaks only OpenAI's `/v1/chat/completions`.

Three pure translations, no I/O:

- `request`: a `GenerateContentRequest` -> an OpenAI chat body. Turns map to messages (user,
  model -> assistant, functionResponse parts -> tool messages), `systemInstruction` to a system
  message, function declarations to tools, `generationConfig` to sampling fields. Gemini has no
  call ids, so calls get stable ones (`call_{turn}_{n}`): the same history gives the same prompt,
  which keeps a host's prefix cache warm. Anything that cannot be said to an OpenAI engine is a
  400 naming where it was (never the prompt text).
- `response`: a `chat.completion` -> a `GenerateContentResponse`.
- `Stream`: OpenAI's chunk stream -> Gemini's stream, SSE (`alt=sse`) or the JSON array, element
  by element as chunks arrive. Tool-call deltas are gathered and sent as whole `functionCall`
  parts when their choice finishes (Gemini never sends half a call); the element carrying a
  finishReason is held until the next line, so that the usage chunk OpenAI sends right after it
  lands on it, as Gemini puts both on its last element.

Arguments that are not a JSON object cannot be a Gemini `args`: such a call is left out and the
candidate ends with Gemini's own MALFORMED_FUNCTION_CALL, the raw text in `finishMessage`.
Every field is read in its camelCase and snake_case spelling: the REST API accepts both, and the
google-genai SDK sends some nested objects (inlineData, function declarations) in snake_case.
"""

from __future__ import annotations

from typing import Any, Final, TypeVar

import orjson

from edge.dialects.errors import STREAM_FAILED, error_event
from edge.dialects.paths import GEMINI
from edge.errors import BadRequest

MAX_LINE: Final = 1 << 20  # one upstream SSE line, kept until its newline comes
MAX_CALL_ARGS: Final = 4 << 20  # characters of tool-call arguments gathered in one stream
_MAX_SCHEMA_DEPTH: Final = 64

_FINISH: Final = {
    "stop": "STOP", "length": "MAX_TOKENS", "tool_calls": "STOP", "function_call": "STOP",
    "content_filter": "SAFETY",
}  # fmt: skip
# generationConfig (camelCase, snake_case) -> OpenAI; numbers, then integers. vLLM, SGLang and
# llama.cpp all take top_k.
_NUMBERS: Final = (
    ("temperature", "temperature", "temperature"), ("topP", "top_p", "top_p"),
    ("presencePenalty", "presence_penalty", "presence_penalty"),
    ("frequencyPenalty", "frequency_penalty", "frequency_penalty"),
)  # fmt: skip
_INTEGERS: Final = (
    ("topK", "top_k", "top_k"), ("maxOutputTokens", "max_output_tokens", "max_tokens"),
    ("candidateCount", "candidate_count", "n"), ("seed", "seed", "seed"),
)  # fmt: skip
# Gemini's OpenAPI Schema -> JSON Schema: its snake_case names; propertyOrdering (a hint JSON
# Schema lacks) dropped, nullable made a "null" type.
_SCHEMA_NAMES: Final = {
    "any_of": "anyOf", "max_items": "maxItems", "min_items": "minItems",
    "max_length": "maxLength", "min_length": "minLength", "max_properties": "maxProperties",
    "min_properties": "minProperties", "additional_properties": "additionalProperties",
    "defs": "$defs", "ref": "$ref",
}  # fmt: skip
_SCHEMA_DROPPED: Final = frozenset({"propertyOrdering", "property_ordering", "nullable"})
_SCHEMA_MAPS: Final = frozenset({"properties", "$defs"})
_SCHEMA_ONE: Final = frozenset({"items", "additionalProperties"})
_CHOICE_MODES: Final = {"AUTO": "auto", "VALIDATED": "auto", "NONE": "none", "ANY": "required"}
_FCC: Final = ("functionCallingConfig", "function_calling_config")
_T = TypeVar("_T")
_Made = list[tuple[str, str, Any]]  # a model turn's calls not answered yet: OpenAI id, name, id


def _get(doc: dict[str, Any], camel: str, snake: str) -> Any:
    value = doc.get(camel)
    return doc.get(snake) if value is None else value


def _obj(value: Any, where: str) -> dict[str, Any]:
    return _need(value, dict, where, "an object")


def _list(value: Any, where: str) -> list[Any]:
    return _need(value, list, where, "a list")


def _str(value: Any, where: str) -> str:
    return _need(value, str, where, "a string")


def _need(value: Any, kind: type[_T], where: str, noun: str) -> _T:
    if not isinstance(value, kind):
        raise BadRequest(f"{where} must be {noun}.")
    return value


def _shown(name: str) -> str:
    """A client-given name (a mime type, a key) quoted if short and plain, else left out."""
    if len(name) <= 64 and name.isascii() and name.isprintable() and '"' not in name:
        return f'"{name}"'
    return "(unnamed)"


# --- request ----------------------------------------------------------------------------------


def request(raw: object, model: str, stream: bool) -> dict[str, Any]:
    """A GenerateContentRequest as an OpenAI /v1/chat/completions body (`raw` typed `object`:
    compiled, a dict parameter would refuse anything else with TypeError, not a 400)."""
    doc = _obj(raw, "The request body")
    # Ignored: safetySettings (engines have no safety filters to set) and cachedContent (content
    # stored at Google that no host has: the answer is given without it).
    body: dict[str, Any] = {"model": model, "messages": _messages(doc), "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    tools = _tools(doc.get("tools"))
    if tools:
        body["tools"], choice = _tool_choice(doc, tools)
        if choice is not None:
            body["tool_choice"] = choice
    config = _get(doc, "generationConfig", "generation_config")
    if config is not None:
        _generation(_obj(config, "generationConfig"), body)
    return body


def _answered(made: _Made, name: Any, client_id: Any, where: str) -> str:
    """The id of the call a functionResponse answers, taken off `made`: the call with its id if
    it has one, else the first open call of that name."""
    found = [i for i, call in enumerate(made) if client_id and call[2] == client_id]
    found = found or [i for i, call in enumerate(made) if call[1] == name]
    if not found:
        raise BadRequest(f"{where} answers no functionCall of the previous model turn.")
    return made.pop(found[0])[0]


def _messages(doc: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    system = _get(doc, "systemInstruction", "system_instruction")
    if system is not None and (text := _system_text(system)):
        messages.append({"role": "system", "content": text})
    contents = doc.get("contents")
    if not isinstance(contents, list) or not contents:
        raise BadRequest("contents must be a non-empty list of turns.")
    made: _Made = []
    for turn, content in enumerate(contents):
        where = f"contents[{turn}]"
        content = _obj(content, where)
        parts = _list(content.get("parts"), f"{where}.parts")
        if not parts:
            raise BadRequest(f"{where}.parts must not be empty.")
        role = content.get("role") or "user"
        if role == "model":
            made.clear()  # a new model turn: only its calls can be answered now
            messages.append(_model_turn(parts, turn, made, where))
        elif role in ("user", "function"):  # "function": older clients' turn of functionResponses
            messages.extend(_user_turn(parts, made, where))
        else:
            raise BadRequest(f'{where}.role must be "user" or "model".')
    return messages


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    parts = _list(_obj(system, "systemInstruction").get("parts"), "systemInstruction.parts")
    texts = [_obj(part, "systemInstruction.parts[]").get("text") for part in parts]
    return "\n".join(_str(text, "systemInstruction.parts[].text") for text in texts)


def _user_turn(parts: list[Any], made: _Made, where: str) -> list[dict[str, Any]]:
    """Tool messages first (they must follow the assistant's calls), then the user's message."""
    messages: list[dict[str, Any]] = []
    content: list[dict[str, Any]] = []
    for i, part in enumerate(parts):
        at = f"{where}.parts[{i}]"
        part = _obj(part, at)
        if (text := part.get("text")) is not None:
            content.append({"type": "text", "text": _str(text, f"{at}.text")})
        elif (blob := _get(part, "inlineData", "inline_data")) is not None:
            content.append(_image(_obj(blob, f"{at}.inlineData"), at))
        elif (answer := _get(part, "functionResponse", "function_response")) is not None:
            messages.append(_tool_message(_obj(answer, f"{at}.functionResponse"), made, at))
        else:
            raise _untranslatable(part, at)
    if len(content) == 1 and content[0]["type"] == "text":
        messages.append({"role": "user", "content": content[0]["text"]})
    elif content:
        messages.append({"role": "user", "content": content})
    return messages


def _image(blob: dict[str, Any], where: str) -> dict[str, Any]:
    mime = _str(_get(blob, "mimeType", "mime_type"), f"{where}.inlineData.mimeType")
    data = _str(blob.get("data"), f"{where}.inlineData.data")
    if not mime.startswith("image/"):
        raise BadRequest(
            f"{where}: inlineData of type {_shown(mime)} cannot be sent to this model server; "
            "only images can."
        )
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def _tool_message(answer: dict[str, Any], made: _Made, where: str) -> dict[str, Any]:
    call_id = _answered(made, answer.get("name"), answer.get("id"), where)
    result = answer.get("response")
    content = orjson.dumps({} if result is None else result).decode()
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def _untranslatable(part: dict[str, Any], where: str) -> BadRequest:
    if _get(part, "fileData", "file_data") is not None:
        return BadRequest(
            f"{where}: fileData (a file by URI) cannot be sent to this model server; "
            "send the bytes as inlineData."
        )
    kinds = ", ".join(_shown(key) for key in part) or "nothing"
    return BadRequest(f"{where}: a part holding {kinds} cannot be sent to this model server.")


def _model_turn(parts: list[Any], turn: int, made: _Made, where: str) -> dict[str, Any]:
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for i, part in enumerate(parts):
        at = f"{where}.parts[{i}]"
        part = _obj(part, at)
        if part.get("thought") is True:
            continue  # the model's own reasoning summary: not replayed to it
        if (text := part.get("text")) is not None:
            texts.append(_str(text, f"{at}.text"))
        elif (call := _get(part, "functionCall", "function_call")) is not None:
            call = _obj(call, f"{at}.functionCall")
            name = _str(call.get("name"), f"{at}.functionCall.name")
            args = _obj(call.get("args") or {}, f"{at}.functionCall.args")
            call_id = f"call_{turn}_{len(tool_calls)}"
            made.append((call_id, name, call.get("id")))
            function = {"name": name, "arguments": orjson.dumps(args).decode()}
            tool_calls.append({"id": call_id, "type": "function", "function": function})
        else:
            raise _untranslatable(part, at)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if tool_calls:
        message["tool_calls"] = tool_calls
        message["content"] = message["content"] or None
    return message


def _tools(raw: Any) -> list[dict[str, Any]]:
    tools: list[dict[str, Any]] = []
    for i, tool in enumerate(_list(raw, "tools") if raw is not None else ()):
        for key, value in _obj(tool, f"tools[{i}]").items():
            if value is None:
                continue
            if key not in ("functionDeclarations", "function_declarations"):
                raise BadRequest(
                    f"tools[{i}].{_shown(key)} cannot be served by this model server; "
                    "only functionDeclarations can."
                )
            where = f"tools[{i}].functionDeclarations"
            for j, declared in enumerate(_list(value, where)):
                tools.append(_function(_obj(declared, f"{where}[{j}]"), f"{where}[{j}]"))
    return tools


def _function(declaration: dict[str, Any], where: str) -> dict[str, Any]:
    function: dict[str, Any] = {"name": _str(declaration.get("name"), f"{where}.name")}
    if (description := declaration.get("description")) is not None:
        function["description"] = _str(description, f"{where}.description")
    # response / responseJsonSchema (what the function returns) have no OpenAI counterpart.
    if (schema := _get(declaration, "parametersJsonSchema", "parameters_json_schema")) is not None:
        function["parameters"] = _obj(schema, f"{where}.parametersJsonSchema")
    elif (schema := declaration.get("parameters")) is not None:
        function["parameters"] = _schema(_obj(schema, f"{where}.parameters"), where, 0)
    else:  # no parameters: a function of no arguments, said so for engines that need a schema
        function["parameters"] = {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def _schema(schema: Any, where: str, depth: int) -> Any:
    """Gemini's OpenAPI Schema as JSON Schema: lower-case types, `nullable` as a "null" type,
    snake_case names in camelCase, Gemini's ordering hint dropped. Property names are kept."""
    if not isinstance(schema, dict):
        return schema  # additionalProperties: true, or a value the engine will judge
    if depth > _MAX_SCHEMA_DEPTH:
        raise BadRequest(f"{where}: the schema is nested too deeply.")
    out: dict[str, Any] = {}
    for given, value in schema.items():
        key = _SCHEMA_NAMES.get(given) or given
        if key in _SCHEMA_DROPPED:
            continue
        if key == "type" and isinstance(value, str):
            if value.upper() != "TYPE_UNSPECIFIED":
                out[key] = value.lower()
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _schema(sub, where, depth + 1) for name, sub in value.items()}
        elif key in _SCHEMA_ONE:
            out[key] = _schema(value, where, depth + 1)
        elif key == "anyOf" and isinstance(value, list):
            out[key] = [_schema(sub, where, depth + 1) for sub in value]
        else:
            out[key] = value
    if schema.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _tool_choice(doc: dict[str, Any], tools: list[dict[str, Any]]) -> tuple[list[Any], Any]:
    """(the tools offered, OpenAI's tool_choice or None) from functionCallingConfig."""
    config = _get(doc, "toolConfig", "tool_config")
    calling = None if config is None else _get(_obj(config, "toolConfig"), *_FCC)
    if calling is None:
        return tools, None
    calling = _obj(calling, "toolConfig.functionCallingConfig")
    mode = calling.get("mode") or "MODE_UNSPECIFIED"
    if mode == "MODE_UNSPECIFIED":
        return tools, None
    if not isinstance(mode, str) or mode not in _CHOICE_MODES:
        raise BadRequest(
            "toolConfig.functionCallingConfig.mode must be AUTO, ANY, NONE or VALIDATED."
        )
    allowed = _get(calling, "allowedFunctionNames", "allowed_function_names")
    if not allowed or mode == "NONE":
        return tools, _CHOICE_MODES[mode]
    # OpenAI has no "one of these": offer only the allowed functions.
    names = _list(allowed, "toolConfig.functionCallingConfig.allowedFunctionNames")
    tools = [tool for tool in tools if tool["function"]["name"] in names]
    if not tools:
        raise BadRequest("allowedFunctionNames names none of the declared functions.")
    if mode == "ANY" and len(tools) == 1:
        return tools, {"type": "function", "function": {"name": tools[0]["function"]["name"]}}
    return tools, _CHOICE_MODES[mode]


def _generation(config: dict[str, Any], body: dict[str, Any]) -> None:
    """generationConfig's sampling fields into `body`. Ignored, having no OpenAI counterpart an
    engine takes alike: thinkingConfig, responseModalities, speechConfig, mediaResolution,
    responseLogprobs/logprobs (the answer would need them translated back)."""
    for camel, snake, name in _NUMBERS:
        if (value := _get(config, camel, snake)) is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadRequest(f"generationConfig.{camel} must be a number.")
            body[name] = value
    for camel, snake, name in _INTEGERS:
        if (value := _get(config, camel, snake)) is not None:
            body[name] = _integer(value, f"generationConfig.{camel}")
    if stops := _get(config, "stopSequences", "stop_sequences"):
        stops = _list(stops, "generationConfig.stopSequences")
        body["stop"] = [_str(stop, "generationConfig.stopSequences[]") for stop in stops]
    if (format_ := _response_format(config)) is not None:
        body["response_format"] = format_


def _integer(value: Any, where: str) -> int:
    # The SDK sends topK as a float (20.0): whole floats are integers here.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{where} must be an integer.")
    return value


def _response_format(config: dict[str, Any]) -> dict[str, Any] | None:
    mime = _get(config, "responseMimeType", "response_mime_type")
    if mime is None or mime == "text/plain":
        return None
    if mime != "application/json":
        raise BadRequest(
            f"generationConfig.responseMimeType {_shown(str(mime))} cannot be sent to this "
            "model server; use text/plain or application/json."
        )
    schema = _get(config, "responseJsonSchema", "response_json_schema")
    if schema is None and (gemini := _get(config, "responseSchema", "response_schema")):
        schema = _schema(_obj(gemini, "generationConfig.responseSchema"), "responseSchema", 0)
    if schema is None:
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}


# --- response ---------------------------------------------------------------------------------


def response(doc: dict[str, Any], model: str) -> dict[str, Any]:
    """A `chat.completion` as a GenerateContentResponse."""
    choices = [c for c in doc.get("choices") or () if isinstance(c, dict)]
    out: dict[str, Any] = {"candidates": [_candidate(c) for c in choices]}
    if isinstance(usage := doc.get("usage"), dict):
        out["usageMetadata"] = _usage(usage)
    out["modelVersion"] = model
    if isinstance(response_id := doc.get("id"), str):
        out["responseId"] = response_id
    return out


def _candidate(choice: dict[str, Any]) -> dict[str, Any]:
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    parts = _text_parts(message)
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}}
    candidate["index"] = choice.get("index") or 0
    calls = [
        c.get("function") or {} for c in message.get("tool_calls") or () if isinstance(c, dict)
    ]
    malformed = _call_parts([(c.get("name"), c.get("arguments")) for c in calls], parts)
    _finish(candidate, choice.get("finish_reason"), malformed)
    return candidate


def _text_parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A thought part for the engine's reasoning (vLLM's `reasoning_content`, or `reasoning`),
    then the text."""
    parts: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if reasoning and isinstance(reasoning, str):
        parts.append({"text": reasoning, "thought": True})
    if (text := message.get("content")) and isinstance(text, str):
        parts.append({"text": text})
    return parts


def _call_parts(calls: list[tuple[Any, Any]], parts: list[dict[str, Any]]) -> str | None:
    """functionCall parts appended to `parts`; the finishMessage when a call's arguments are not
    a JSON object (that call left out)."""
    malformed = None
    for name, arguments in calls:
        raw = arguments if isinstance(arguments, str) else ""
        try:
            args = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            args = None
        if isinstance(args, dict) and isinstance(name, str):
            parts.append({"functionCall": {"name": name, "args": args}})
        else:
            malformed = f"Malformed function call: {name} {raw}"
    return malformed


def _finish(candidate: dict[str, Any], reason: Any, malformed: str | None) -> None:
    if malformed is not None:
        candidate["finishReason"] = "MALFORMED_FUNCTION_CALL"
        candidate["finishMessage"] = malformed
    elif reason is not None:
        candidate["finishReason"] = (
            _FINISH.get(reason, "OTHER") if isinstance(reason, str) else "OTHER"
        )


def _usage(usage: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's usage in Gemini's terms, where thoughts are counted apart from candidates."""
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    total = _count(usage.get("total_tokens")) or prompt + completion
    thoughts = _count((usage.get("completion_tokens_details") or {}).get("reasoning_tokens"))
    meta = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": max(completion - thoughts, 0),
        "totalTokenCount": total,
    }
    if thoughts:
        meta["thoughtsTokenCount"] = thoughts
    if cached := _count((usage.get("prompt_tokens_details") or {}).get("cached_tokens")):
        meta["cachedContentTokenCount"] = cached
    return meta


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# --- stream -----------------------------------------------------------------------------------


class _Call:
    """One streamed tool call being gathered: its name and its argument fragments."""

    __slots__ = ("name", "args")

    def __init__(self) -> None:
        self.name: Any = None
        self.args: list[str] = []


class Stream:
    """OpenAI chat.completion.chunk SSE -> Gemini's stream (SSE when `sse`, else a JSON array).

    State: `_rest` the incomplete last line; `_held` the element that carries a finishReason,
    waiting for the usage chunk; `_calls` the tool calls gathered per choice; `_open` the choices
    begun and not finished; `_done` once `[DONE]` came (the answer is whole: later lines are
    ignored); `_closed` once end() or fail() returned the stream's close. A clean end with
    neither [DONE] nor every choice finished is an answer cut short: it ends as a failure.
    `resumed` starts with candidate 0 open and an element sent: a continued stream.
    """

    __slots__ = ("_model", "_sse", "_max_line", "_rest", "_held", "_calls", "_call_chars",
                 "_open", "_finished", "_sent", "_done", "_closed", "_ids")  # fmt: skip

    def __init__(self, model: str, sse: bool, max_line: int = MAX_LINE) -> None:
        self._model = model
        self._sse = sse
        self._max_line = max_line
        self._rest = b""
        self._held: dict[str, Any] | None = None
        self._calls: dict[int, dict[int, _Call]] = {}
        self._call_chars = 0
        self._open: set[int] = set()
        self._finished = False
        self._sent = False  # an element went out (the JSON array's "[" with it)
        self._done = False
        self._closed = False
        self._ids = True  # elements carry the chunk's id as responseId

    @classmethod
    def resumed(
        cls, model: str, response_id: str, sse: bool = True, max_line: int = MAX_LINE
    ) -> Stream:
        """A translator that goes on with a stream the client holds the start of (a native
        Gemini stream broken mid-answer, continued from an OpenAI host: edge/proxy/native.py):
        candidate 0 begun, not finished; elements already sent. `model` is the modelVersion the
        client saw; `response_id` its responseId ("" where it got none: the elements then carry
        none either; else the splice gives every chunk that id)."""
        stream = cls(model, sse, max_line)
        stream._open.add(0)
        stream._sent = True
        stream._ids = bool(response_id)
        return stream

    def __repr__(self) -> str:
        calls = sum(len(c) for c in self._calls.values())
        return f"<gemini.Stream sse={self._sse} rest={len(self._rest)} calls={calls}>"

    def feed(self, data: bytes) -> bytes:
        """The client's bytes for upstream bytes cut anywhere; ValueError for a line longer
        than the bound (whole or in pieces) or a data line that is not JSON."""
        if self._closed or self._done:
            return b""
        cut = data.rfind(b"\n")
        if cut < 0:
            self._rest += data
            self._bound(self._rest)
            return b""
        lines = (self._rest + data[:cut]).split(b"\n")
        self._rest = data[cut + 1 :]
        self._bound(self._rest)
        out: list[bytes] = []
        for line in lines:
            self._line(line, out)
            if self._closed or self._done:
                break
        return b"".join(out)

    def end(self) -> bytes:
        """The close of a stream whose upstream ended cleanly; once."""
        out: list[bytes] = []
        if self._rest and not (self._closed or self._done):  # a last line with no newline
            rest, self._rest = self._rest, b""
            self._line(rest, out)
        if self._closed:
            return b"".join(out)
        if not self._done and (self._open or not self._finished):
            out.append(self.fail(STREAM_FAILED))
            return b"".join(out)
        self._closed = True
        self._flush(out)
        if self._calls:  # [DONE] after calls of a choice with no finish_reason: whole, no reason
            candidates = [self._called(index, None) for index in sorted(self._calls)]
            out.append(self._frame(self._element(candidates, None)))
        if not self._sse:
            out.append(b"]" if self._sent else b"[]")
        return b"".join(out)

    def drop_partial(self) -> None:
        """Forget the incomplete last line: the stream goes on from a whole event (a
        continuation, edge/proxy/continuation.py)."""
        self._rest = b""

    def fail(self, message: str = STREAM_FAILED, trace_id: str | None = None) -> bytes:
        """The error ending of a stream whose upstream broke; once. Calls still being gathered
        are dropped: half a call is no call."""
        if self._closed:
            return b""
        if self._done:
            return self.end()  # [DONE] came: the answer was whole
        self._closed = True
        out: list[bytes] = []
        self._flush(out)
        event = error_event(GEMINI, message, trace_id)
        if self._sse:
            out.append(event)
        else:  # the same error object, as the array's last element
            out.append((b",\r\n" if self._sent else b"[") + event[6:-2] + b"]")
        return b"".join(out)

    def _bound(self, line: bytes) -> None:
        if len(line) > self._max_line:
            raise ValueError(f"an upstream SSE line is longer than {self._max_line} bytes")

    def _line(self, line: bytes, out: list[bytes]) -> None:
        self._bound(line)  # whole lines too: the outcome must not depend on where bytes cut
        if not line.startswith(b"data:"):
            return  # comments, event:/id: lines, blank keep-alives and separators
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self._done = True
            self._flush(out)
        elif payload:
            chunk = orjson.loads(payload)
            if isinstance(chunk, dict):
                self._chunk(chunk, out)

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        if (chunk.get("error") or chunk.get("object") == "error") and not chunk.get("choices"):
            out.append(self.fail(STREAM_FAILED))  # an engine's error: its text is not ours
            return
        candidates = [c for c in map(self._candidate, chunk.get("choices") or ()) if c]
        usage = chunk.get("usage")
        usage = usage if isinstance(usage, dict) else None
        if candidates:
            self._flush(out)
            element = self._element(candidates, chunk.get("id"))
            if usage:
                element["usageMetadata"] = _usage(usage)
            if not usage and any("finishReason" in c for c in candidates):
                self._held = element  # the usage chunk usually comes next: it belongs here
            else:
                out.append(self._frame(element))
        elif usage:
            element = self._held or self._element(None, chunk.get("id"))
            element["usageMetadata"] = _usage(usage)
            self._held = element
            self._flush(out)

    def _candidate(self, choice: Any) -> dict[str, Any] | None:
        if not isinstance(choice, dict):
            return None
        index = choice.get("index") or 0
        delta = choice.get("delta")
        delta = delta if isinstance(delta, dict) else {}
        if calls := delta.get("tool_calls"):
            self._gather(self._calls.setdefault(index, {}), calls)
        parts = _text_parts(delta)
        if (reason := choice.get("finish_reason")) is not None:
            self._open.discard(index)
            self._finished = True
            return self._called(index, reason, parts)
        self._open.add(index)
        return {"content": {"role": "model", "parts": parts}, "index": index} if parts else None

    def _called(self, index: int, reason: Any, parts: list[Any] | None = None) -> dict[str, Any]:
        """A candidate that ends its calls: the parts, then each gathered call whole."""
        parts = parts or []
        gathered = self._calls.pop(index, {})
        calls = [(gathered[i].name, "".join(gathered[i].args)) for i in sorted(gathered)]
        malformed = _call_parts(calls, parts)
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": index}
        _finish(candidate, reason, malformed)
        return candidate

    def _gather(self, calls: dict[int, _Call], deltas: Any) -> None:
        for delta in deltas if isinstance(deltas, list) else ():
            if not isinstance(delta, dict):
                continue
            index = delta.get("index")
            if not isinstance(index, int):  # engines that leave it out: a new id, a new call
                index = len(calls) if delta.get("id") or not calls else max(calls)
            call = calls.get(index) or calls.setdefault(index, _Call())
            function = delta.get("function") or {}
            if name := function.get("name"):
                call.name = name  # sent whole in one delta, by OpenAI and the engines alike
            if (args := function.get("arguments")) and isinstance(args, str):
                self._call_chars += len(args)
                if self._call_chars > MAX_CALL_ARGS:
                    raise ValueError(f"tool-call arguments past {MAX_CALL_ARGS} characters")
                call.args.append(args)

    def _element(self, candidates: list[dict[str, Any]] | None, chunk_id: Any) -> dict[str, Any]:
        element: dict[str, Any] = {} if candidates is None else {"candidates": candidates}
        element["modelVersion"] = self._model
        if isinstance(chunk_id, str) and self._ids:
            element["responseId"] = chunk_id
        return element

    def _flush(self, out: list[bytes]) -> None:
        if self._held is not None:
            out.append(self._frame(self._held))
            self._held = None

    def _frame(self, element: dict[str, Any]) -> bytes:
        body = orjson.dumps(element)
        if self._sse:
            return b"data: " + body + b"\r\n\r\n"
        head = b",\r\n" if self._sent else b"["
        self._sent = True
        return head + body

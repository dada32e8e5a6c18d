"""Anthropic's Messages API (`POST /v1/messages`) served by hosts that speak only OpenAI's
`/v1/chat/completions`: three pure translations, no I/O.

- `request`: a Messages body -> a chat completions body. Anthropic's turns hold blocks; OpenAI's
  hold one content and a separate role for tool answers, so a user turn's `tool_result` blocks
  become `tool` messages placed first (they answer the assistant turn just before) and the rest
  of the turn one user message after them.
- `response`: a `chat.completion` -> a `message` (choice 0 only: Anthropic has no `n`).
- `Stream`: `chat.completion.chunk` SSE -> Anthropic's events, as each upstream line completes.

The stream's grammar (what `Stream` writes, what the SDKs accumulate by block index):

    message_start (content_block_start content_block_delta* content_block_stop)*
    message_delta message_stop  |  ... error

A run of OpenAI text deltas is one `text` block; each tool call (an OpenAI tool-call `index`) is
one `tool_use` block whose `arguments` fragments pass on as `input_json_delta`s, unparsed. The
finish reason and the usage come last and apart (usage in its own chunk, `include_usage`), so
`message_delta` waits for `[DONE]` or the clean end. Explicit state: NEW (nothing sent), OPEN
(message_start sent), CLOSED (message_stop or error sent; everything after is b"").
`Stream.resumed` starts OPEN, a text block open: the client's own stream, begun by a host that
speaks Anthropic's API and broken, goes on from an OpenAI host (edge/proxy/native.py).

Messages raised to clients name a place (`messages[2].content[0]`) and never repeat the prompt.
"""

from __future__ import annotations

import secrets
from typing import Any, Final

import orjson

from edge.dialects.errors import STREAM_FAILED, error_event
from edge.dialects.paths import ANTHROPIC
from edge.errors import BadRequest

MAX_LINE: Final = 1 << 20  # the longest upstream SSE line held while it completes

STOP_REASONS: Final = {
    "stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
    "function_call": "tool_use", "content_filter": "refusal",
}  # fmt: skip
_TOOL_CHOICE: Final = {"auto": "auto", "any": "required", "none": "none"}
_IMAGE_TYPES: Final = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
# Anthropic's own block types, named back in errors; any other type string is not repeated.
_BLOCK_TYPES: Final = frozenset({
    "text", "image", "document", "search_result", "tool_use", "tool_result", "thinking",
    "redacted_thinking", "server_tool_use", "web_search_tool_result", "web_fetch_tool_result",
    "code_execution_tool_result", "mcp_tool_use", "mcp_tool_result", "container_upload",
})  # fmt: skip
# Earlier reasoning has no field in OpenAI's request, and its signature only means something to
# the model that wrote it: engines' chat templates drop or regenerate it anyway.
_DROPPED: Final = frozenset({"thinking", "redacted_thinking"})
_ONLY_OPENAI: Final = "when the model server speaks only OpenAI's API"


def request(doc: object, model: str, stream: bool) -> dict[str, Any]:
    """The client's Messages request as an OpenAI /v1/chat/completions body. `doc` is typed
    `object`, not a dict: compiled, a dict parameter would refuse anything else with TypeError
    before the check below could answer 400."""
    if not isinstance(doc, dict):
        raise BadRequest("The request body must be a JSON object.")
    body: dict[str, Any] = {"model": model, "messages": _messages(doc)}
    body["max_tokens"] = _max_tokens(doc)
    _sampling(doc, body)
    _tools(doc, body)
    _output_format(doc, body)
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _bad(where: str, what: str) -> BadRequest:
    return BadRequest(f"{where}: {what}.", param=where)


def _messages(doc: dict[str, Any]) -> list[dict[str, Any]]:
    turns = doc.get("messages")
    if not isinstance(turns, list) or not turns:
        raise _bad("messages", "a non-empty list of messages is required")
    out = _system(doc.get("system"))
    calls: set[str] = set()  # tool_use ids so far: each tool_result must answer one
    for i, turn in enumerate(turns):
        where = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise _bad(where, "must be an object")
        role, content = turn.get("role"), turn.get("content")
        if role == "user":
            out.extend(_user(content, where, calls))
        elif role == "assistant":
            out.append(_assistant(content, where, calls))
        else:
            raise _bad(f"{where}.role", 'must be "user" or "assistant"')
    return out


def _system(system: Any) -> list[dict[str, Any]]:
    if system is None:
        return []
    if isinstance(system, list):
        system = "\n\n".join(_text(block, f"system[{j}]") for j, block in enumerate(system))
    elif not isinstance(system, str):
        raise _bad("system", "must be a string or a list of text blocks")
    return [{"role": "system", "content": system}] if system else []


def _text(block: Any, where: str) -> str:
    if not isinstance(block, dict) or block.get("type") != "text":
        raise _bad(where, "only text blocks are supported here")
    text = block.get("text")
    if not isinstance(text, str):
        raise _bad(f"{where}.text", "must be a string")
    return text


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        raise _bad(f"{where}.content", "must be a string or a list of blocks")
    for j, block in enumerate(content):
        if not isinstance(block, dict):
            raise _bad(f"{where}.content[{j}]", "must be an object")
    return content


def _unsupported(kind: Any, where: str, turn: str) -> BadRequest:
    name = f"{kind} blocks are" if kind in _BLOCK_TYPES else "this block type is"
    return _bad(where, f"{name} not supported in {turn} {_ONLY_OPENAI}")


def _user(content: Any, where: str, calls: set[str]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    blocks = _blocks(content, where)
    if not blocks:
        raise _bad(f"{where}.content", "must not be empty")
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        at, kind = f"{where}.content[{j}]", block.get("type")
        if kind == "tool_result":
            out.append(_tool_result(block, at, calls))
        elif kind == "text":
            parts.append({"type": "text", "text": _text(block, at)})
        elif kind == "image":
            parts.append(_image(block, at))
        else:
            raise _unsupported(kind, at, "a user turn")
    if parts:
        # A lone text block as a plain string: the one content shape every engine's template takes.
        lone = len(parts) == 1 and parts[0]["type"] == "text"
        out.append({"role": "user", "content": parts[0]["text"] if lone else parts})
    return out


def _tool_result(block: dict[str, Any], where: str, calls: set[str]) -> dict[str, Any]:
    call = block.get("tool_use_id")
    if not isinstance(call, str) or call not in calls:
        raise _bad(f"{where}.tool_use_id", "must be the id of a tool_use in an earlier turn")
    content = block.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        at = f"{where}.content"
        content = "\n".join(_text(part, f"{at}[{k}]") for k, part in enumerate(content))
    elif not isinstance(content, str):
        raise _bad(f"{where}.content", "must be a string or a list of text blocks")
    # `is_error` has no counterpart: the text says what went wrong, and the model reads it.
    return {"role": "tool", "tool_call_id": call, "content": content}


def _image(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise _bad(f"{where}.source", "must be an object")
    kind = source.get("type")
    if kind == "base64":
        media, data = source.get("media_type"), source.get("data")
        if media not in _IMAGE_TYPES:
            raise _bad(f"{where}.source.media_type", "must be image/jpeg, png, gif or webp")
        if not isinstance(data, str):
            raise _bad(f"{where}.source.data", "must be a base64 string")
        url: Any = f"data:{media};base64,{data}"
    elif kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url:
            raise _bad(f"{where}.source.url", "must be a string")
    else:
        raise _bad(f"{where}.source.type", f'must be "base64" or "url" {_ONLY_OPENAI}')
    return {"type": "image_url", "image_url": {"url": url}}


def _assistant(content: Any, where: str, calls: set[str]) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, where)):
        at, kind = f"{where}.content[{j}]", block.get("type")
        if kind == "text":
            texts.append(_text(block, at))
        elif kind == "tool_use":
            tool_calls.append(_tool_call(block, at, calls))
        elif kind not in _DROPPED:
            raise _unsupported(kind, at, "an assistant turn")
    # Anthropic's text blocks of one turn are one text cut in pieces: joined as they were.
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if tool_calls:
        message["tool_calls"] = tool_calls
        if not texts:
            message["content"] = None  # OpenAI's shape for a turn that only calls tools
    return message


def _tool_call(block: dict[str, Any], where: str, calls: set[str]) -> dict[str, Any]:
    call, name, args = block.get("id"), block.get("name"), block.get("input")
    if not isinstance(call, str) or not call:
        raise _bad(f"{where}.id", "must be a non-empty string")
    if not isinstance(name, str) or not name:
        raise _bad(f"{where}.name", "must be a non-empty string")
    if not isinstance(args, dict):
        raise _bad(f"{where}.input", "must be an object")
    calls.add(call)
    arguments = orjson.dumps(args).decode()
    return {"id": call, "type": "function", "function": {"name": name, "arguments": arguments}}


def _max_tokens(doc: dict[str, Any]) -> int:
    value = doc.get("max_tokens")
    if type(value) is not int or value < 1:
        raise _bad("max_tokens", "a positive integer is required")
    return value


def _number(value: Any) -> bool:
    return type(value) is float or type(value) is int


def _sampling(doc: dict[str, Any], body: dict[str, Any]) -> None:
    for key in ("temperature", "top_p"):
        value = doc.get(key)
        if value is not None:
            if not _number(value):
                raise _bad(key, "must be a number")
            body[key] = value
    top_k = doc.get("top_k")
    if top_k is not None:
        if type(top_k) is not int:
            raise _bad("top_k", "must be an integer")
        body["top_k"] = top_k  # not OpenAI's, but vLLM, SGLang and llama.cpp all read it
    stops = doc.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("stop_sequences", "must be a list of strings")
        if stops:
            body["stop"] = stops
    metadata = doc.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        body["user"] = metadata["user_id"]


def _tools(doc: dict[str, Any], body: dict[str, Any]) -> None:
    tools = doc.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools", "must be a list")
        if tools:
            body["tools"] = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    choice = doc.get("tool_choice")
    if choice is not None:
        picked, parallel = _tool_choice(choice)
        if "tools" in body:  # without tools the choice is moot, and some engines refuse it
            body["tool_choice"] = picked
            if not parallel:
                body["parallel_tool_calls"] = False


def _tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict):
        raise _bad(where, "must be an object")
    if tool.get("type", "custom") not in ("custom", None):
        raise _bad(f"{where}.type", f"Anthropic's server tools are not available {_ONLY_OPENAI}")
    name, schema, text = tool.get("name"), tool.get("input_schema"), tool.get("description")
    if not isinstance(name, str) or not name:
        raise _bad(f"{where}.name", "must be a non-empty string")
    if not isinstance(schema, dict):
        raise _bad(f"{where}.input_schema", "must be an object")
    function: dict[str, Any] = {"name": name, "parameters": schema}
    if isinstance(text, str):
        function["description"] = text
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> tuple[Any, bool]:
    """OpenAI's tool_choice, and whether parallel tool calls stay allowed."""
    if not isinstance(choice, dict):
        raise _bad("tool_choice", "must be an object")
    kind, name = choice.get("type"), choice.get("name")
    parallel = choice.get("disable_parallel_tool_use") is not True
    if kind == "tool":
        if not isinstance(name, str) or not name:
            raise _bad("tool_choice.name", "must be a non-empty string")
        return {"type": "function", "function": {"name": name}}, parallel
    if kind not in _TOOL_CHOICE:
        raise _bad("tool_choice.type", 'must be "auto", "any", "tool" or "none"')
    return _TOOL_CHOICE[kind], parallel


def _output_format(doc: dict[str, Any], body: dict[str, Any]) -> None:
    """Structured outputs (`output_config.format`) as OpenAI's json_schema response_format."""
    config = doc.get("output_config")
    found = config.get("format") if isinstance(config, dict) else None
    if found is None:
        return
    if not isinstance(found, dict) or found.get("type") != "json_schema":
        raise _bad("output_config.format.type", 'must be "json_schema"')
    schema = found.get("schema")
    if not isinstance(schema, dict):
        raise _bad("output_config.format.schema", "must be an object")
    spec = {"name": "output", "schema": schema}
    body["response_format"] = {"type": "json_schema", "json_schema": spec}


def response(doc: dict[str, Any], model: str) -> dict[str, Any]:
    """An OpenAI `chat.completion` as an Anthropic `message`."""
    choices = doc.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    choice = choice if isinstance(choice, dict) else {}
    message = choice.get("message")
    message = message if isinstance(message, dict) else {}
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    calls = message.get("tool_calls")
    calls = calls if isinstance(calls, list) else []
    uses = [_tool_use(call) for call in calls if isinstance(call, dict)]
    content += uses
    reason, sequence = _stop(choice.get("finish_reason"), _matched(choice), bool(uses))
    return {
        "id": _message_id(doc.get("id")), "type": "message", "role": "assistant",
        "model": model, "content": content, "stop_reason": reason, "stop_sequence": sequence,
        "usage": {"input_tokens": _tokens(doc, "prompt_tokens"),
                  "output_tokens": _tokens(doc, "completion_tokens")},
    }  # fmt: skip


def _message_id(upstream: Any) -> str:
    return "msg_" + (upstream if isinstance(upstream, str) and upstream else secrets.token_hex(12))


def _tool_id(upstream: Any) -> str:
    return upstream if isinstance(upstream, str) and upstream else "toolu_" + secrets.token_hex(12)


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    function = function if isinstance(function, dict) else {}
    name = function.get("name")
    return {
        "type": "tool_use", "id": _tool_id(call.get("id")),
        "name": name if isinstance(name, str) else "", "input": _input(function.get("arguments")),
    }  # fmt: skip


def _input(arguments: Any) -> dict[str, Any]:
    """A tool call's arguments as Anthropic's `input` object. Engines send "" for a call with
    no arguments; arguments that are not a JSON object (a model's broken JSON) become {} too,
    since the SDKs require an object, and the tool then reports what it misses."""
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) and arguments else None
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _matched(choice: dict[str, Any]) -> Any:
    """The stop string that ended the answer, where the engine says: vLLM's `stop_reason`,
    SGLang's `matched_stop` (each an int when a stop token, not a string, ended it)."""
    found = choice.get("stop_reason")
    return found if found is not None else choice.get("matched_stop")


def _stop(finish: Any, matched: Any, used_tools: bool) -> tuple[str, str | None]:
    if finish == "stop" and isinstance(matched, str) and matched:
        return "stop_sequence", matched
    reason = STOP_REASONS.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"
    # Some engines end a tool-calling answer with "stop"; Anthropic clients loop on "tool_use".
    return ("tool_use" if used_tools and reason == "end_turn" else reason), None


def _tokens(doc: dict[str, Any], key: str) -> int:
    usage = doc.get("usage")
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if type(value) is int and value >= 0 else 0


def _event(kind: str, doc: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"


# The two events of the hot path, written without building a dict per delta.
_TEXT_DELTA: Final = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
    b'"delta":{"type":"text_delta","text":%b}}\n\n'
)
_JSON_DELTA: Final = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
    b'"delta":{"type":"input_json_delta","partial_json":%b}}\n\n'
)
_MESSAGE_STOP: Final = _event("message_stop", {"type": "message_stop"})
_NEW, _OPEN, _CLOSED = 0, 1, 2  # the stream's states
_TEXT, _TOOL = 1, 2  # the kinds of an open content block (0: none)


class Stream:
    """An OpenAI chat.completion.chunk SSE stream -> Anthropic's event stream, as it arrives."""

    __slots__ = (
        "model", "max_line", "_parts", "_held", "_state", "_open", "_blocks", "_tools",
        "_last_tool", "_finish", "_matched", "_input", "_output", "_given",
    )  # fmt: skip

    def __init__(self, model: str, max_line: int = MAX_LINE) -> None:
        self.model = model
        self.max_line = max_line
        self._parts: list[bytes] = []  # the incomplete last line, in the pieces it came in
        self._held = 0
        self._state = _NEW
        self._open = 0  # the open block's kind; its index is always _blocks - 1
        self._blocks = 0
        self._tools: dict[int, int] = {}  # OpenAI's tool-call index -> its block's index
        self._last_tool = -1
        self._finish: str | None = None
        self._matched: Any = None
        self._input = 0
        self._output = 0
        self._given = False  # input tokens given (a resumed stream), not read from the usage

    @classmethod
    def resumed(
        cls,
        model: str,
        block: int,
        input_tokens: int,
        output_tokens: int = 0,
        max_line: int = MAX_LINE,
    ) -> Stream:
        """A translator that goes on with a stream the client holds the start of (a native
        Anthropic stream broken mid-answer, continued from an OpenAI host: edge/proxy/native.py):
        message_start sent, text block `block` open (-1: no block begun yet). Its chunks (no
        role delta: the splice drops it) become deltas of that block, then content_block_stop,
        message_delta and message_stop, as the first host would have ended it. The
        message_delta's input_tokens are `input_tokens` (what message_start said), its
        output_tokens the OpenAI usage's completion_tokens (the splice counts the client's
        tokens in), else `output_tokens`."""
        stream = cls(model, max_line)
        stream._state = _OPEN
        if block >= 0:
            stream._open, stream._blocks = _TEXT, block + 1
        stream._input, stream._output, stream._given = input_tokens, output_tokens, True
        return stream

    def __repr__(self) -> str:
        return f"<anthropic.Stream state={self._state} blocks={self._blocks} held={self._held}>"

    def feed(self, data: bytes) -> bytes:
        """The events the complete lines of `data` (and what came before it) make."""
        if self._state == _CLOSED:
            return b""
        cut = data.rfind(b"\n")
        if cut < 0:
            self._hold(data)
            return b""
        # Pieces are joined once, when their line completes: no quadratic copy of a long line.
        lines = b"".join((*self._parts, data[:cut])) if self._parts else data[:cut]
        self._parts, self._held = [], 0
        self._hold(data[cut + 1 :])
        out: list[bytes] = []
        for line in lines.split(b"\n"):
            self._line(line, out)
        return b"".join(out)

    def end(self) -> bytes:
        """The upstream ended cleanly: the events that close the message, once."""
        if self._state == _CLOSED:
            return b""
        out: list[bytes] = []
        if self._parts:  # a last line without its newline
            line, self._parts, self._held = b"".join(self._parts), [], 0
            self._line(line, out)
        if self._state != _CLOSED:
            # No finish reason and no [DONE]: an answer cut short, not to be passed off as whole.
            out.append(self._close() if self._finish is not None else self.fail(STREAM_FAILED))
        return b"".join(out)

    def fail(self, message: str, trace_id: str | None = None) -> bytes:
        """The upstream broke: Anthropic's error event ends the stream, as it stands."""
        if self._state == _CLOSED:
            return b""
        self._state = _CLOSED
        return error_event(ANTHROPIC, message, trace_id)

    def drop_partial(self) -> None:
        """Forget the incomplete last line: the stream goes on from a whole event (a
        continuation, edge/proxy/continuation.py)."""
        self._parts, self._held = [], 0

    def _hold(self, piece: bytes) -> None:
        if piece:
            self._held += len(piece)
            if self._held > self.max_line:
                raise ValueError(f"an upstream SSE line is longer than {self.max_line} bytes")
            self._parts.append(piece)

    def _line(self, line: bytes, out: list[bytes]) -> None:
        if len(line) > self.max_line:  # the same bound whether a line came whole or in pieces
            raise ValueError(f"an upstream SSE line is longer than {self.max_line} bytes")
        if self._state == _CLOSED or not line.startswith(b"data:"):
            return  # comments, event:, id: and blank keep-alives; anything after the end
        payload = line[5:].strip()
        if payload == b"[DONE]":
            out.append(self._close())
            return
        if not payload:
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise ValueError("an upstream SSE event is not JSON") from None
        if isinstance(chunk, dict):
            self._chunk(chunk, out)

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        if chunk.get("error") and not chunk.get("choices"):
            # vLLM and SGLang report a failure mid-stream as a data event: a broken stream.
            out.append(self.fail(STREAM_FAILED))
            return
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._count(usage)
        if self._state == _NEW:
            out.append(self._start(chunk.get("id")))
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._choice(choice, out)

    def _count(self, usage: dict[str, Any]) -> None:
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if type(prompt) is int and not self._given:
            self._input = prompt
        if type(completion) is int:
            self._output = completion

    def _start(self, upstream_id: Any) -> bytes:
        self._state = _OPEN
        message: dict[str, Any] = {
            "id": _message_id(upstream_id), "type": "message", "role": "assistant",
            "model": self.model, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self._input, "output_tokens": 0},
        }  # fmt: skip
        return _event("message_start", {"type": "message_start", "message": message})

    def _choice(self, choice: dict[str, Any], out: list[bytes]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text = delta.get("content")
            if isinstance(text, str) and text:
                if self._open != _TEXT:
                    self._begin(_TEXT, {"type": "text", "text": ""}, out)
                out.append(_TEXT_DELTA % (self._blocks - 1, orjson.dumps(text)))
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict):
                    self._tool_delta(call, out)
        finish = choice.get("finish_reason")
        if isinstance(finish, str):
            self._finish, self._matched = finish, _matched(choice)

    def _tool_delta(self, call: dict[str, Any], out: list[bytes]) -> None:
        key = call.get("index")
        if type(key) is not int:  # an engine without indexes: a new id starts a new call
            key = self._last_tool + (1 if call.get("id") or self._last_tool < 0 else 0)
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        block = self._tools.get(key)
        if block is None:
            name = function.get("name")
            start = {"type": "tool_use", "id": _tool_id(call.get("id")),
                     "name": name if isinstance(name, str) else "", "input": {}}  # fmt: skip
            block = self._begin(_TOOL, start, out)
            self._tools[key], self._last_tool = block, key
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            # A late fragment of an earlier call (engines send calls one after another, so
            # rarely) goes to that call's block by index: the SDKs accumulate by index.
            out.append(_JSON_DELTA % (block, orjson.dumps(arguments)))

    def _begin(self, kind: int, block: dict[str, Any], out: list[bytes]) -> int:
        """Close the open block, start the next: its index."""
        self._end_block(out)
        index, self._open = self._blocks, kind
        self._blocks += 1
        start = {"type": "content_block_start", "index": index, "content_block": block}
        out.append(_event("content_block_start", start))
        return index

    def _end_block(self, out: list[bytes]) -> None:
        if self._open:
            stop = {"type": "content_block_stop", "index": self._blocks - 1}
            out.append(_event("content_block_stop", stop))
            self._open = 0

    def _close(self) -> bytes:
        out = [self._start(None)] if self._state == _NEW else []
        self._end_block(out)
        reason, sequence = _stop(self._finish, self._matched, bool(self._tools))
        delta = {
            "type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": {"input_tokens": self._input, "output_tokens": self._output},
        }  # fmt: skip
        out += (_event("message_delta", delta), _MESSAGE_STOP)
        self._state = _CLOSED
        return b"".join(out)

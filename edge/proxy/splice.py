"""Mid-stream continuation, the pure part: what a client holds of a broken OpenAI stream, the
request that continues it on another host, and that host's stream spliced into the client's.

The relay passes a stream on unparsed and keeps what the client got; only when the upstream
breaks are those bytes parsed (`broken`): the answer so far, the stream's id, what it cost.
`continuation_body` turns the client's request into one asking the next host to go on from there
(chat: the answer as a final assistant message to continue; completions: the answer appended to
the prompt), its token limit reduced by what was spent. `Splice` rewrites that host's stream as
it arrives so that the client sees one stream: one id, created, model and fingerprint, no second
role, every token billed once. `closing` ends a stream whose limit ran out exactly at the break.

SSE as read here: lines end in LF or CRLF (a lone CR is not a line end: no engine sends one); an
event ends at a blank line; `:` lines are comments; `data:` lines of one event join with LF. An
error is an `event: error` event, an `error:` field (llama.cpp before its `data: {"error"}`), or
data that is an error object (`{"error": ...}` from vLLM, SGLang and llama.cpp; vLLM's older
`{"object": "error"}`). Comments and keep-alives of the next host are dropped: `Splice` writes
whole events of its own only.

No I/O, synchronous, linear in its input: `broken` reads at most the relay's kept bytes, and
`Splice` holds at most `max_event` bytes of an incomplete event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

MAX_EVENT: Final = 1 << 20  # the largest next-host SSE event (or line) held while it completes
CHAT_OBJECT: Final = "chat.completion.chunk"
TEXT_OBJECT: Final = "text_completion"
# Token limits a continuation lowers by what was spent: OpenAI's two names, and llama.cpp's own
# (which overrides max_tokens there when both are sent).
_LIMITS: Final = ("max_tokens", "max_completion_tokens", "n_predict")
# Constrained decoding starts its grammar afresh on the next host, so the joined answer would not
# match it: such requests are not continued (vLLM's, SGLang's and llama.cpp's names).
_CONSTRAINTS: Final = (
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
    "grammar", "json_schema", "regex", "ebnf",
)  # fmt: skip
_FREE_FORMATS: Final = frozenset({"text"})
# Deltas whose meaning a text prefix cannot carry to the next host.
_UNSOUND_DELTAS: Final = ("tool_calls", "function_call", "reasoning_content", "reasoning")
_DONE: Final = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Broken:
    """What the client has of a broken stream: enough to continue it and to pass the next host's
    stream off as the same one."""

    id: str
    created: int
    model: str
    system_fingerprint: str | None
    object: str
    text: str  # the answer so far: choice 0's delta.content (chat) or text (completions), joined
    tokens: int  # completion tokens the client got (see `_Reader.tokens`)
    finish_reason: str | None  # choice 0 already finished: nothing to continue
    role_sent: bool
    usage: dict[str, Any] | None  # the last usage object seen


def broken(data: bytes, chat: bool) -> Broken | None:
    """Parse the SSE bytes the client received (un-chunked). None when the stream cannot soundly
    be continued: no chunk with an id yet; a choice index other than 0 (n > 1); tool or function
    calls; reasoning deltas; an error event or [DONE] already; bad JSON; or an event the client
    holds only part of (a field line with no blank line after it, or bytes after the last line
    end that are not whitespace). A comment line the client holds whole is no part of an event
    and does not stand in the way."""
    lines = data.split(b"\n")
    tail = lines.pop()  # what came after the last LF: part of a line
    if tail.strip():
        return None
    sse = Sse(len(data) + 1)  # the caller bounds `data`
    reader = _Reader(chat)
    for line in lines:
        event = sse.line(line)
        if event is not None and not reader.event(event[1], event[0] == b"error"):
            return None
    return None if sse.open else reader.result()


def continuation_body(doc: Mapping[str, Any], had: Broken, chat: bool) -> bytes | None:
    """The request body for the next host, from the client's parsed request `doc`.

    Chat: `had.text` as a final assistant message to continue (`continue_final_message`: True,
    `add_generation_prompt`: False, vLLM's and SGLang's names; llama.cpp continues a final
    assistant message on its own and ignores unknown fields), or appended to the client's own
    final assistant message (a prefill) when its content is a string. Completions: the prompt (a
    string) + `had.text`. max_tokens, max_completion_tokens and n_predict, where present,
    lowered by `had.tokens`; everything else (stream_options included) kept. With no text yet the
    client's body goes as it came (but for the limits): an empty prefix to continue would end
    the turn on some templates.

    None when nothing is left to generate (a lowered limit <= 0) or the request cannot be
    continued: n > 1, echo, constrained decoding (response_format other than text, a grammar,
    guided_*), messages not a list, a final assistant message whose content is not a string or
    that the client asked to be answered (add_generation_prompt: true or continue_final_message:
    false), a prompt that is not a string."""
    n = doc.get("n")
    if (n is not None and n != 1) or doc.get("echo") or _constrained(doc):
        return None
    body = dict(doc)
    for key in _LIMITS:
        limit = doc.get(key)
        if type(limit) is int and limit > 0:  # -1 (llama.cpp's "no limit") and junk stay
            if limit <= had.tokens:
                return None
            body[key] = limit - had.tokens
    if chat:
        if had.text:
            messages = _continued(doc, had.text)
            if messages is None:
                return None
            body["messages"] = messages
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
    else:
        prompt = doc.get("prompt")
        if not isinstance(prompt, str):
            return None
        body["prompt"] = prompt + had.text
    return orjson.dumps(body)


def closing(had: Broken, chat: bool, finish_reason: str, include_usage: bool) -> bytes:
    """The end of a stream whose limit was reached exactly at the break: a chunk with an empty
    delta (chat) or text (completions) and `finish_reason`; with `include_usage` a usage chunk
    (completion_tokens = had.tokens; prompt_tokens from the last usage the client saw, vLLM's and
    SGLang's continuous_usage_stats, else 0: the edge does not count tokens); then [DONE]."""
    if chat:
        choice: dict[str, Any] = {"index": 0, "delta": {}, "logprobs": None}
    else:
        choice = {"index": 0, "text": "", "logprobs": None}
    choice["finish_reason"] = finish_reason
    out = [_data(_head(had, [choice]))]
    if include_usage:
        prompt = had.usage.get("prompt_tokens") if had.usage is not None else None
        prompt = prompt if type(prompt) is int else 0
        head = _head(had, [])
        head["usage"] = {
            "prompt_tokens": prompt,
            "completion_tokens": had.tokens,
            "total_tokens": prompt + had.tokens,
        }
        out.append(_data(head))
    out.append(_DONE)
    return b"".join(out)


class Splice:
    """The next host's stream, rewritten into the client's as it comes.

    `feed` takes the host's bytes split anywhere (inside a line, inside a UTF-8 sequence: lines
    are held as bytes and decoded whole) and returns whole events for the client; `end` what is
    left when the host's body ended. Each chunk gets `had`'s id, object, created, model and
    system_fingerprint (left out where `had` has none); the role is dropped when the client has
    one already; a chunk then left with nothing to say (an empty delta or text, no finish_reason,
    no logprobs, no usage) is dropped; choice indexes are 0; usage counts `had.tokens` as
    completion, not prompt (the next host read them as prompt), its total recomputed. Chunks are
    re-serialised one line each, the host's key order kept. [DONE] passes once.

    `failed`: the host sent an error (not passed on, nor anything after it), an event that is not
    JSON, or one longer than `max_event`. `done`: its [DONE] was passed on. `finish_reason`:
    choice 0's, once the host sent it. `text`: what this host added to the answer so far."""

    __slots__ = (
        "had", "chat", "max_event", "failed", "done", "finish_reason", "_texts", "_parts",
        "_held", "_sse", "_role_sent",
    )  # fmt: skip

    def __init__(self, had: Broken, chat: bool, max_event: int = MAX_EVENT) -> None:
        self.had = had
        self.chat = chat
        self.max_event = max_event
        self.failed = False
        self.done = False
        self.finish_reason: str | None = None
        self._texts: list[str] = []
        self._parts: list[bytes] = []  # the incomplete last line, in the pieces it came in
        self._held = 0
        self._sse = Sse(max_event)
        self._role_sent = had.role_sent

    def __repr__(self) -> str:
        return (
            f"<Splice failed={self.failed} done={self.done} texts={len(self._texts)} "
            f"held={self._held}>"
        )

    @property
    def text(self) -> str:
        if len(self._texts) > 1:  # joined once per read, not once per piece
            self._texts = ["".join(self._texts)]
        return self._texts[0] if self._texts else ""

    def feed(self, data: bytes) -> bytes:
        """The client's events that the complete lines of `data` (with what came before) make."""
        if self.failed or self.done:
            return b""
        cut = data.rfind(b"\n")
        if cut < 0:
            self._hold(data)
            return b""
        # Pieces are joined once, when their line completes: no quadratic copy of a long line.
        lines = b"".join((*self._parts, data[:cut])) if self._parts else data[:cut]
        self._parts, self._held = [], 0
        out: list[bytes] = []
        self._lines(lines.split(b"\n"), out)
        self._hold(data[cut + 1 :])
        return b"".join(out)

    def end(self) -> bytes:
        """The host's body ended: its last event, even without the blank line that ends it."""
        out: list[bytes] = []
        if self._parts:
            line, self._parts, self._held = b"".join(self._parts), [], 0
            self._lines([line], out)
        self._lines([b""], out)
        return b"".join(out)

    def _hold(self, piece: bytes) -> None:
        if piece and not (self.failed or self.done):
            self._held += len(piece)
            if self._held > self.max_event:
                self.failed = True
                self._parts, self._held = [], 0
            else:
                self._parts.append(piece)

    def _lines(self, lines: list[bytes], out: list[bytes]) -> None:
        for line in lines:
            if self.failed or self.done:
                return
            try:
                event = self._sse.line(line)
            except ValueError:  # an event past the bound: not a stream to pass on
                self.failed = True
                return
            if event is not None:
                self._event(event[1], event[0] == b"error", out)

    def _event(self, payload: bytes, error: bool, out: list[bytes]) -> None:
        if error:
            self.failed = True
        elif payload == b"[DONE]":
            self.done = True
            out.append(_DONE)
        elif payload:
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                self.failed = True
                return
            if not isinstance(chunk, dict) or _is_error(chunk):
                self.failed = True
            elif self._rewrite(chunk):
                out.append(_data(chunk))

    def _rewrite(self, chunk: dict[str, Any]) -> bool:
        """Make `chunk` one of the client's stream; whether it still says anything."""
        had = self.had
        # Assigning an existing key keeps its place: the host's key order survives.
        chunk["id"] = had.id
        chunk["object"] = had.object
        chunk["created"] = had.created
        chunk["model"] = had.model
        if had.system_fingerprint is None:
            chunk.pop("system_fingerprint", None)
        else:
            chunk["system_fingerprint"] = had.system_fingerprint
        keep = False
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._bill(usage)
            keep = True
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict) and self._choice(choice):
                keep = True
        return keep

    def _choice(self, choice: dict[str, Any]) -> bool:
        if "index" in choice:
            choice["index"] = 0
        finish = choice.get("finish_reason")
        if isinstance(finish, str):
            self.finish_reason = finish
        keep = finish is not None or choice.get("logprobs") is not None
        if self.chat:
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                return keep
            if delta.get("role") is not None:
                if self._role_sent:
                    del delta["role"]
                self._role_sent = True
            text = delta.get("content")
            keep = keep or not all(_empty(value) for value in delta.values())
        else:
            text = choice.get("text")
            keep = keep or not _empty(text)
        if isinstance(text, str) and text:
            self._texts.append(text)
        return keep

    def _bill(self, usage: dict[str, Any]) -> None:
        """The next host's prompt held the carried answer: those tokens were generated, and billed
        to the client as such, once."""
        spent = self.had.tokens
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if type(completion) is int:
            completion += spent
            usage["completion_tokens"] = completion
        if type(prompt) is int:
            prompt = max(0, prompt - spent)
            usage["prompt_tokens"] = prompt
        if type(prompt) is int and type(completion) is int:
            usage["total_tokens"] = prompt + completion


class Sse:
    """SSE lines in, events out: (name, data) when a blank line ends an event that has data or
    a name; the name is b"error" for an `event: error` or an `error:` field (llama.cpp's). `open`:
    a field line came since the last blank line (an event under way). Also read by
    edge/proxy/native.py."""

    __slots__ = ("max_event", "open", "_data", "_size", "_name")

    def __init__(self, max_event: int) -> None:
        self.max_event = max_event
        self.open = False
        self._data: list[bytes] = []
        self._size = 0
        self._name = b""

    def line(self, line: bytes) -> tuple[bytes, bytes] | None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return self._dispatch()
        if line.startswith(b":"):
            return None  # a comment
        self.open = True
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data" or name == b"error":
            self._size += len(value) + 1
            if self._size > self.max_event:
                raise ValueError(f"an SSE event is longer than {self.max_event} bytes")
            self._data.append(value)
            if name == b"error":
                self._name = b"error"
        elif name == b"event" and self._name != b"error":
            self._name = value.strip()
        return None  # id:, retry: and unknown fields say nothing the readers need

    def _dispatch(self) -> tuple[bytes, bytes] | None:
        data, name = self._data, self._name
        self.open, self._data, self._size, self._name = False, [], 0, b""
        if not data and not name:
            return None
        return name, (data[0] if len(data) == 1 else b"\n".join(data)).strip()


class _Reader:
    """The chunks the client got, read into a `Broken`."""

    __slots__ = (
        "chat", "id", "created", "model", "fingerprint", "object", "texts", "base", "counted",
        "finish", "role_sent", "usage",
    )  # fmt: skip

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.id: str | None = None
        self.created = 0
        self.model = ""
        self.fingerprint: str | None = None
        self.object = CHAT_OBJECT if chat else TEXT_OBJECT
        self.texts: list[str] = []
        self.base = 0  # completion_tokens of the last usage seen
        self.counted = 0  # chunks with text since that usage
        self.finish: str | None = None
        self.role_sent = False
        self.usage: dict[str, Any] | None = None

    @property
    def tokens(self) -> int:
        """The last usage's completion_tokens (vLLM's and SGLang's continuous_usage_stats) plus
        one per chunk with text after it (engines stream about a token a chunk): right whichever
        of the hosts spliced so far reported usage per chunk."""
        return self.base + self.counted

    def event(self, payload: bytes, error: bool) -> bool:
        """Read one event; False when the stream cannot soundly be continued."""
        if error or payload == b"[DONE]":
            return False
        if not payload:
            return True
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(chunk, dict) or _is_error(chunk):
            return False
        self._meta(chunk)
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict) or not self._choice(choice):
                return False
        usage = chunk.get("usage")
        if isinstance(usage, dict):  # after the choices: it counts this chunk's tokens already
            self.usage = usage
            completion = usage.get("completion_tokens")
            if type(completion) is int:
                self.base, self.counted = completion, 0
        return True

    def _meta(self, chunk: dict[str, Any]) -> None:
        ident = chunk.get("id")
        if self.id is None and isinstance(ident, str):
            self.id = ident
            created, model, kind = chunk.get("created"), chunk.get("model"), chunk.get("object")
            self.created = created if type(created) is int else 0
            self.model = model if isinstance(model, str) else ""
            if isinstance(kind, str):
                self.object = kind
        fingerprint = chunk.get("system_fingerprint")
        if isinstance(fingerprint, str):  # vLLM sets it on the last chunks only
            self.fingerprint = fingerprint

    def _choice(self, choice: dict[str, Any]) -> bool:
        if choice.get("index", 0) != 0:
            return False  # n > 1: one answer cannot carry the others
        if self.chat:
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = {}
            if not all(_empty(delta.get(key)) for key in _UNSOUND_DELTAS):
                return False
            if delta.get("role") is not None:
                self.role_sent = True
            text = delta.get("content")
        else:
            text = choice.get("text")
        if isinstance(text, str) and text:
            self.texts.append(text)
            self.counted += 1
        finish = choice.get("finish_reason")
        if isinstance(finish, str):
            self.finish = finish
        return True

    def result(self) -> Broken | None:
        if self.id is None:
            return None
        return Broken(
            id=self.id,
            created=self.created,
            model=self.model,
            system_fingerprint=self.fingerprint,
            object=self.object,
            text="".join(self.texts),
            tokens=self.tokens,
            finish_reason=self.finish,
            role_sent=self.role_sent,
            usage=self.usage,
        )


def _continued(doc: Mapping[str, Any], text: str) -> list[Any] | None:
    """The messages with `text` as the final assistant message's end; None if they cannot be."""
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return [*messages, {"role": "assistant", "content": text}]
    content = last.get("content")
    # A final assistant message the client wants answered, not continued: a new turn, which
    # llama.cpp (it always continues one) cannot be asked for.
    answer = doc.get("add_generation_prompt") is True or doc.get("continue_final_message") is False
    if not isinstance(content, str) or answer:
        return None
    return [*messages[:-1], {**last, "content": content + text}]


def _constrained(doc: Mapping[str, Any]) -> bool:
    fmt = doc.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in _FREE_FORMATS:
        return True
    return any(doc.get(key) is not None for key in _CONSTRAINTS)


def _is_error(chunk: dict[str, Any]) -> bool:
    return bool(chunk.get("error")) or chunk.get("object") == "error"


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, dict)) and not value)


def _head(had: Broken, choices: list[Any]) -> dict[str, Any]:
    head: dict[str, Any] = {
        "id": had.id, "object": had.object, "created": had.created, "model": had.model,
    }  # fmt: skip
    if had.system_fingerprint is not None:
        head["system_fingerprint"] = had.system_fingerprint
    head["choices"] = choices
    return head


def _data(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"

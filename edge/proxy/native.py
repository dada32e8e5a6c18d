"""Mid-stream continuation of a stream in Anthropic's or Gemini's own dialect, the pure part: what
the client holds of it, read back, and the translator that goes on with it.

A host that speaks the client's dialect (llama.cpp and vLLM serve /v1/messages themselves) sends
its own stream, relayed unparsed. When it breaks, `broken_anthropic` / `broken_gemini` read what
the client got into splice's `Broken` (the answer so far, the tokens it cost) and what the
translator needs to go on from there: a `Native`. The lead then asks another host, in OpenAI's
chat API, for the rest (`Translation`'s body with `continuation_body`'s prefill), passes its
stream through `Splice(native.had, chat=True)` and then through `native.events()`: the dialect's
`Stream`, resumed in the state the client's stream stands in, so that the client reads one
stream, as the first host would have ended it.

What can be continued soundly is kept narrow: an answer of text alone. Anthropic: message_start,
then at most one content block, a text block at index 0, still open (pings and comments
anywhere). Gemini (SSE, `alt=sse`): one candidate, index 0, text parts only, not finished.
Anything else is None: tool use, thinking, any other block or delta (citations), a closed block,
message_delta or message_stop (the answer ended), functionCall or thought parts, several
candidates, a finishReason or a blocked prompt, an error event (`event: error`, an `error`
object), bad JSON, an event the client holds only part of (a field line with no blank line after
it, or bytes after the last line end), an event named apart from its type.

SSE as read here, as in splice.py: lines end in LF or CRLF; an event ends at a blank line; `:`
lines are comments; `data:` lines of one event join with LF. No I/O, synchronous, linear in its
input (the relay's kept bytes, bounded by routing.continuation_keep_bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

from edge.dialects import ANTHROPIC, GEMINI
from edge.dialects import anthropic as to_anthropic
from edge.dialects import gemini as to_gemini
from edge.proxy.splice import CHAT_OBJECT, Broken, Sse
from edge.proxy.translate import Events

# The keys a Gemini text part may hold: a thought part or any other payload is not a text.
_TEXT_PART: Final = frozenset({"text", "thought", "thoughtSignature"})
_NEW, _STARTED, _OPEN = 0, 1, 2  # an Anthropic stream read back: nothing, message_start, a block


@dataclass(frozen=True, slots=True)
class Native:
    """A native stream the client holds the start of, read back: `had` for the continuation's
    request and splice, the rest for the translator that goes on with it."""

    dialect: str  # ANTHROPIC or GEMINI
    had: Broken
    block: int  # Anthropic: the open text block's index (0), -1 before any block; Gemini: 0
    input_tokens: int  # Anthropic: message_start's usage.input_tokens; Gemini: 0

    def events(self, model: str) -> Events:
        """The dialect's translator, resumed where the client's stream stands (Gemini: SSE);
        `model` names the model where the stream did not."""
        had = self.had
        name = had.model or model
        if self.dialect == ANTHROPIC:
            return to_anthropic.Stream.resumed(name, self.block, self.input_tokens, had.tokens)
        return to_gemini.Stream.resumed(name, had.id)


def broken_anthropic(data: bytes) -> Native | None:
    """What the client got of an Anthropic Messages stream (un-chunked), read back; None when it
    cannot soundly be continued (the module's docstring says when). `had.id` is the message's
    id, `had.model` its model, `had.tokens` the text deltas the client got: the stream's only
    usage before its end is message_start's, a placeholder (1 at Anthropic, 0 at llama.cpp)."""
    events = _events(data)
    if events is None:
        return None
    reader = _Anthropic()
    for name, payload in events:
        if not reader.event(name, payload):
            return None
    return reader.result()


def broken_gemini(data: bytes) -> Native | None:
    """What the client got of a Gemini streamGenerateContent SSE stream (un-chunked), read back;
    None when it cannot soundly be continued (the module's docstring says when) or holds no
    element yet. `had.id` is the responseId ("" where none came), `had.model` the modelVersion
    ("" where none came), `had.tokens` the last usageMetadata's candidatesTokenCount plus one
    per element with text after it (as splice counts OpenAI chunks)."""
    events = _events(data)
    if events is None:
        return None
    reader = _Gemini()
    for name, payload in events:
        if not reader.event(name, payload):
            return None
    return reader.result()


def _events(data: bytes) -> list[tuple[bytes, bytes]] | None:
    """(event name, data) of each whole event that has either (splice.Sse: an `error:` field,
    llama.cpp's, names the event an error); None when the last one is not whole."""
    lines = data.split(b"\n")
    if lines.pop():  # after the last LF, part of a line: what comes next would extend it
        return None
    sse = Sse(len(data) + 1)  # the caller bounds `data`
    found: list[tuple[bytes, bytes]] = []
    for line in lines:
        event = sse.line(line)
        if event is not None:
            found.append(event)
    return None if sse.open else found


def _object(name: bytes, payload: bytes) -> dict[str, Any] | None:
    """An event's JSON object; None for an error event, [DONE], bad JSON or anything else."""
    if name == b"error" or not payload or payload == b"[DONE]":
        return None
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _broken(ident: str, model: str, texts: list[str], tokens: int) -> Broken:
    return Broken(
        id=ident, created=0, model=model, system_fingerprint=None, object=CHAT_OBJECT,
        text="".join(texts), tokens=tokens, finish_reason=None, role_sent=True, usage=None,
    )  # fmt: skip


class _Anthropic:
    """Anthropic's events the client got, read into a `Native`."""

    __slots__ = ("state", "id", "model", "input", "texts", "tokens")

    def __init__(self) -> None:
        self.state = _NEW
        self.id = ""
        self.model = ""
        self.input = 0
        self.texts: list[str] = []
        self.tokens = 0

    def event(self, name: bytes, payload: bytes) -> bool:
        """Read one event; False when the stream cannot soundly be continued."""
        if not payload and name and name != b"error":
            return True  # a named event without data is not dispatched (SSE)
        doc = _object(name, payload)
        kind = doc.get("type") if doc is not None else None
        if doc is None or not isinstance(kind, str) or (name and name != kind.encode()):
            return False
        if kind == "ping":
            return True
        if kind == "message_start":
            return self.state == _NEW and self._start(doc.get("message"))
        if kind == "content_block_start":
            return self.state == _STARTED and self._block(doc)
        if kind == "content_block_delta":
            return self.state == _OPEN and self._delta(doc)
        return False  # the block or message ended, an error, or what is not understood

    def _start(self, message: Any) -> bool:
        if not isinstance(message, dict) or message.get("content", []) != []:
            return False
        ident, model, usage = message.get("id"), message.get("model"), message.get("usage")
        if not isinstance(ident, str) or not isinstance(model, str):
            return False
        tokens = usage.get("input_tokens") if isinstance(usage, dict) else None
        self.id, self.model, self.state = ident, model, _STARTED
        self.input = tokens if type(tokens) is int and tokens >= 0 else 0
        return True

    def _block(self, doc: dict[str, Any]) -> bool:
        block, index = doc.get("content_block"), doc.get("index")
        if type(index) is not int or index != 0 or not isinstance(block, dict):
            return False
        text = block.get("text")
        if block.get("type") != "text" or not isinstance(text, str) or block.get("citations"):
            return False
        self.state = _OPEN
        self._text(text)
        return True

    def _delta(self, doc: dict[str, Any]) -> bool:
        delta, index = doc.get("delta"), doc.get("index")
        if type(index) is not int or index != 0 or not isinstance(delta, dict):
            return False
        text = delta.get("text")
        if delta.get("type") != "text_delta" or not isinstance(text, str):
            return False
        self._text(text)
        return True

    def _text(self, text: str) -> None:
        if text:
            self.texts.append(text)
            self.tokens += 1

    def result(self) -> Native | None:
        if self.state == _NEW:
            return None
        had = _broken(self.id, self.model, self.texts, self.tokens)
        return Native(ANTHROPIC, had, 0 if self.state == _OPEN else -1, self.input)


class _Gemini:
    """Gemini's stream elements the client got, read into a `Native`."""

    __slots__ = ("elements", "id", "model", "texts", "base", "counted")

    def __init__(self) -> None:
        self.elements = 0
        self.id = ""
        self.model = ""
        self.texts: list[str] = []
        self.base = 0  # candidatesTokenCount of the last usageMetadata seen
        self.counted = 0  # elements with text since that usage

    def event(self, name: bytes, payload: bytes) -> bool:
        """Read one element; False when the stream cannot soundly be continued."""
        if not payload and name and name != b"error":
            return True
        doc = _object(name, payload)
        if doc is None or "error" in doc or _blocked(doc.get("promptFeedback")):
            return False
        candidates = doc.get("candidates")
        if candidates is not None and not self._candidates(candidates):
            return False
        self.elements += 1
        ident, model = doc.get("responseId"), doc.get("modelVersion")
        self.id = ident if isinstance(ident, str) else self.id
        self.model = model if isinstance(model, str) else self.model
        usage = doc.get("usageMetadata")
        count = usage.get("candidatesTokenCount") if isinstance(usage, dict) else None
        if type(count) is int:  # after the candidates: it counts this element's text already
            self.base, self.counted = count, 0
        return True

    def _candidates(self, candidates: Any) -> bool:
        if not isinstance(candidates, list) or len(candidates) > 1:
            return False
        for candidate in candidates:
            if not isinstance(candidate, dict) or (candidate.get("index") or 0) != 0:
                return False
            if candidate.get("finishReason") is not None:
                return False  # finished: nothing to continue
            content = candidate.get("content", {})
            parts = content.get("parts", []) if isinstance(content, dict) else None
            if not isinstance(parts, list):
                return False
            texts = [_text_of(part) for part in parts]
            if any(text is None for text in texts):
                return False
            joined = "".join(text for text in texts if text)
            if joined:
                self.texts.append(joined)
                self.counted += 1
        return True

    def result(self) -> Native | None:
        if not self.elements:
            return None
        had = _broken(self.id, self.model, self.texts, self.base + self.counted)
        return Native(GEMINI, had, 0, 0)


def _text_of(part: Any) -> str | None:
    """A text part's text; None for any other part (a call, a thought, data)."""
    if not isinstance(part, dict) or part.keys() - _TEXT_PART or part.get("thought"):
        return None
    text = part.get("text")
    return text if isinstance(text, str) else None


def _blocked(feedback: Any) -> bool:
    return isinstance(feedback, dict) and feedback.get("blockReason") is not None


__all__ = ["Native", "broken_anthropic", "broken_gemini"]

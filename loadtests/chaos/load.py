"""The load of a chaos run: closed-loop users, each one aiohttp session (half of them keep the
edge's affinity cookie), sending a mix of streamed and whole answers, OpenAI and Anthropic, for
several models; and the verdict on every answer.

Every request ends in exactly one outcome, counted in the phase it started in:
- `ok`: a whole answer (valid JSON), or a stream that ended with its terminator (`[DONE]`,
  Anthropic's `message_stop`);
- a clean failure: a status with a well-formed JSON error (`status 503`), or a stream that ended
  with an error event in its dialect (`stream error event`);
- a defect: `stream cut without error event` (the stream just stopped), `malformed` (a body that
  is not what its status promises), `hung` (no end within the deadline);
- `body cut` (a whole answer whose body stopped short: what the edge does, by design, when a
  host dies after the status of a non-stream answer went out) and `connection error` (no answer
  at all).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

OK = "ok"
CUT = "stream cut without error event"
HUNG = "hung"
DEFECTS = (CUT, HUNG, "malformed")


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of request of the mix."""

    name: str
    path: str
    model: str
    stream: bool
    weight: int

    @property
    def anthropic(self) -> bool:
        return self.path == "/v1/messages"


MIX = (
    Kind("chat-a stream", "/v1/chat/completions", "chat-a", True, 4),
    Kind("chat-b", "/v1/chat/completions", "chat-b", False, 3),
    Kind("messages stream", "/v1/messages", "chat-a", True, 2),
    Kind("chat-a", "/v1/chat/completions", "chat-a", False, 2),
    Kind("solo stream", "/v1/chat/completions", "solo", True, 1),
)


@dataclass
class Tally:
    """Counts and latencies of one phase."""

    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    head_s: list[float] = field(default_factory=list)  # time to the response head, answers ok

    @property
    def ok(self) -> int:
        return self.outcomes[OK]

    @property
    def failed(self) -> int:
        return sum(n for outcome, n in self.outcomes.items() if outcome != OK)


class Load:
    """Users sending requests until `stop()`; `phase` names where new requests are counted."""

    def __init__(self, base: str, key: str, users: int, deadline_s: float, seed: int) -> None:
        self.base, self.key, self.deadline_s = base, key, deadline_s
        self.rng = random.Random(seed)
        self.users = users
        self.phase = "warm-up"
        self.tallies: dict[str, Tally] = {}
        self.errors: list[str] = []  # exceptions no verdict knew: each loses a request
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._stopping.clear()
        self._tasks = [asyncio.create_task(self._user(i)) for i in range(self.users)]

    async def stop(self) -> None:
        """No new request; those in flight end (each within its deadline)."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)

    def tally(self, phase: str) -> Tally:
        return self.tallies.setdefault(phase, Tally())

    async def _user(self, index: int) -> None:
        keeps_cookie = index % 2 == 0
        jar: aiohttp.abc.AbstractCookieJar = (
            aiohttp.CookieJar(unsafe=True) if keeps_cookie else aiohttp.DummyCookieJar()
        )
        rng = random.Random(self.rng.random())
        connector = aiohttp.TCPConnector(limit=1)
        headers = {"Authorization": f"Bearer {self.key}"}
        async with aiohttp.ClientSession(
            connector=connector, cookie_jar=jar, headers=headers
        ) as session:
            turn = 0
            while not self._stopping.is_set():
                kind = rng.choices(MIX, weights=[k.weight for k in MIX])[0]
                turn += 1
                await self._one(session, kind, body(kind, index, turn))
                await asyncio.sleep(rng.uniform(0.01, 0.06))  # a client's think time

    async def _one(self, session: aiohttp.ClientSession, kind: Kind, doc: dict[str, Any]) -> None:
        tally = self.tally(self.phase)
        tally.sent += 1
        started = time.monotonic()
        head_s = -1.0
        try:
            async with asyncio.timeout(self.deadline_s):
                async with session.post(self.base + kind.path, json=doc) as resp:
                    head_s = time.monotonic() - started
                    data = await resp.read()
                    outcome = verdict(kind, resp.status, resp.content_type, data)
        except TimeoutError:
            outcome = HUNG
        except aiohttp.ClientPayloadError:
            outcome = CUT if kind.stream else "body cut"
        except aiohttp.ClientConnectionError:  # no answer, or one that stopped short
            outcome = "connection error" if head_s < 0 else CUT if kind.stream else "body cut"
        except BaseException as exc:
            self.errors.append(f"{kind.name}: {type(exc).__name__}: {exc}")
            raise
        tally.outcomes[outcome] += 1
        if outcome == OK:
            tally.head_s.append(head_s)


def body(kind: Kind, user: int, turn: int) -> dict[str, Any]:
    """A conversation per user: the same system prompt (so affinity has a prefix to follow)."""
    messages = [{"role": "user", "content": f"user {user} asks question {turn}"}]
    doc: dict[str, Any] = {"model": kind.model, "stream": kind.stream, "max_tokens": 64}
    if kind.anthropic:
        doc["system"] = f"You are the assistant of user {user} in the chaos run."
    else:
        system = {"role": "system", "content": f"You are the assistant of user {user}."}
        messages.insert(0, system)
    doc["messages"] = messages
    return doc


def verdict(kind: Kind, status: int, content_type: str, data: bytes) -> str:
    """The outcome of an answer that arrived whole (see the module docstring)."""
    if status != 200:
        return f"status {status}" if _error_doc(data) else "malformed"
    if not kind.stream:
        return OK if _answer_doc(data) else "malformed"
    if content_type != "text/event-stream":
        return "malformed"
    return stream_verdict(data, kind.anthropic)


def stream_verdict(data: bytes, anthropic: bool) -> str:
    events = data.split(b"\n\n")
    if events[-1] != b"" or len(events) < 2:
        return CUT  # the body ended in the middle of an event
    last = events[-2]
    if last == b"data: [DONE]" or (anthropic and last.startswith(b"event: message_stop\n")):
        return OK
    if last.startswith(b"event: error\n") or _is_error_data(last):
        return "stream error event"
    return CUT


def _is_error_data(event: bytes) -> bool:
    if not event.startswith(b"data: "):
        return False
    return _error_doc(event[6:])


def _error_doc(data: bytes) -> bool:
    """An error body in one of the dialects' shapes: OpenAI's and Gemini's `{"error": {...}}`,
    Anthropic's `{"type": "error", "error": {...}}`."""
    doc = _json(data)
    return isinstance(doc, dict) and isinstance(doc.get("error"), dict)


def _answer_doc(data: bytes) -> bool:
    doc = _json(data)
    return isinstance(doc, dict) and ("choices" in doc or doc.get("type") == "message")


def _json(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None

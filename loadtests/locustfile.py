"""Locust load test for the edge (or any OpenAI-compatible endpoint).

    locust -f loadtests/locustfile.py --headless -u 200 -r 50 -t 60s --host http://127.0.0.1:8080

The defaults fit `make demo` (models demo-chat and demo-embed). Pick user classes by naming them
after the options (e.g. `... StreamingChatUser ConversationUser`). Environment:

    EDGE_CHAT_MODELS   chat models, comma-separated (default demo-chat); the first is the one
                       conversations use, the mix uses them all
    EDGE_EMBED_MODELS  embedding models, comma-separated (default demo-embed)
    EDGE_API_KEY       sent as `Authorization: Bearer ...` when set (never printed)
    EDGE_TURNS         turns per conversation (default 4)
    EDGE_STICKY        1 (default): a conversation whose server changes between turns fails
                       (its CONV row); 0: do not check (e.g. a proxy without affinity). The
                       edge moves a conversation off a server on purpose when that server has
                       more than routing.load_factor x the mean load, so under heavy load CONV
                       failures count how often that happened. Needs X-Edge-Server in
                       answers (server.expose_server = true, the default).
    EDGE_MAX_TOKENS    max_tokens asked for per completion (default 32)

Besides the HTTP rows, two custom rows: `TTFT` (time to the first streamed token, per stream)
and `CONV` (a whole conversation, failed when it lost its server).
"""

from __future__ import annotations

import os
import random
import time
import uuid
from typing import Any

from locust import HttpUser, between, task
from locust.env import Environment


def _env_list(name: str, default: str) -> list[str]:
    return [m.strip() for m in os.environ.get(name, default).split(",") if m.strip()]


CHAT_MODELS = _env_list("EDGE_CHAT_MODELS", "demo-chat")
EMBED_MODELS = _env_list("EDGE_EMBED_MODELS", "demo-embed")
TURNS = int(os.environ.get("EDGE_TURNS", "4"))
STICKY = os.environ.get("EDGE_STICKY", "1") != "0"
MAX_TOKENS = int(os.environ.get("EDGE_MAX_TOKENS", "32"))
TIMEOUT = (5.0, 120.0)  # connect, read: generations are long, refusals are not

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
# Response headers naming the server that answered: the edge's, or a mock's when run direct.
SERVER_HEADERS = ("X-Edge-Server", "X-Mock-Server")

PROMPTS = (
    "Summarise the plot of Hamlet in two sentences.",
    "Write a haiku about load balancers.",
    "What is the capital of Australia, and why not Sydney?",
    "Explain KV-cache reuse to a new engineer.",
    "List three prime numbers above one hundred.",
)


def _headers() -> dict[str, str]:
    key = os.environ.get("EDGE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _chat_body(model: str, messages: list[dict[str, str]], stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS}
    if stream:
        body["stream"] = True
    return body


def _ask() -> list[dict[str, str]]:
    return [{"role": "user", "content": random.choice(PROMPTS)}]


def _served_by(headers: Any) -> str | None:
    for name in SERVER_HEADERS:
        if value := headers.get(name):
            return str(value)
    return None


def _status_error(resp: Any) -> str:
    if resp.status_code == 0:  # no HTTP answer: refused, reset or timed out
        return f"no response: {getattr(resp, 'error', None)!r}"[:300]
    return f"status {resp.status_code}: {resp.text[:200]}"


def _fire(env: Environment, kind: str, name: str, started: float, error: str | None) -> None:
    """A custom row in locust's stats (TTFT, CONV): response_time in ms, failure when error."""
    env.events.request.fire(
        request_type=kind,
        name=name,
        response_time=(time.perf_counter() - started) * 1000.0,
        response_length=0,
        exception=RuntimeError(error) if error else None,
        context={},
    )


class _EdgeUser(HttpUser):
    abstract = True
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        self.client.headers.update(_headers())

    def chat(self, model: str, name: str, messages: list[dict[str, str]]) -> str | None:
        """One non-streaming completion; the reply text, or None after recording a failure."""
        with self.client.post(
            CHAT, json=_chat_body(model, messages, False), name=name, timeout=TIMEOUT,
            catch_response=True,
        ) as resp:  # fmt: skip
            if resp.status_code != 200:
                resp.failure(_status_error(resp))
                return None
            try:
                reply = str(resp.json()["choices"][0]["message"]["content"])
            except (ValueError, KeyError, IndexError, TypeError):
                resp.failure(f"not a chat completion: {resp.text[:200]}")
                return None
            if not reply:
                resp.failure("empty reply")
                return None
            resp.success()
            return reply

    def stream_chat(self, model: str, name: str) -> None:
        """One streamed completion: TTFT as its own row, every event read, [DONE] required."""
        started = time.perf_counter()
        with self.client.post(
            CHAT, json=_chat_body(model, _ask(), True), name=name, timeout=TIMEOUT, stream=True,
            catch_response=True,
        ) as resp:  # fmt: skip
            if resp.status_code != 200:
                resp.failure(_status_error(resp))
                return
            error = self._read_stream(resp, name, started)
            if error:
                resp.failure(error)
            else:
                resp.success()

    def _read_stream(self, resp: Any, name: str, started: float) -> str | None:
        events, done, first = 0, False, True
        for line in resp.iter_lines():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if first:
                _fire(self.environment, "TTFT", name, started, None)
                first = False
            if data == b"[DONE]":
                done = True
                break
            if data.startswith(b'{"error"'):  # the edge's mid-stream failure event
                return f"error event in stream: {data[:200]!r}"
            events += 1
        if not done:
            return f"stream ended without [DONE] after {events} events"
        return None if events else "stream had no event before [DONE]"

    def embed(self, model: str, name: str) -> None:
        inputs = random.sample(PROMPTS, k=random.randint(1, 3))
        body = {"model": model, "input": inputs}
        with self.client.post(
            EMBEDDINGS, json=body, name=name, timeout=TIMEOUT, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(_status_error(resp))
                return
            try:
                data = resp.json()["data"]
                ok = len(data) == len(inputs) and all(d["embedding"] for d in data)
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok:
                resp.success()
            else:
                resp.failure(f"expected {len(inputs)} embeddings: {resp.text[:200]}")


class StreamingChatUser(_EdgeUser):
    """Streamed chat completions; time to first token is reported as the `TTFT` row."""

    weight = 4

    @task
    def stream(self) -> None:
        self.stream_chat(random.choice(CHAT_MODELS), f"{CHAT} [stream]")


class ChatUser(_EdgeUser):
    """Non-streaming chat completions."""

    weight = 2

    @task
    def complete(self) -> None:
        self.chat(random.choice(CHAT_MODELS), CHAT, _ask())


class ConversationUser(_EdgeUser):
    """Multi-turn conversations that must stay on the server that holds their KV cache.

    Each conversation starts with an empty cookie jar and keeps the cookies the edge sets, as a
    browser or an SDK with a session would; the server is read from X-Edge-Server (X-Mock-Server
    when run straight against a mock).
    """

    weight = 2

    @task
    def converse(self) -> None:
        self.client.cookies.clear()
        started = time.perf_counter()
        messages = [{"role": "system", "content": f"Conversation {uuid.uuid4().hex[:12]}."}]
        model, name = CHAT_MODELS[0], f"{CHAT} [conversation]"
        servers: list[str | None] = []
        for turn in range(TURNS):
            messages.append({"role": "user", "content": f"Turn {turn}: {random.choice(PROMPTS)}"})
            error, reply = self._turn(model, name, messages, servers)
            if error:
                _fire(self.environment, "CONV", "conversation", started, error)
                return
            messages.append({"role": "assistant", "content": str(reply)})
        _fire(self.environment, "CONV", "conversation", started, None)

    def _turn(
        self, model: str, name: str, messages: list[dict[str, str]], servers: list[str | None]
    ) -> tuple[str | None, str | None]:
        with self.client.post(
            CHAT, json=_chat_body(model, messages, False), name=name, timeout=TIMEOUT,
            catch_response=True,
        ) as resp:  # fmt: skip
            if resp.status_code != 200:
                resp.failure(_status_error(resp))
                return f"turn {len(servers)} failed", None
            servers.append(_served_by(resp.headers))
            if STICKY and (servers[-1] is None or servers[-1] != servers[0]):
                # The request itself succeeded; the conversation (its CONV row) did not.
                resp.success()
                return f"conversation moved: servers by turn {servers}", None
            try:
                reply = str(resp.json()["choices"][0]["message"]["content"])
            except (ValueError, KeyError, IndexError, TypeError):
                resp.failure(f"not a chat completion: {resp.text[:200]}")
                return "bad reply", None
            resp.success()
            return None, reply


class EmbeddingsUser(_EdgeUser):
    """Embedding batches of one to three inputs."""

    weight = 1

    @task
    def embeddings(self) -> None:
        self.embed(random.choice(EMBED_MODELS), EMBEDDINGS)


class MixedModelUser(_EdgeUser):
    """Every model, chat (streamed or not) and embeddings, one row per model."""

    weight = 1

    @task(3)
    def chat_any(self) -> None:
        model = random.choice(CHAT_MODELS)
        if random.random() < 0.5:
            self.stream_chat(model, f"{CHAT} [mix {model} stream]")
        else:
            self.chat(model, f"{CHAT} [mix {model}]", _ask())

    @task(1)
    def embed_any(self) -> None:
        model = random.choice(EMBED_MODELS)
        self.embed(model, f"{EMBEDDINGS} [mix {model}]")

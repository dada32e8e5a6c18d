"""The check at the door: which key a request carries, what it may do, and its rate limits.

Modes (config `auth.mode`):
- passthrough (default): nothing here runs; the client's key reaches the hosts unchanged (the
  server holds no Gate, so this mode costs nothing per request).
- keys: the key is looked up in the store (401), its workspace and models are checked (403), its
  limits are taken (429), and the client's key is replaced upstream by the server's configured
  key or none.
- none: no check; the client's key is removed upstream, the server's configured key is sent.

Keys are read from `Authorization: Bearer`, `x-api-key`, `x-goog-api-key` or `?key=`, first
found wins. A key never appears in a log line, a metric or an error message; its id may.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from edge.access.keys import FileKeys, KeyRecord, KeyWatcher, Limits, RedisKeys, digest, key_id
from edge.access.metering import UsageMeter
from edge.access.ratelimit import Grant, LocalLimiter, RedisLimiter
from edge.access.redisconn import RedisLink
from edge.config import AuthSettings, ConfigError
from edge.dialects.paths import ANTHROPIC, GEMINI
from edge.errors import Forbidden, TooManyRequests, Unauthorized, Unavailable
from edge.http.server import Reply, Request
from edge.observe.record import Usage
from edge.proxy.route import ProxyRequest
from edge.routing.fleet import Host, normalise_url

log = logging.getLogger("edge.auth")

_ABSENT = (
    "No API key: send it as 'Authorization: Bearer <key>', 'x-api-key: <key>' or "
    "'x-goog-api-key: <key>'."
)
_INVALID = "Invalid API key. Check it with GET /libertai/auth/check."
CLIENT_KEY_HEADERS = ("authorization", "x-api-key", "x-goog-api-key")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as: one key of the store."""

    key_id: str
    name: str
    workspace: str  # "" = not scoped: /v1/... only; /api/{id}/v1/... needs the key's workspace
    models: frozenset[str]  # empty = every model
    limits: Limits
    # Admission (edge/proxy/queueing.py): default priority, its cap (-1: the config's), weight.
    priority: int = -1
    max_priority: int = -1
    weight: float = 0.0


def client_key(request: Request) -> str | None:
    headers = request.headers
    value = headers.get("Authorization")
    if value is not None:
        scheme, _, credential = value.partition(" ")
        return credential.strip() if scheme.lower() == "bearer" else None
    value = headers.get("x-api-key") or headers.get("x-goog-api-key")
    if value is not None:
        return value.strip()
    if "key=" in request.query_string:
        return request.query.get("key")
    return None


class Keyring:
    """key id -> (SHA-256 digest, Principal), rebuilt only when the store's snapshot moved."""

    def __init__(self, watcher: KeyWatcher) -> None:
        self.watcher = watcher
        self._version = -1
        self._index: dict[str, tuple[bytes, Principal]] = {}

    def find(self, key: str) -> Principal | None:
        if self.watcher.version != self._version:
            self._rebuild()
        kid = key_id(key)
        entry = self._index.get(kid) if kid is not None else None
        if entry is None:
            return None
        # The id is public; the digest comparison is the secret one and takes constant time.
        return entry[1] if hmac.compare_digest(digest(key), entry[0]) else None

    def _rebuild(self) -> None:
        self._version = self.watcher.version
        self._index = {
            r.id: (bytes.fromhex(r.hash), _principal(r))
            for r in self.watcher.records.values()
            if r.revoked is None
        }

    @property
    def loaded(self) -> bool:
        return self.watcher.version > 0

    def __repr__(self) -> str:
        if self.watcher.version != self._version:
            self._rebuild()
        return f"<Keyring active={len(self._index)} version={self._version}>"


def _principal(r: KeyRecord) -> Principal:
    return Principal(
        r.id, r.name, r.workspace, frozenset(r.models), r.limits, r.priority, r.max_priority,
        r.weight,
    )  # fmt: skip


_HEADER_FOR = {ANTHROPIC: "x-api-key", GEMINI: "x-goog-api-key"}


class UpstreamKeys:
    """The key each server gets in keys/none mode, from config (`env:NAME` reads a variable)."""

    def __init__(self, mapping: Mapping[str, str]) -> None:
        self._keys = {normalise_url(url): _resolve(value) for url, value in mapping.items()}
        self._warned: set[str] = set()

    def headers(self, preq: ProxyRequest, hosts: Sequence[Host]) -> list[tuple[str, str]]:
        """Headers common to every attempt: none; each attempt adds its server's key
        (`for_host`, called by the forwarder), so servers of one model may hold different keys."""
        return []

    def for_host(self, dialect: str, host: Host) -> list[tuple[str, str]]:
        """The key field `host` gets for a request in `dialect` (the dialect the request is SENT
        in: OpenAI's for one the edge translated)."""
        key = self._keys.get(host.url)
        if key is None:
            return []
        name = _HEADER_FOR.get(dialect)
        return [(name, key)] if name else [("Authorization", f"Bearer {key}")]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __repr__(self) -> str:
        return f"<UpstreamKeys servers={len(self._keys)}>"


def _resolve(value: str) -> str:
    if not value.startswith("env:"):
        return value
    found = os.environ.get(value[4:])
    if not found:
        raise ConfigError(f"auth.upstream_keys: environment variable {value[4:]} is not set")
    return found


class Admission:
    """What the door decided for one request; handed back to `Gate.release`."""

    __slots__ = ("principal", "grant", "upstream", "headers")

    def __init__(
        self, principal: Principal | None, grant: Grant | None, upstream: list[tuple[str, str]]
    ) -> None:
        self.principal = principal
        self.grant = grant
        self.upstream = upstream  # headers replacing the client's key upstream
        self.headers = grant.headers if grant is not None else {}

    def __repr__(self) -> str:
        kid = self.principal.key_id if self.principal else "-"
        return f"<Admission key={kid} {self.grant!r}>"


class Gate:
    """The door for one worker: keys, limits, upstream credentials, usage."""

    def __init__(
        self,
        settings: AuthSettings,
        keyring: Keyring | None,
        limiter: LocalLimiter | RedisLimiter,
        meter: UsageMeter,
        link: RedisLink | None = None,
    ) -> None:
        self.settings = settings
        self.mode = settings.mode
        self.keyring = keyring
        self.limiter = limiter
        self.meter = meter
        self.link = link
        self.upstream = UpstreamKeys(settings.upstream_keys)
        self._refresher: asyncio.Task[None] | None = None

    # --- per request ---------------------------------------------------------------------

    def identify(self, request: Request) -> Principal | None:
        """The request's principal in keys mode (401 otherwise); None in none mode."""
        if self.keyring is None:
            return None
        key = client_key(request)
        if not key:
            self.meter.denied("missing_key")
            raise Unauthorized(_ABSENT, code="missing_api_key")
        principal = self.keyring.find(key)
        if principal is None:
            if not self.keyring.loaded:
                raise Unavailable("The key store is not available yet; retry shortly.")
            self.meter.denied("invalid_key")
            raise Unauthorized(_INVALID, code="invalid_api_key")
        return principal

    async def admit(
        self, principal: Principal | None, preq: ProxyRequest, hosts: Sequence[Host]
    ) -> Admission:
        """Workspace and model grants (403), then the key's limits (429)."""
        if "key=" in preq.target:
            preq.target = strip_key_param(preq.target)
        upstream = self.upstream.headers(preq, hosts)
        if principal is None:
            return Admission(None, None, upstream)
        self._permit(principal, preq)
        need = requested_tokens(preq.doc, self.settings.token_estimate)
        try:
            grant = await self.limiter.admit(principal.key_id, principal.limits, need)
        except TooManyRequests:
            self.meter.denied("rate_limit")
            self.meter.record(principal.key_id, principal.workspace, preq.model, 429, None)
            raise
        return Admission(principal, grant, upstream)

    def _permit(self, p: Principal, preq: ProxyRequest) -> None:
        if preq.workspace and preq.workspace != p.workspace:
            self.meter.denied("workspace")
            raise Forbidden(
                f"API key {p.key_id} does not belong to workspace {preq.workspace}.",
                code="workspace_mismatch",
            )
        if p.models and preq.model not in p.models:
            self.meter.denied("model")
            raise Forbidden(
                f"API key {p.key_id} may not use the model '{preq.model[:200]}'.",
                param="model",
                code="model_not_allowed",
            )

    def release(self, adm: Admission, model: str, status: int, usage: Usage | None) -> None:
        """Settle tokens, free the concurrency slot and count usage; never awaits."""
        p, grant = adm.principal, adm.grant
        if p is None or grant is None:
            return
        used: int | None = None
        if usage is not None:
            used = usage.prompt_tokens + usage.completion_tokens
        elif status >= 400 and status != 499:
            used = 0  # an error answer generated nothing; a client gone mid-answer keeps it
        self.limiter.release(grant, used)
        self.meter.record(p.key_id, p.workspace, model, status, usage)

    # --- GET /libertai/auth/check ---------------------------------------------------------

    async def check(self, request: Request) -> Reply:
        """200 for a valid key, 401 otherwise; no limit is taken and nothing is spent."""
        p = self.identify(request)
        doc: dict[str, Any] = {"status": "ok", "mode": self.mode}
        if p is not None:
            doc.update(key_id=p.key_id, name=p.name, workspace=p.workspace or None)
        return Reply(orjson.dumps(doc))

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if self.keyring is None:
            return
        watcher = self.keyring.watcher
        await watcher.refresh()
        self._refresher = asyncio.create_task(self._refresh_loop(watcher), name="key-store")

    async def _refresh_loop(self, watcher: KeyWatcher) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_s)
            await watcher.refresh()

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if isinstance(self.limiter, RedisLimiter):
            await self.limiter.close()
        if self.link is not None:
            await self.link.close()

    def __repr__(self) -> str:
        return f"<Gate {self.mode} {self.keyring!r} {self.limiter!r}>"


async def passthrough_check(request: Request) -> Reply:
    """/libertai/auth/check when the hosts check keys: the edge can only say one was sent."""
    if not client_key(request):
        raise Unauthorized(_ABSENT, code="missing_api_key")
    body = b'{"status":"ok","mode":"passthrough","checked":false}'
    return Reply(body)


def strip_key_param(target: str) -> str:
    """The target without `key=` query parameters (Gemini's query-string key), raw otherwise."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    kept = [p for p in query.split("&") if p and not p.startswith("key=")]
    return f"{path}?{'&'.join(kept)}" if kept else path


def requested_tokens(doc: Mapping[str, Any], estimate: int) -> int:
    """Tokens to reserve against tpm: the request's own completion limit, else the estimate."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = doc.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    config = doc.get("generationConfig")
    if isinstance(config, dict):
        value = config.get("maxOutputTokens")
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return estimate


def build_gate(settings: AuthSettings, registry: CollectorRegistry) -> Gate | None:
    """The Gate for `settings`, or None in passthrough mode (the server then does nothing)."""
    if settings.mode == "passthrough":
        return None
    link = RedisLink(settings.redis_url, settings.redis_timeout_s) if settings.redis_url else None
    keyring: Keyring | None = None
    if settings.mode == "keys":
        watcher: KeyWatcher
        if settings.key_store:
            watcher = FileKeys(settings.key_store)
        else:
            assert link is not None  # validated: keys mode has a key store or a Redis URL
            watcher = RedisKeys(link)
        keyring = Keyring(watcher)
    limiter: LocalLimiter | RedisLimiter = LocalLimiter()
    if link is not None:
        fallback = LocalLimiter() if settings.failure_policy == "fail_open" else None
        limiter = RedisLimiter(link, settings.lease_s, fallback)
    state = limiter.counters if isinstance(limiter, RedisLimiter) else None
    meter = UsageMeter(settings.prices, state)
    registry.register(meter)
    return Gate(settings, keyring, limiter, meter, link)

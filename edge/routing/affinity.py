"""Affinity: which server already holds a conversation's KV cache, decided without shared state.

Two mechanisms, both stateless across workers and replicas:
- A signed cookie naming the servers that served this client (most recent first, one per model
  it talked to, at most `MAX_IDS`), with an expiry and an HMAC-SHA256 made with a secret every
  replica shares. A forged, stale or garbled cookie decodes to nothing: it is ignored, never an
  error.
- For clients without cookies (most SDKs), a key: the session header, else the body's `user`,
  else a hash of the conversation's prefix (system prompt and first user message, bounded), which
  stays the same as the history grows. Keys map to servers by rendezvous (highest random weight)
  hashing, so a server joining or leaving moves only its own share of keys, and every process
  that sees the same host list ranks alike.

Everything here is synchronous and does no I/O; `balance.py` adds the bounded-load rule on top
and calls `CookieIssuer` for the host that answered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

MAX_IDS = 4  # servers remembered per cookie: one per model a client alternates between
_ID_BYTES = 8
_MAC_BYTES = 16
_VERSION = 1
_HEAD = struct.Struct(">BI")  # version, expiry (Unix seconds)
_MASK = (1 << 64) - 1


class _HasUrl(Protocol):
    @property
    def url(self) -> str: ...


H = TypeVar("H", bound=_HasUrl)


def host_id(url: str) -> bytes:
    """A stable, short identity of a server URL: the cookie names it instead of the URL."""
    return hashlib.blake2b(url.encode(), digest_size=_ID_BYTES, person=b"edge-host").digest()


class HostIds:
    """host_id() memoised per URL (bounded: cleared when the fleet has churned far past it)."""

    __slots__ = ("_ids", "limit")

    def __init__(self, limit: int = 10_000) -> None:
        self._ids: dict[str, tuple[bytes, int]] = {}
        self.limit = limit

    def get(self, url: str) -> tuple[bytes, int]:
        found = self._ids.get(url)
        if found is None:
            if len(self._ids) >= self.limit:
                self._ids.clear()
            raw = host_id(url)
            found = self._ids[url] = (raw, int.from_bytes(raw, "big"))
        return found

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"<HostIds urls={len(self._ids)}>"


class CookieCodec:
    """Signs and verifies affinity cookie values: base64url(version, expiry, ids..., mac)."""

    __slots__ = ("_key", "max_age_s")

    def __init__(self, secret: str, max_age_s: int) -> None:
        # Derived, so that the configured secret is never used as-is for anything else.
        self._key = hashlib.sha256(b"edge-affinity-cookie\0" + secret.encode()).digest()
        self.max_age_s = max_age_s

    def encode(self, ids: Sequence[bytes], now: float) -> str:
        payload = _HEAD.pack(_VERSION, int(now) + self.max_age_s) + b"".join(ids[:MAX_IDS])
        raw = payload + self._mac(payload)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def decode(self, value: str, now: float) -> tuple[bytes, ...]:
        """The server ids of a genuine, unexpired cookie; () for anything else."""
        if not 0 < len(value) <= 128:
            return ()
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            return ()
        body = len(raw) - _HEAD.size - _MAC_BYTES
        if body <= 0 or body % _ID_BYTES or body // _ID_BYTES > MAX_IDS:
            return ()
        payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(payload)):
            return ()
        version, expires = _HEAD.unpack_from(payload)
        if version != _VERSION or expires <= now:
            return ()
        ids = payload[_HEAD.size :]
        return tuple(ids[i : i + _ID_BYTES] for i in range(0, len(ids), _ID_BYTES))

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def __repr__(self) -> str:
        return f"<CookieCodec max_age={self.max_age_s}s>"


def cookie_value(header: str | None, name: str) -> str | None:
    """The value of cookie `name` in a Cookie request header (the first one, as browsers order
    the most specific path first)."""
    if not header or name not in header:
        return None
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return None


def set_cookie(name: str, value: str, max_age_s: int, secure: bool) -> str:
    tail = "; Secure" if secure else ""
    return f"{name}={value}; Max-Age={max_age_s}; Path=/; HttpOnly; SameSite=Lax{tail}"


class CookieIssuer:
    """The Set-Cookie value for the host that answered: its id first, then the other ids the
    client's cookie held (its servers of other models), signed with the codec.

    Signing costs an HMAC per response, and within one second (the expiry's resolution) the
    value for the same ids is the same: so values are cached for the current second only."""

    __slots__ = ("codec", "name", "_ids", "_wall", "_cache", "_second")

    def __init__(
        self, codec: CookieCodec, name: str, ids: HostIds, wall: Callable[[], float]
    ) -> None:
        self.codec = codec
        self.name = name
        self._ids = ids
        self._wall = wall
        self._cache: dict[tuple[tuple[bytes, ...], bool], str] = {}
        self._second = -1

    def issue(self, url: str, held: tuple[bytes, ...], secure: bool) -> str:
        hid = self._ids.get(url)[0]
        ids = (hid, *(i for i in held if i != hid)) if held else (hid,)
        second = int(self._wall())
        if second != self._second:
            self._cache.clear()
            self._second = second
        key = (ids, secure)
        cookie = self._cache.get(key)
        if cookie is None:
            value = self.codec.encode(ids, second)
            cookie = self._cache[key] = set_cookie(self.name, value, self.codec.max_age_s, secure)
        return cookie

    def __repr__(self) -> str:
        return f"<CookieIssuer {self.name} cached={len(self._cache)}>"


# --- keys for cookie-less clients -------------------------------------------------------------


def affinity_key(doc: Mapping[str, Any], session: str | None, limit: int) -> tuple[str, int] | None:
    """(kind, 64-bit key) for a request: session header, else body `user`, else the prefix."""
    if session and len(session) <= 512:
        return "session", _key(b"s\0" + session.encode())
    user = _user(doc)
    if user:
        return "user", _key(b"u\0" + user.encode()[:limit])
    prefix = prefix_material(doc, limit)
    if prefix:
        return "prefix", _key(b"p\0" + prefix)
    return None


def _user(doc: Mapping[str, Any]) -> str | None:
    user = doc.get("user")  # OpenAI
    if isinstance(user, str):
        return user
    metadata = doc.get("metadata")  # Anthropic
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        return str(metadata["user_id"])
    return None


def _key(material: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big")


def prefix_material(doc: Mapping[str, Any], limit: int) -> bytes | None:
    """System prompt and first user message, each clipped to `limit` bytes; None when the
    request has no user turn (nothing a cache could hold for the next turn)."""
    messages = doc.get("messages")  # OpenAI chat, Anthropic messages
    if isinstance(messages, list):
        return _chat_prefix(doc.get("system"), messages, limit)
    contents = doc.get("contents")  # Gemini
    if isinstance(contents, list):
        system = doc.get("systemInstruction", doc.get("system_instruction"))
        return _gemini_prefix(system, contents, limit)
    prompt = doc.get("prompt")  # OpenAI completions
    if prompt:
        return b"prompt\0" + _clip(prompt, limit)
    return None


def _chat_prefix(system: Any, messages: list[Any], limit: int) -> bytes | None:
    leading: list[Any] = [] if system is None else [system]
    for message in messages:
        if not isinstance(message, dict):
            return None
        role = message.get("role")
        if role == "user":
            return _clip(leading, limit) + b"\0user\0" + _clip(message.get("content"), limit)
        leading.append(message.get("content"))  # system/developer (or a prefilled assistant)
    return None


def _gemini_prefix(system: Any, contents: list[Any], limit: int) -> bytes | None:
    for content in contents:
        if isinstance(content, dict) and content.get("role", "user") == "user":
            return _clip(system, limit) + b"\0user\0" + _clip(content.get("parts"), limit)
    return None


def _clip(value: Any, limit: int) -> bytes:
    """The strings inside `value` (depth first, in document order), joined, cut at `limit`
    bytes; never serialises more than it keeps, so a 10 MB image part costs nothing."""
    if isinstance(value, str):  # the usual message content
        return value[:limit].encode()[:limit]
    if not value:  # no system prompt: an empty list
        return b""
    out: list[bytes] = []
    budget = limit
    stack = [value]
    while stack and budget > 0:
        item = stack.pop()
        if isinstance(item, str):
            piece = item[:budget].encode()[:budget]
            out.append(piece)
            budget -= len(piece) + 1
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))
        elif item is not None:
            piece = str(item).encode()[:budget]
            out.append(piece)
            budget -= len(piece) + 1
    return b"\x1f".join(out)


# --- rendezvous hashing -----------------------------------------------------------------------


def weight(key: int, host: int) -> int:
    """The rendezvous weight of (key, host): SplitMix64's finaliser over their XOR."""
    z = (key ^ host) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def ranked(key: int, hosts: Iterable[H], ids: HostIds) -> list[H]:
    """Hosts in rendezvous order for `key`: the first is its home, the rest its fallbacks."""
    return sorted(hosts, key=lambda h: weight(key, ids.get(h.url)[1]), reverse=True)

"""Affinity: which server already holds a conversation's KV cache, decided without shared state.

Two mechanisms, both stateless across workers and replicas:
- For every client, a key: the session header, else the body's `user`, else a hash of the
  conversation's prefix (system prompt and first user message, bounded), which stays the same as
  the history grows. Keys map to servers by rendezvous (highest random weight) hashing, so a
  server joining or leaving moves only its own share of keys, and every process that sees the
  same host list ranks alike.
- For clients that keep cookies, a signed cookie scoped to conversations: entries of (server id,
  conversation tag), the most recent conversation first, at most `MAX_IDS`, with an expiry and a
  keyed BLAKE2b MAC made with a secret every replica shares. The tag is a short hash of the
  conversation's key (the session header, else the prefix: never `user`, as one user has many
  conversations), so an entry applies only to the conversation it was set for: a client's next
  conversation is placed by key and policy, not sent to its first one's server, and a
  conversation that failed over keeps its new server (its KV cache is there now) without
  dragging the client's other conversations along. An entry is set only where the key would
  send its conversation elsewhere than where it is (balance.py: `Balancer.served`). A forged,
  stale, old-version or garbled cookie decodes to nothing: it is ignored, never an error.

Everything here is synchronous and does no I/O; `balance.py` adds the bounded-load rule on top
and calls `CookieIssuer` for the host that answered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol, TypeVar

MAX_IDS: Final = 8  # conversations remembered per cookie (entries), the most recent first
TAG_BYTES: Final = 4  # a conversation's tag: a collision only shares a server, never data
_ID_BYTES: Final = 8
ENTRY_BYTES: Final = _ID_BYTES + TAG_BYTES
_MAX_BODY: Final = MAX_IDS * ENTRY_BYTES
_MAC_BYTES: Final = 16
_VERSION: Final = 2  # 1 named servers per client (no tags): such cookies decode to nothing
_HEAD = struct.Struct(">BI")  # version, expiry (Unix seconds)
# The longest genuine value, in unpadded base64: anything longer is not read at all.
MAX_VALUE_CHARS: Final = -(-(_HEAD.size + _MAX_BODY + _MAC_BYTES) * 4 // 3)
CACHE_LIMIT: Final = 4096  # signed Set-Cookie values kept for the current second
_MASK: Final = (1 << 64) - 1
_TAG_MASK: Final = (1 << (8 * TAG_BYTES)) - 1


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


def entry_at(entries: bytes, tag: bytes) -> int:
    """Where the entry of the conversation `tag` starts in a cookie's entries, or -1: a search
    in C for the tag, kept only where a tag sits (at 8 past a multiple of ENTRY_BYTES)."""
    at = entries.find(tag, _ID_BYTES)
    while at >= 0:
        if (at - _ID_BYTES) % ENTRY_BYTES == 0:
            return at - _ID_BYTES
        at = entries.find(tag, at + 1)
    return -1


def held_by(entries: bytes, tag: bytes) -> bytes | None:
    """The server id the cookie's entries name for the conversation `tag`, if any."""
    at = entry_at(entries, tag)
    return entries[at : at + _ID_BYTES] if at >= 0 else None


def split_entries(entries: bytes) -> list[tuple[bytes, bytes]]:
    """(host id, tag) of each entry, most recent first: for tests and people, not requests."""
    step = ENTRY_BYTES
    return [(entries[i : i + _ID_BYTES], entries[i + _ID_BYTES : i + step])
            for i in range(0, len(entries), step)]  # fmt: skip


class CookieCodec:
    """Signs and verifies affinity cookie values: base64url(version, expiry, entries, mac).
    Entries travel as one bytes value, ENTRY_BYTES each (`host_id(url) + tag`), most recent
    first: found with one C search, rewritten with two slices, hashed once as a cache key."""

    __slots__ = ("_mac_key", "max_age_s")

    def __init__(self, secret: str, max_age_s: int) -> None:
        # Derived, so that the configured secret is never used as-is for anything else; the
        # version is in the derivation too, so no two formats ever share a MAC.
        key = hashlib.sha256(b"edge-affinity-cookie-v2\0" + secret.encode()).digest()
        # A keyed BLAKE2b is a MAC by design and a third of HMAC-SHA256's cost; keyed once here,
        # copied per value.
        self._mac_key = hashlib.blake2b(key=key, digest_size=_MAC_BYTES)
        self.max_age_s = max_age_s

    def encode(self, entries: bytes, now: float) -> str:
        """The signed value of the first `MAX_IDS` entries, valid `max_age_s` from `now`."""
        if not entries or len(entries) % ENTRY_BYTES:
            raise ValueError(f"cookie entries are host_id(url) + a {TAG_BYTES}-byte tag, each")
        payload = _HEAD.pack(_VERSION, int(now) + self.max_age_s) + entries[:_MAX_BODY]
        raw = payload + self._mac(payload)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def decode(self, value: str, now: float) -> bytes:
        """The entries of a genuine, unexpired cookie of this version; b"" for anything else."""
        if not 0 < len(value) <= MAX_VALUE_CHARS:
            return b""
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            return b""
        body = len(raw) - _HEAD.size - _MAC_BYTES
        if body <= 0 or body % ENTRY_BYTES or body > _MAX_BODY:
            return b""
        payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        version, expires = _HEAD.unpack_from(payload)
        # Checked before the MAC (old and stale cookies cost no hash): an unsigned field read
        # early can only make a cookie be ignored, never accepted.
        if version != _VERSION or expires <= now:
            return b""
        if not hmac.compare_digest(mac, self._mac(payload)):  # constant time: no byte guessed
            return b""
        return payload[_HEAD.size :]

    def _mac(self, payload: bytes) -> bytes:
        mac = self._mac_key.copy()
        mac.update(payload)
        return mac.digest()

    def __repr__(self) -> str:
        return f"<CookieCodec max_age={self.max_age_s}s>"


def cookie_value(header: str | None, name: str) -> str | None:
    """The value of cookie `name` in a Cookie request header (the first one, as browsers order
    the most specific path first). Searched, not split: a header holds other sites' cookies."""
    if not header:
        return None
    at = header.find(name)
    while at >= 0:
        end = at + len(name)
        if header.startswith("=", end) and _starts_pair(header, at):
            stop = header.find(";", end)
            value = header[end + 1 : stop] if stop >= 0 else header[end + 1 :]
            return value.strip().strip('"')
        at = header.find(name, at + 1)
    return None


def _starts_pair(header: str, at: int) -> bool:
    """Whether a name found at `at` begins a name=value pair (not a value's or a name's tail)."""
    i = at - 1
    while i >= 0 and header[i] in " \t":
        i -= 1
    return i < 0 or header[i] == ";"


def set_cookie(name: str, value: str, max_age_s: int, secure: bool) -> str:
    return f"{name}={value}{_attributes(max_age_s, secure)}"


def _attributes(max_age_s: int, secure: bool) -> str:
    tail = "; Secure" if secure else ""
    return f"; Max-Age={max_age_s}; Path=/; HttpOnly; SameSite=Lax{tail}"


class CookieIssuer:
    """The Set-Cookie value for the host that answered one conversation: that conversation's
    entry (host id + tag) first, then the other conversations' entries the client's cookie held
    (the same conversation's older entry dropped: one server per conversation), signed.

    Signing costs a MAC per response, and within one second (the expiry's resolution) the value
    for the same entries is the same: values are cached for the current second only, at most
    `limit` of them (a second with more distinct conversations starts the cache over)."""

    __slots__ = ("codec", "name", "limit", "_ids", "_wall", "_cache", "_second", "_tails")

    def __init__(
        self,
        codec: CookieCodec,
        name: str,
        ids: HostIds,
        wall: Callable[[], float],
        limit: int = CACHE_LIMIT,
    ) -> None:
        self.codec = codec
        self.name = name
        self.limit = limit
        self._ids = ids
        self._wall = wall
        self._cache: dict[tuple[bytes, bool], str] = {}
        self._second = -1
        self._tails = (_attributes(codec.max_age_s, False), _attributes(codec.max_age_s, True))

    def issue(self, url: str, held: bytes, tag: bytes, secure: bool) -> str:
        """The Set-Cookie value: `url`'s entry for `tag`, then the other entries `held`."""
        entries = self._ids.get(url)[0] + tag
        if held:
            at = entry_at(held, tag)
            if at >= 0:
                held = held[:at] + held[at + ENTRY_BYTES :]
            entries += held[: _MAX_BODY - ENTRY_BYTES]
        second = int(self._wall())
        if second != self._second:
            self._cache.clear()
            self._second = second
        key = (entries, secure)
        cookie = self._cache.get(key)
        if cookie is None:
            if len(self._cache) >= self.limit:
                self._cache.clear()
            value = self.codec.encode(entries, second)
            cookie = self._cache[key] = f"{self.name}={value}{self._tails[secure]}"
        return cookie

    def __repr__(self) -> str:
        return f"<CookieIssuer {self.name} cached={len(self._cache)}>"


# --- keys: where a request goes, which conversation it is ------------------------------------


def affinity_key(doc: Mapping[str, Any], session: str | None, limit: int) -> tuple[str, int] | None:
    """(kind, 64-bit key) that places a request: session header, else body `user`, else the
    prefix."""
    if session and len(session) <= 512:
        return "session", _key(b"s\0" + session.encode())
    user = _user(doc)
    if user:
        return "user", _key(b"u\0" + user.encode()[:limit])
    prefix = prefix_material(doc, limit)
    if prefix:
        return "prefix", _key(b"p\0" + prefix)
    return None


def conversation_tag(kind: str, key: int, doc: Mapping[str, Any], limit: int) -> bytes | None:
    """The cookie tag of a request's conversation, from its `affinity_key` (kind, key): the
    session or prefix key cut to TAG_BYTES, free; the prefix hashed only when `user` placed it
    (one user has many conversations). None when the request is of no conversation."""
    if kind == "user":
        prefix = prefix_material(doc, limit)
        if prefix is None:
            return None
        key = _key(b"p\0" + prefix)
    return (key & _TAG_MASK).to_bytes(TAG_BYTES, "big")


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

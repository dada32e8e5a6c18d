"""API keys: creation, hashing, and the two stores (a JSON file, or Redis shared by every replica).

A key is `sk-edge-` + an 8-hex-character id + 43 characters of urlsafe base64 (32 random bytes).
Only its SHA-256 digest is stored. The id inside the key names the record, so a check is one dict
lookup by id and one constant-time comparison of digests; the id is not secret and is the only
part of a key that may appear in logs, metrics or errors.

The edge reads a store through a watcher (`FileKeys`, `RedisKeys`): `records` is an immutable
snapshot swapped whole when the store changed, and `version` grows with each swap, so a reader
can rebuild what it derives from the snapshot only when needed. Writers (the `edge keys` command)
use `FileBackend` / `RedisBackend`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from edge.access.redisconn import RedisDown, RedisLink
from edge.config import ConfigError, load

log = logging.getLogger("edge.keys")

KEY_PREFIX = "sk-edge-"
ID_CHARS = 8
_SECRET_CHARS = 43  # urlsafe base64 of 32 bytes, unpadded
KEY_LENGTH = len(KEY_PREFIX) + ID_CHARS + _SECRET_CHARS
_HEX = frozenset("0123456789abcdef")
WORKSPACE = re.compile(r"[0-9a-f]{24}")
REDIS_KEYS, REDIS_VERSION = "edge:keys", "edge:keys:version"


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-key limits; 0 means unlimited."""

    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0

    @property
    def any(self) -> bool:
        return bool(self.rpm or self.tpm or self.concurrency)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str
    hash: str  # hex SHA-256 of the whole key
    workspace: str = ""  # "" = not scoped to a workspace
    models: tuple[str, ...] = ()  # () = every model
    limits: Limits = field(default_factory=Limits)
    created: float = 0.0
    revoked: float | None = None
    # Admission ([admission], edge/routing/admission.py): the key's default priority and the
    # most X-Edge-Priority may ask (-1: the config's), its weight in a saturated fleet (0: 1).
    priority: int = -1
    max_priority: int = -1
    weight: float = 0.0

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["models"] = list(self.models)
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> KeyRecord:
        limits = Limits(**doc.get("limits", {}))
        fields = {k: v for k, v in doc.items() if k != "limits"}
        fields["models"] = tuple(fields.get("models", ()))
        return cls(limits=limits, **fields)


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id(key: str) -> str | None:
    """The id inside a well-formed key, or None (checked without looking anything up)."""
    if len(key) != KEY_LENGTH or not key.startswith(KEY_PREFIX):
        return None
    kid = key[len(KEY_PREFIX) : len(KEY_PREFIX) + ID_CHARS]
    return kid if _HEX.issuperset(kid) else None


def new_key(taken: Mapping[str, object] = MappingProxyType({})) -> tuple[str, str]:
    """(id, key): a fresh key whose id is not in `taken`."""
    while True:
        kid = secrets.token_hex(ID_CHARS // 2)
        if kid not in taken:
            break
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return kid, f"{KEY_PREFIX}{kid}{secret}"


# --- the edge's view of a store --------------------------------------------------------------


class KeyWatcher(Protocol):
    records: Mapping[str, KeyRecord]
    version: int  # 0 until the first successful load

    async def refresh(self) -> None: ...


def _parse_file(text: str) -> dict[str, KeyRecord]:
    doc = json.loads(text) if text.strip() else {}
    return {r.id: r for r in map(KeyRecord.from_json, doc.get("keys", []))}


class FileKeys:
    """A JSON key file, re-read when its identity (inode, size, mtime) changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.records: Mapping[str, KeyRecord] = MappingProxyType({})
        self.version = 0
        self._seen: tuple[int, int, int] | None = None

    async def refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        seen = (st.st_ino, st.st_size, st.st_mtime_ns) if st else (0, 0, 0)
        if seen == self._seen:
            return
        try:
            text = await asyncio.to_thread(_read_text, self.path) if st else ""
            records = _parse_file(text)
        except (OSError, ValueError, TypeError) as exc:
            # Keep serving the last good snapshot: a half-edited file must not lock everyone out.
            log.error("key store %s not reloaded: %s", self.path, type(exc).__name__)
            return
        self._seen = seen
        self.records = MappingProxyType(records)
        self.version += 1
        log.info("key store %s loaded: %d key(s)", self.path, len(records))

    def __repr__(self) -> str:
        return f"<FileKeys {self.path} keys={len(self.records)} version={self.version}>"


def _read_text(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


class RedisKeys:
    """Keys kept in Redis; each refresh is one GET of the version, and a HGETALL if it moved."""

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self.records: Mapping[str, KeyRecord] = MappingProxyType({})
        self.version = 0
        self._seen: bytes | str | None = None

    async def refresh(self) -> None:
        client = self.link.client
        try:
            seen = await self.link.call(lambda: client.get(REDIS_VERSION), op="keys")
            if seen == self._seen and self.version:
                return
            if seen is None and self.version:
                # A Redis restarted without its data: keep the keys we know rather than lock
                # every client out (revoking goes through the version, which then exists again).
                if self._seen is not None:
                    log.error(
                        "key store missing in Redis; keeping the %d known key(s)", len(self.records)
                    )
                    self._seen = None
                return
            raw = await self.link.call(lambda: client.hgetall(REDIS_KEYS), op="keys")
            records = {r.id: r for r in (KeyRecord.from_json(json.loads(v)) for v in raw.values())}
        except RedisDown:
            return  # the last snapshot stays in force until Redis is back
        except (ValueError, TypeError) as exc:
            log.error("key store in Redis not reloaded: %s", type(exc).__name__)
            return
        self._seen = seen
        self.records = MappingProxyType(records)
        self.version += 1
        log.info("key store in Redis loaded: %d key(s)", len(records))

    def __repr__(self) -> str:
        return f"<RedisKeys keys={len(self.records)} version={self.version}>"


# --- writers, for `edge keys` ----------------------------------------------------------------


class Backend(Protocol):
    errors: tuple[type[Exception], ...]  # what a failing store raises

    def records(self) -> dict[str, KeyRecord]: ...
    def put(self, record: KeyRecord) -> None: ...


class FileBackend:
    """Read-modify-write under an exclusive lock; the file is replaced whole (readers never see
    half of it)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.errors: tuple[type[Exception], ...] = (OSError, ValueError)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def records(self) -> dict[str, KeyRecord]:
        try:
            return _parse_file(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}

    def put(self, record: KeyRecord) -> None:
        with self._locked():
            records = self.records()
            records[record.id] = record
            doc = {"keys": [r.to_json() for r in records.values()]}
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(doc, out, indent=1)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)


class RedisBackend:
    def __init__(self, url: str) -> None:
        import redis  # the command-line tool only; the edge uses redis.asyncio via RedisLink

        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.errors: tuple[type[Exception], ...] = (redis.RedisError, ValueError)

    def records(self) -> dict[str, KeyRecord]:
        raw = self.client.hgetall(REDIS_KEYS)
        return {r.id: r for r in (KeyRecord.from_json(json.loads(v)) for v in raw.values())}

    def put(self, record: KeyRecord) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(REDIS_KEYS, record.id, json.dumps(record.to_json()))
            pipe.incr(REDIS_VERSION)
            pipe.execute()


# --- `edge keys create | list | revoke` -------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config; its [auth] key_store / redis_url are used")
    parser.add_argument("--store", help="JSON key file (overrides the config)")
    parser.add_argument("--redis-url", help="keys kept in Redis (overrides the config)")
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key; it is printed once, on stdout")
    create.add_argument("--name", required=True)
    create.add_argument("--workspace", default="", help="24 hex characters")
    create.add_argument("--models", default="", help="comma-separated; default every model")
    for limit in ("rpm", "tpm", "concurrency"):
        create.add_argument(f"--{limit}", type=_non_negative, default=0, help="0 = unlimited")
    create.add_argument("--priority", type=_priority, default=-1, help="default priority 0..9")
    create.add_argument(
        "--max-priority", type=_priority, default=-1, help="highest X-Edge-Priority, 0..9"
    )
    create.add_argument("--weight", type=float, default=0.0, help="fair share weight (plans)")
    listing = actions.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--json", action="store_true")
    revoke = actions.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("id")


def _non_negative(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {raw!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _priority(raw: str) -> int:
    value = _non_negative(raw)
    if value > 9:
        raise argparse.ArgumentTypeError("must be 0..9")
    return value


def backend_from_args(args: argparse.Namespace) -> Backend:
    if args.store:
        return FileBackend(args.store)
    if args.redis_url:
        return RedisBackend(args.redis_url)
    auth = load(args.config).auth
    if auth.key_store:
        return FileBackend(auth.key_store)
    if auth.redis_url:
        return RedisBackend(auth.redis_url)
    raise ConfigError("no key store: pass --store or --redis-url, or --config with [auth]")


def run(args: argparse.Namespace) -> int:
    backend = backend_from_args(args)
    try:
        if args.action == "create":
            return _create(backend, args)
        if args.action == "list":
            return _list(backend, args.json)
        return _revoke(backend, args.id)
    except ConfigError:
        raise
    except backend.errors as exc:
        print(f"edge: key store error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def create_key(
    backend: Backend, name: str, workspace: str = "", models: tuple[str, ...] = (),
    limits: Limits = Limits(), priority: int = -1, max_priority: int = -1, weight: float = 0.0,
) -> tuple[KeyRecord, str]:  # fmt: skip
    """Store a new key's record; the key itself is returned once and kept nowhere."""
    if workspace and not WORKSPACE.fullmatch(workspace):
        raise ConfigError("the workspace must be 24 lower-case hex characters")
    kid, key = new_key(backend.records())
    created = round(time.time(), 3)
    if weight < 0:
        raise ConfigError("the weight must be >= 0")
    record = KeyRecord(
        kid, name, digest(key).hex(), workspace, models, limits, created, None, priority,
        max_priority, weight,
    )  # fmt: skip
    backend.put(record)
    return record, key


def _create(backend: Backend, args: argparse.Namespace) -> int:
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    limits = Limits(args.rpm, args.tpm, args.concurrency)
    record, key = create_key(
        backend, args.name, args.workspace, models, limits, args.priority, args.max_priority,
        args.weight,
    )  # fmt: skip
    print(key, flush=True)
    print(f"created key {record.id} ({args.name}); it is shown once, store it now", file=sys.stderr)
    return 0


def _list(backend: Backend, as_json: bool) -> int:
    records = sorted(backend.records().values(), key=lambda r: r.created)
    if as_json:
        shown = [{k: v for k, v in r.to_json().items() if k != "hash"} for r in records]
        print(json.dumps(shown, indent=1))
        return 0
    print(f"{'ID':<9} {'NAME':<20} {'WORKSPACE':<25} {'RPM':>6} {'TPM':>8} {'CONC':>5}  STATE")
    for r in records:
        lim, state = r.limits, "revoked" if r.revoked else "active"
        print(
            f"{r.id:<9} {r.name[:20]:<20} {r.workspace or '-':<25} {lim.rpm:>6} {lim.tpm:>8} "
            f"{lim.concurrency:>5}  {state}  {','.join(r.models) or '*'}"
        )
    return 0


def _revoke(backend: Backend, kid: str) -> int:
    record = backend.records().get(kid)
    if record is None:
        print(f"edge: no key with id {kid!r}", file=sys.stderr)
        return 1
    if record.revoked is None:
        backend.put(replace(record, revoked=round(time.time(), 3)))
    print(f"revoked key {kid}", file=sys.stderr)
    return 0

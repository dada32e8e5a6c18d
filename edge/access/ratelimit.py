"""Per-key rate limits: requests per minute, tokens per minute, concurrent requests.

Both per-minute limits are token buckets holding one minute's allowance (capacity = the limit,
refilled continuously at limit/60 per second), which is what OpenAI's headers describe:
`remaining` is what the bucket holds now, `reset` the time until it is full again.

Tokens are reserved before the request (its max_tokens, capped at the bucket size, or an
estimate) and settled after it with the usage the relay read: what was not used goes back, what
was used beyond the reservation is taken (the bucket may go below zero, delaying later
requests). Unknown usage keeps the reservation.

`LocalLimiter` keeps its buckets in this worker process: with `--workers N` each worker enforces
the full limits alone, so a key may get up to N times its limits from one edge.
`RedisLimiter` makes every worker of every replica share one set of buckets: one Lua script per
admission (atomic, on Redis's clock, one round trip, shared with the other admissions of the
same loop turn), and one per settlement, sent after the response is complete, off the request's
path. When Redis fails, `fail_open` admits on a `LocalLimiter` instead; `fail_closed` answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Callable
from typing import Any

from edge.access.keys import Limits
from edge.access.redisconn import RedisDown, RedisLink, ScriptBatch
from edge.errors import TooManyRequests, Unavailable


class Grant:
    """One admitted request's share of its key's limits, given back by `release`."""

    __slots__ = ("key_id", "limits", "reserved", "lease", "headers", "local")

    def __init__(
        self, key_id: str, limits: Limits, reserved: int, lease: str, headers: dict[str, str],
        local: bool,
    ) -> None:  # fmt: skip
        self.key_id = key_id
        self.limits = limits
        self.reserved = reserved  # tokens taken from the tpm bucket before the request
        self.lease = lease  # concurrency slot ("" when the key has no concurrency limit)
        self.headers = headers  # x-ratelimit-* for the response
        self.local = local  # admitted by the in-process limiter

    def __repr__(self) -> str:
        return f"<Grant {self.key_id} reserved={self.reserved} lease={bool(self.lease)}>"


UNLIMITED_HEADERS: dict[str, str] = {}


def duration(seconds: float) -> str:
    """OpenAI's reset format: 20ms, 1s, 6.5s, 6m0s."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def rate_headers(limits: Limits, req: float, tok: float) -> dict[str, str]:
    """The x-ratelimit-* fields for buckets holding `req` requests and `tok` tokens."""
    out: dict[str, str] = {}
    if limits.rpm:
        out["x-ratelimit-limit-requests"] = str(limits.rpm)
        out["x-ratelimit-remaining-requests"] = str(max(0, math.floor(req)))
        out["x-ratelimit-reset-requests"] = duration((limits.rpm - req) * 60 / limits.rpm)
    if limits.tpm:
        out["x-ratelimit-limit-tokens"] = str(limits.tpm)
        out["x-ratelimit-remaining-tokens"] = str(max(0, math.floor(tok)))
        out["x-ratelimit-reset-tokens"] = duration((limits.tpm - tok) * 60 / limits.tpm)
    return out


_LIMIT_NAMES = {
    "requests": "requests per minute",
    "tokens": "tokens per minute",
    "concurrency": "concurrent requests",
}


def too_many(
    key_id: str, which: str, limits: Limits, wait_s: float, headers: dict[str, str]
) -> TooManyRequests:
    limit = {"requests": limits.rpm, "tokens": limits.tpm}.get(which, limits.concurrency)
    retry = max(1, math.ceil(wait_s))
    headers["Retry-After"] = str(retry)
    return TooManyRequests(
        f"Rate limit reached for {_LIMIT_NAMES[which]} (limit {limit}) on key {key_id}. "
        f"Retry after {retry} s.",
        headers,
        code=f"rate_limit_{which}",
    )


class _Bucket:
    __slots__ = ("req", "tok", "stamp", "inflight")

    def __init__(self, limits: Limits, now: float) -> None:
        self.req = float(limits.rpm)
        self.tok = float(limits.tpm)
        self.stamp = now
        self.inflight = 0


def _denial(b: _Bucket, limits: Limits, need: int) -> tuple[str, float] | None:
    """(limit hit, seconds until it would admit), or None to admit."""
    if limits.rpm and b.req < 1:
        return "requests", (1 - b.req) * 60 / limits.rpm
    if limits.tpm and b.tok < need:
        return "tokens", (need - b.tok) * 60 / limits.tpm
    if limits.concurrency and b.inflight >= limits.concurrency:
        return "concurrency", 1.0
    return None


class LocalLimiter:
    """Buckets in this process; synchronous, so admission is decided without awaiting."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    async def admit(self, key_id: str, limits: Limits, need: int) -> Grant:
        return self.take(key_id, limits, need)

    def take(self, key_id: str, limits: Limits, need: int) -> Grant:
        if not limits.any:
            return Grant(key_id, limits, 0, "", UNLIMITED_HEADERS, True)
        now = self.clock()
        b = self._buckets.get(key_id)
        if b is None:
            b = self._buckets[key_id] = _Bucket(limits, now)
        rpm, tpm, conc = limits.rpm, limits.tpm, limits.concurrency
        elapsed, b.stamp = max(0.0, now - b.stamp), now
        b.req = min(rpm, b.req + elapsed * rpm / 60) if rpm else 0.0
        b.tok = min(tpm, b.tok + elapsed * tpm / 60) if tpm else 0.0
        need = min(need, tpm)
        denied = _denial(b, limits, need)
        if denied is not None:
            raise too_many(key_id, denied[0], limits, denied[1], rate_headers(limits, b.req, b.tok))
        b.req -= 1 if rpm else 0
        b.tok -= need
        b.inflight += 1 if conc else 0
        headers = rate_headers(limits, b.req, b.tok)
        return Grant(key_id, limits, need, "local" if conc else "", headers, True)

    def release(self, grant: Grant, used: int | None) -> None:
        b = self._buckets.get(grant.key_id)
        if b is None:
            return
        if grant.lease:
            b.inflight = max(0, b.inflight - 1)
        tpm = grant.limits.tpm
        if tpm and used is not None:
            b.tok = max(-tpm, min(tpm, b.tok + grant.reserved - used))

    def inflight(self, key_id: str) -> int:
        b = self._buckets.get(key_id)
        return b.inflight if b else 0

    def __repr__(self) -> str:
        busy = sum(b.inflight for b in self._buckets.values())
        return f"<LocalLimiter keys={len(self._buckets)} inflight={busy}>"


# KEYS[1]: hash {r, t, ts} (request and token buckets, last update in ms of Redis's clock);
# KEYS[2]: sorted set of concurrency leases scored by their expiry.
# ARGV: rpm, tpm, concurrency, tokens needed, lease id, lease ms.
# Returns {denied limit or "", requests left, tokens left, wait ms}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local conc, need = tonumber(ARGV[3]), tonumber(ARGV[4])
local s = redis.call('HMGET', KEYS[1], 'r', 't', 'ts')
local r, tk, ts = tonumber(s[1]), tonumber(s[2]), tonumber(s[3])
if not ts then r, tk, ts = rpm, tpm, now end
local el = math.max(0, now - ts)
r = math.min(rpm, (r or rpm) + el * rpm / 60000)
tk = math.min(tpm, (tk or tpm) + el * tpm / 60000)
local inflight = 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  inflight = redis.call('ZCARD', KEYS[2])
end
local deny, wait = '', 0
if rpm > 0 and r < 1 then
  deny, wait = 'requests', (1 - r) * 60000 / rpm
elseif tpm > 0 and tk < need then
  deny, wait = 'tokens', (need - tk) * 60000 / tpm
elseif conc > 0 and inflight >= conc then
  deny, wait = 'concurrency', 1000
else
  if rpm > 0 then r = r - 1 end
  tk = tk - need
  if conc > 0 then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[5])
    redis.call('PEXPIRE', KEYS[2], ARGV[6])
  end
end
redis.call('HSET', KEYS[1], 'r', tostring(r), 't', tostring(tk), 'ts', now)
redis.call('PEXPIRE', KEYS[1], 120000)
return {deny, tostring(r), tostring(tk), math.ceil(wait)}
"""

# KEYS as above; ARGV: tpm, tokens to give back (negative: to take), lease id or "".
_SETTLE = """
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[2], ARGV[3]) end
local tpm, delta = tonumber(ARGV[1]), tonumber(ARGV[2])
if delta ~= 0 then
  local tk = tonumber(redis.call('HGET', KEYS[1], 't'))
  if tk then
    redis.call('HSET', KEYS[1], 't', tostring(math.max(-tpm, math.min(tpm, tk + delta))))
  end
end
return 1
"""


def _keys(key_id: str) -> list[str]:
    # One hash tag per key id: both keys land on one slot, as a Redis Cluster script needs.
    return [f"edge:rl:{{{key_id}}}", f"edge:cc:{{{key_id}}}"]


class RedisLimiter:
    """Buckets in Redis, shared by every worker and replica."""

    def __init__(self, link: RedisLink, lease_s: float, fallback: LocalLimiter | None) -> None:
        self.link = link
        self.fallback = fallback  # fail_open: admit here while Redis is down
        self.lease_ms = str(int(lease_s * 1000))
        self._admit = ScriptBatch(link, _ADMIT, "admit", abandoned=self._give_back)
        self._settle = ScriptBatch(link, _SETTLE, "settle")
        self._prefix = os.urandom(4).hex()
        self._count = 0
        self.degraded = 0  # admissions decided locally because Redis was down (fail_open)
        self.lost = 0  # settlements Redis did not take (their leases expire after lease_s)

    async def admit(self, key_id: str, limits: Limits, need: int) -> Grant:
        if not limits.any:
            return Grant(key_id, limits, 0, "", UNLIMITED_HEADERS, False)
        need = min(need, limits.tpm)
        lease = ""
        if limits.concurrency:
            self._count += 1
            lease = f"{self._prefix}:{self._count}"
        args: list[int | str] = [limits.rpm, limits.tpm, limits.concurrency, need, lease]
        args.append(self.lease_ms)
        try:
            reply = await self._admit(_keys(key_id), args)
        except RedisDown:
            if self.fallback is None:
                raise _limiter_down() from None
            self.degraded += 1
            return self.fallback.take(key_id, limits, need)
        denied, req, tok, wait_ms = (_text(x) for x in reply)
        headers = rate_headers(limits, float(req), float(tok))
        if denied:
            raise too_many(key_id, denied, limits, int(wait_ms) / 1000, headers)
        return Grant(key_id, limits, need, lease, headers, False)

    def release(self, grant: Grant, used: int | None) -> None:
        """Give back the lease and settle tokens; never awaits (sent with the next batch)."""
        if grant.local:
            if self.fallback is not None:
                self.fallback.release(grant, used)
            return
        tpm = grant.limits.tpm
        delta = grant.reserved - used if tpm and used is not None else 0
        if grant.lease or delta:
            self._send_settle(_keys(grant.key_id), [tpm, delta, grant.lease])

    def _give_back(self, keys: list[str], args: list[int | str], reply: Any) -> None:
        """An admission whose request was cancelled before it heard back: return its tokens and
        lease (the request itself stays counted: it did arrive)."""
        if reply and not _text(reply[0]):
            self._send_settle(keys, [args[1], args[3], args[4]])

    def _send_settle(self, keys: list[str], args: list[int | str]) -> None:
        self._settle(keys, args).add_done_callback(self._settled)

    def _settled(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            self.lost += 1

    async def close(self, timeout_s: float = 2.0) -> None:
        """Send what is queued and wait (bounded) for it, so a drained edge leaves no leases."""
        await asyncio.sleep(0)  # let a batch queued in this turn be flushed
        with contextlib.suppress(TimeoutError):
            await self._admit.drain(timeout_s)
            await self._settle.drain(timeout_s)

    def counters(self) -> tuple[bool, int, int, int]:
        """(Redis up, Redis failures, fail-open admissions, lost settlements) for metrics."""
        return self.link.up, self.link.failures, self.degraded, self.lost

    def __repr__(self) -> str:
        return (
            f"<RedisLimiter {self.link!r} {self._admit!r} {self._settle!r} "
            f"degraded={self.degraded} lost={self.lost}>"
        )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _limiter_down() -> Unavailable:
    err = Unavailable("The rate limiter is unavailable; retry shortly.", code="limiter_unavailable")
    err.headers["Retry-After"] = "1"
    return err

"""Choosing a host: synchronous, no I/O, decided before any await.

Two steps. `decide` runs once per request, before the first attempt: it reads the per-request
inputs (X-Edge-Route or the body's `provider.sort`, an X-Edge-Server pin, the affinity cookie, a
session key or the conversation prefix) and names the host that affinity or the pin wants, if
any. `pick` runs per attempt: the first attempt goes to that host; a retry, or a request nothing
holds, goes by policy among the routable hosts not yet tried.

Policies (per model in config, per request by header):
- latency: power of two choices, cost = Peak-EWMA time to first byte x (in flight + 1 + the
  engine's own queue), as linkerd2-proxy and Finagle do (see stats.py for the score);
- least_inflight, round_robin, random;
- throughput: power of two choices on measured decode rate per unit of load;
- price: the cheapest configured servers only, then latency among them.

Affinity sits above the policy: a host named by a valid cookie, or the rendezvous home of the
request's key, is used while it is routable, not failing and within the bounded load (in flight
below `load_factor` x the mean, as in consistent hashing with bounded loads); otherwise the
policy decides, and the outcome reads "moved".

Hosts may carry a `routable` attribute (health); a host without one is routable. A pin bypasses
that: pinning a host is how one debugs it.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Final

from edge.config import DRAWN_SECRET, POLICIES, ModelRouting, RoutingSettings
from edge.errors import BadRequest
from edge.routing.affinity import (
    CookieCodec,
    HostIds,
    affinity_key,
    cookie_value,
    ranked,
    set_cookie,
)
from edge.routing.fleet import Host, normalise_url

ROUTE_HEADER: Final = "X-Edge-Route"
PIN_HEADER: Final = "X-Edge-Server"
# Affinity outcomes, for metrics and the access log (metrics.AFFINITY_RESULTS, and "pinned").
OUTCOMES = ("cookie_hit", "key_hit", "moved", "none", "pinned")
_NEUTRAL_TTFB_S = 1.0  # the score of a fleet nobody has measured yet: only ratios matter
_STALL_S = 0.5  # a session's host whose oldest unanswered attempt waited this long is left


class Rules:
    """One model's routing settings, resolved once from the config."""

    __slots__ = ("policy", "affinity", "hedging", "prices")

    def __init__(self, settings: RoutingSettings, model: ModelRouting) -> None:
        self.policy = model.policy or settings.policy
        self.affinity = settings.affinity and model.affinity
        self.hedging = settings.hedging or model.hedging
        # normalised server URL -> blended price (input + output per million tokens)
        self.prices = {_norm(url): p.input + p.output for url, p in model.prices.items()}

    def __repr__(self) -> str:
        return f"<Rules {self.policy} affinity={self.affinity} hedging={self.hedging}>"


def _norm(url: str) -> str:
    try:
        return normalise_url(url)
    except ValueError:
        return url


class Decision:
    """What routing decided for one request before its first attempt."""

    __slots__ = ("model", "policy", "rules", "target", "affinity", "key_kind", "cookie_ids")

    def __init__(self, model: str, policy: str, rules: Rules) -> None:
        self.model = model
        self.policy = policy
        self.rules = rules
        self.target: Host | None = None  # the pinned host, or the one affinity wants
        self.affinity = "none"  # one of OUTCOMES; final once `Balancer.served` ran
        self.key_kind: str | None = None  # session | user | prefix
        self.cookie_ids: tuple[bytes, ...] = ()  # the valid ids the client's cookie held

    @property
    def pinned(self) -> bool:
        return self.affinity == "pinned"

    def __repr__(self) -> str:
        target = self.target.url if self.target is not None else None
        return f"<Decision {self.policy} affinity={self.affinity} target={target}>"


def routable(hosts: Sequence[Host]) -> Sequence[Host]:
    if all(getattr(h, "routable", True) for h in hosts):
        return hosts
    return [h for h in hosts if getattr(h, "routable", True)]


def load(host: Host) -> int:
    """Attempts in flight on `host` in this worker and (shared memory, approximate) the others."""
    return host.inflight + host.stats.remote_inflight


class Balancer:
    """Routing for one worker: policies, affinity, pins and the hedge budget."""

    def __init__(
        self,
        settings: RoutingSettings | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.rng = rng or random.Random()
        self.clock, self.wall = clock, wall
        self.ids = HostIds()
        self._cursors: dict[str, int] = {}  # round robin, per model
        self._tie = 0  # least_inflight's rotating start
        self._hedge_tokens = 0.0
        self.hedges = 0
        self.policies = dict.fromkeys(POLICIES, 0)
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self._cookies: dict[tuple[tuple[bytes, ...], bool], str] = {}
        self._cookie_second = -1
        self.reconfigure(settings or RoutingSettings())

    def reconfigure(self, settings: RoutingSettings) -> None:
        """New routing settings (SIGHUP). A drawn cookie secret (none configured) is kept: a
        reload must not void every session's cookie, nor make the workers disagree."""
        old = getattr(self, "settings", None)
        if old is not None and settings.cookie_secret.startswith(DRAWN_SECRET):
            settings = dataclasses.replace(settings, cookie_secret=old.cookie_secret)
        self.settings = settings
        self._cookies = {}  # signed with the old secret or name
        self.codec = CookieCodec(settings.cookie_secret, settings.cookie_max_age_s)
        self._default = Rules(settings, ModelRouting())
        self._rules = {m: Rules(settings, r) for m, r in settings.models.items()}

    def rules(self, model: str) -> Rules:
        return self._rules.get(model, self._default)

    # --- before the first attempt ---------------------------------------------------------

    def decide(
        self,
        model: str,
        hosts: Sequence[Host],
        doc: Mapping[str, Any],
        headers: Mapping[str, str],
    ) -> Decision:
        """Policy, pin and affinity for one request. Raises BadRequest for a bad pin or route."""
        rules = self.rules(model)
        decision = Decision(model, self._policy(rules, headers.get(ROUTE_HEADER), doc), rules)
        self.policies[decision.policy] += 1
        pin = headers.get(PIN_HEADER)
        if pin is not None:
            decision.target = self._pinned(pin, model, hosts)
            decision.affinity = "pinned"
            return decision
        if rules.hedging:
            budget = self.settings.hedge_budget
            self._hedge_tokens = min(self._hedge_tokens + budget, max(1.0, 100 * budget))
        if rules.affinity:
            self._affine(decision, hosts, doc, headers)
        return decision

    def _policy(self, rules: Rules, header: str | None, doc: Mapping[str, Any]) -> str:
        if header is not None:
            wanted = header.strip().lower()
            if wanted not in POLICIES:
                raise BadRequest(
                    f"{ROUTE_HEADER} must be one of: {', '.join(POLICIES)}.", param=ROUTE_HEADER
                )
            return wanted
        provider = doc.get("provider")  # OpenRouter's provider preferences; forwarded as is
        sort = provider.get("sort") if isinstance(provider, dict) else None
        if isinstance(sort, str) and sort in POLICIES:
            return sort
        return rules.policy

    def _pinned(self, pin: str, model: str, hosts: Sequence[Host]) -> Host:
        try:
            url = normalise_url(pin)
        except ValueError:
            url = ""
        for host in hosts:
            if host.url == url:
                return host
        # Never forwarded anywhere: the edge is not an open proxy. The value is not echoed.
        raise BadRequest(
            f"{PIN_HEADER} does not name a server of model '{model[:200]}'; "
            "GET /libertai/models lists them.",
            param=PIN_HEADER,
            code="unknown_server",
        )

    def _affine(
        self,
        decision: Decision,
        hosts: Sequence[Host],
        doc: Mapping[str, Any],
        headers: Mapping[str, str],
    ) -> None:
        now = self.clock()
        pool = self._tier(decision, routable(hosts))
        cookie = cookie_value(headers.get("Cookie"), self.settings.cookie_name)
        if cookie:
            decision.cookie_ids = self.codec.decode(cookie, self.wall())
            held = self._held(decision.cookie_ids, hosts)
            if held is not None:
                decision.target = held if held in pool and self._fits(held, pool, now) else None
                decision.affinity = "cookie_hit" if decision.target is not None else "moved"
                return
        if len(pool) == 1:
            return  # one server: no key can choose another (the cookie still names it)
        s = self.settings
        found = affinity_key(doc, headers.get(s.session_header), s.prefix_bytes)
        if found is None:
            return
        decision.key_kind, key = found
        for rank, host in enumerate(ranked(key, pool, self.ids)):
            if self._fits(host, pool, now):
                decision.target = host
                decision.affinity = "key_hit" if rank == 0 else "moved"
                return
        decision.affinity = "moved"

    def _held(self, ids: tuple[bytes, ...], hosts: Sequence[Host]) -> Host | None:
        """The most recent server of this model the cookie names."""
        if not ids:
            return None
        by_id = {self.ids.get(h.url)[0]: h for h in hosts}
        for hid in ids:
            host = by_id.get(hid)
            if host is not None:
                return host
        return None

    def _fits(self, host: Host, pool: Sequence[Host], now: float) -> bool:
        """Bounded load: below ceil(c x (total + 1) / n) in flight, and neither failing nor
        stalled (an attempt waiting for its first byte 4x longer than usual, and over 0.5 s)."""
        stats = host.stats
        if stats.failing(now, self.settings.decay_s):
            return False
        if stats.waited(now) > max(_STALL_S, 4 * stats.ttfb_ewma):
            return False
        total = 0
        for h in pool:
            total += h.inflight + h.stats.remote_inflight  # load(h), inlined: every request
        return load(host) < math.ceil(self.settings.load_factor * (total + 1) / len(pool))

    def _tier(self, decision: Decision, pool: Sequence[Host]) -> Sequence[Host]:
        """`price` narrows the pool to the cheapest servers; other policies keep it."""
        prices = decision.rules.prices
        if decision.policy != "price" or not prices or not pool:
            return pool
        cheapest = min(prices.get(h.url, math.inf) for h in pool)
        return [h for h in pool if prices.get(h.url, math.inf) == cheapest]

    # --- per attempt ------------------------------------------------------------------------

    def pick(
        self,
        hosts: Sequence[Host],
        exclude: Collection[Host] = (),
        decision: Decision | None = None,
    ) -> Host | None:
        """The host for the next attempt, or None when none is left (a pinned host is tried
        once: if it fails, the request fails)."""
        if decision is not None and decision.target is not None:
            if decision.target not in exclude:
                return decision.target
            if decision.pinned:
                return None
        return self._by_policy(hosts, exclude, decision)

    def _by_policy(
        self, hosts: Sequence[Host], exclude: Collection[Host], decision: Decision | None
    ) -> Host | None:
        if len(hosts) == 1 and not exclude:  # nothing to weigh
            only = hosts[0]
            return only if getattr(only, "routable", True) else None
        pool: Sequence[Host] = routable(hosts)
        if exclude:
            pool = [h for h in pool if h not in exclude]
        if not pool:
            return None
        if decision is None:
            return self._latency(pool)
        pool = self._tier(decision, pool)
        policy = decision.policy
        if policy == "latency" or policy == "price":
            return self._latency(pool)
        if policy == "least_inflight":
            return self._least(pool)
        if policy == "round_robin":
            return self._round_robin(pool, decision.model)
        if policy == "random":
            return pool[self.rng.randrange(len(pool))]
        return self._throughput(pool)

    def _two(self, pool: Sequence[Host]) -> tuple[Host, Host]:
        i = self.rng.randrange(len(pool))
        j = self.rng.randrange(len(pool) - 1)
        return pool[i], pool[j + (j >= i)]

    def _latency(self, pool: Sequence[Host]) -> Host:
        if len(pool) == 1:
            return pool[0]
        now, decay = self.clock(), self.settings.decay_s
        neutral = _median([h.stats.ttfb_ewma for h in pool if h.stats.samples]) or _NEUTRAL_TTFB_S
        a, b = self._two(pool)
        return a if _cost(a, now, neutral, decay) <= _cost(b, now, neutral, decay) else b

    def _throughput(self, pool: Sequence[Host]) -> Host:
        rates = [h.stats.rate_ewma for h in pool if h.stats.rate_samples]
        if len(pool) == 1 or not rates:
            return self._latency(pool)  # nothing measured yet: fastest to answer instead
        now, decay, neutral = self.clock(), self.settings.decay_s, _median(rates)
        a, b = self._two(pool)
        value_a = a.stats.rate(now, neutral, decay) / (load(a) + 1 + a.stats.queue(now))
        value_b = b.stats.rate(now, neutral, decay) / (load(b) + 1 + b.stats.queue(now))
        return a if value_a >= value_b else b

    def _least(self, pool: Sequence[Host]) -> Host:
        # The rotating start breaks ties, so idle hosts share light traffic evenly.
        now = self.clock()
        start = self._tie = (self._tie + 1) % len(pool)
        best, best_load = pool[start], math.inf
        for i in range(len(pool)):
            host = pool[(start + i) % len(pool)]
            value = load(host) + host.stats.queue(now)
            if value < best_load:
                best, best_load = host, value
        return best

    def _round_robin(self, pool: Sequence[Host], model: str) -> Host:
        cursor = self._cursors[model] = (self._cursors.get(model, -1) + 1) % len(pool)
        return pool[cursor]

    # --- hedging ----------------------------------------------------------------------------

    def hedge_delay(
        self, host: Host, hosts: Sequence[Host], decision: Decision | None
    ) -> float | None:
        """How long to wait for `host`'s first byte before hedging (its recent p95 TTFB, see
        HostStats.p95); None: do not hedge. A consistently slow host is not hedged: the policy
        sends it less; hedging is for the attempt that is slow for its host."""
        if decision is None or decision.pinned or not decision.rules.hedging:
            return None
        p95 = host.stats.p95()
        if p95 is None:
            return None
        return max(p95, self.settings.hedge_min_delay_s)

    def hedge_host(
        self, hosts: Sequence[Host], tried: Collection[Host], decision: Decision
    ) -> Host | None:
        """A second host for a hedge, if the budget allows one now."""
        if self._hedge_tokens < 1.0:
            return None
        host = self._by_policy(hosts, tried, decision)
        if host is not None:
            self._hedge_tokens -= 1.0
            self.hedges += 1
        return host

    # --- after the first byte ---------------------------------------------------------------

    def served(self, decision: Decision, host: Host, secure: bool) -> str | None:
        """Settle the affinity outcome for the host that answered; the Set-Cookie value for
        the response, or None (pinned requests and models without affinity set none)."""
        if decision.target is not None and host is not decision.target and not decision.pinned:
            decision.affinity = "moved"
        self.outcomes[decision.affinity] += 1
        if decision.pinned or not decision.rules.affinity:
            return None
        hid = self.ids.get(host.url)[0]
        held = decision.cookie_ids
        ids = (hid, *(i for i in held if i != hid)) if held else (hid,)
        # Signing costs an HMAC per response; within one second the value is the same.
        second = int(self.wall())
        if second != self._cookie_second:
            self._cookies.clear()
            self._cookie_second = second
        key = (ids, secure)
        cookie = self._cookies.get(key)
        if cookie is None:
            s = self.settings
            value = self.codec.encode(ids, second)
            cookie = self._cookies[key] = set_cookie(
                s.cookie_name, value, s.cookie_max_age_s, secure
            )
        return cookie

    def __repr__(self) -> str:
        outcomes = " ".join(f"{k}={v}" for k, v in self.outcomes.items())
        picks = sum(self.policies.values())
        return (
            f"<Balancer policy={self.settings.policy} decisions={picks} {outcomes} "
            f"hedges={self.hedges}>"
        )


def _cost(host: Host, now: float, neutral: float, decay_s: float) -> float:
    """Peak-EWMA cost: the TTFB score (or the wait of an attempt stuck without a first byte,
    whichever is larger) times the load an arrival would join."""
    stats = host.stats
    ttfb = max(stats.score(now, neutral, decay_s), stats.waited(now))
    return ttfb * (load(host) + 1 + stats.queue(now))


def _median(values: list[float]) -> float:
    """The neutral score: a typical host's. A median, so one penalised host does not drag the
    neutral value (and with it its own way back) up to its penalty."""
    if not values:
        return 0.0
    values.sort()
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

"""Choosing a host: synchronous, no I/O, decided before any await.

Two steps. `decide` runs once per request, before the first attempt: it reads the per-request
inputs (X-Edge-Route or the body's `provider.sort`, an X-Edge-Server pin, the affinity cookie, a
session key or the conversation prefix) and names the host that affinity or the pin wants, if
any. `pick` runs per attempt: the first attempt goes to that host; a retry, or a request nothing
holds, goes by policy (policies.py) among the hosts health allows (health.candidates: the caller
filters, this module never judges health itself) and not yet tried.

Affinity sits above the policy: the host a valid cookie names for this request's conversation
(affinity.py: entries are scoped by a conversation tag, so a client's other conversations do not
follow it), else the rendezvous home of the request's key, is used while it is a candidate, not
failing and within the bounded load (in flight below `load_factor` x the mean, as in consistent
hashing with bounded loads); otherwise the next host in rendezvous order that is, else the
policy, and the outcome reads "moved". A request with no conversation (no session header, no
user turn) ignores the cookie. A pin bypasses all of it, health included: pinning a host is how
one debugs it. A model with one server skips affinity: there is nothing to choose.

The cookie says only what the key cannot: a response sets the conversation's entry when it was
served elsewhere than its key's home (a failover, a loaded or failing home, a cookie's host),
never for a turn at home, which the key finds again. So a client's first conversation does not
pull its others along, a failed-over one stays where its KV cache now is, and the common turn
(cookie-less, at home) signs nothing.

`Balancer` composes the parts that own the rest: `Picker` (policies.py: the policy picks),
`HedgeBudget` (hedging.py: whether and when a hedge goes), `CookieIssuer` (affinity.py: the
Set-Cookie for the host that answered); it keeps the per-worker counters.
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
    CookieIssuer,
    HostIds,
    affinity_key,
    conversation_tag,
    cookie_value,
    held_by,
    ranked,
)
from edge.routing.fleet import Host, normalise_url
from edge.routing.health import candidates
from edge.routing.hedging import HedgeBudget
from edge.routing.policies import Picker, load, tier

ROUTE_HEADER: Final = "X-Edge-Route"
PIN_HEADER: Final = "X-Edge-Server"
# Affinity outcomes, for metrics and the access log (metrics.AFFINITY_RESULTS, and "pinned").
OUTCOMES = ("cookie_hit", "key_hit", "moved", "none", "pinned")
_STALL_S: Final = 0.5  # a session's host whose oldest unanswered attempt waited this long is left


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

    __slots__ = (
        "model", "policy", "rules", "target", "affinity", "key_kind", "tag", "cookie_ids", "doc",
    )  # fmt: skip

    def __init__(self, model: str, policy: str, rules: Rules) -> None:
        self.model = model
        self.policy = policy
        self.rules = rules
        self.target: Host | None = None  # the pinned host, or the one affinity wants
        self.affinity = "none"  # one of OUTCOMES; final once `Balancer.served` ran
        self.key_kind: str | None = None  # session | user | prefix
        self.tag: bytes | None = None  # the conversation's cookie tag (affinity.py), once known
        # The entries (host id + tag, affinity.ENTRY_BYTES each) of the client's valid cookie;
        # read only for a request of a conversation (else the cookie is neither used nor set).
        self.cookie_ids = b""
        # The body, kept only while the tag is unknown: placed by `user`, its conversation's
        # prefix is hashed only if a cookie is read or set (affinity.conversation_tag).
        self.doc: Mapping[str, Any] | None = None

    @property
    def pinned(self) -> bool:
        return self.affinity == "pinned"

    def __repr__(self) -> str:
        target = self.target.url if self.target is not None else None
        return f"<Decision {self.policy} affinity={self.affinity} target={target}>"


class Balancer:
    """Routing for one worker: each request's decision, each attempt's host, and the counts."""

    __slots__ = (
        "clock", "wall", "ids", "picker", "hedging", "policies", "outcomes", "settings", "codec",
        "cookies", "_default", "_rules",
    )  # fmt: skip

    def __init__(
        self,
        settings: RoutingSettings | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        settings = settings or RoutingSettings()
        self.clock, self.wall = clock, wall
        self.ids = HostIds()
        self.picker = Picker(rng or random.Random(), clock, settings.decay_s)
        self.hedging = HedgeBudget(settings)
        self.policies = dict.fromkeys(POLICIES, 0)  # decisions per policy
        self.outcomes = dict.fromkeys(OUTCOMES, 0)  # affinity outcomes of served requests
        self._apply(settings)

    def reconfigure(self, settings: RoutingSettings) -> None:
        """New routing settings (SIGHUP). A drawn cookie secret (none configured) is kept: a
        reload must not void every session's cookie, nor make the workers disagree."""
        if settings.cookie_secret.startswith(DRAWN_SECRET):
            settings = dataclasses.replace(settings, cookie_secret=self.settings.cookie_secret)
        self._apply(settings)
        self.picker.decay_s = settings.decay_s
        self.hedging.configure(settings)

    def _apply(self, settings: RoutingSettings) -> None:
        self.settings = settings
        self.codec = CookieCodec(settings.cookie_secret, settings.cookie_max_age_s)
        # A new issuer: values signed with the old secret or name are not served from its cache.
        self.cookies = CookieIssuer(self.codec, settings.cookie_name, self.ids, self.wall)
        self._default = Rules(settings, ModelRouting())
        self._rules = {m: Rules(settings, r) for m, r in settings.models.items()}

    def rules(self, model: str) -> Rules:
        return self._rules.get(model, self._default)

    @property
    def hedges(self) -> int:
        """Hedges sent."""
        return self.hedging.hedges

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
            self.hedging.earn()
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
        if len(hosts) == 1:
            return  # one server: every conversation's home, nothing to choose or remember
        s = self.settings
        found = affinity_key(doc, headers.get(s.session_header), s.prefix_bytes)
        if found is None:
            return  # nothing to place by, no conversation: the policy decides, no cookie
        kind, key = found
        decision.key_kind = kind
        if kind == "user":
            decision.doc = doc
        else:
            decision.tag = conversation_tag(kind, key, doc, s.prefix_bytes)
        now = self.clock()
        pool = candidates(decision.model, hosts, ())  # `hosts` itself while all are up
        if decision.policy == "price":
            pool = tier(pool, decision.rules.prices)
        cookie = cookie_value(headers.get("Cookie"), s.cookie_name)
        if cookie and self._by_cookie(decision, cookie, hosts, pool, now):
            return
        if len(pool) == 1:
            return  # one candidate: no key can choose another
        for rank, host in enumerate(ranked(key, pool, self.ids)):
            if self._fits(host, pool, now):
                decision.target = host
                if decision.affinity == "none":  # not "moved" off the cookie's host already
                    decision.affinity = "key_hit" if rank == 0 else "moved"
                return
        decision.affinity = "moved"

    def _by_cookie(
        self,
        decision: Decision,
        cookie: str,
        hosts: Sequence[Host],
        pool: Sequence[Host],
        now: float,
    ) -> bool:
        """The host the cookie names for this conversation, when it can take it: True when
        decided. A host it names that cannot (down, failing, loaded) makes the outcome "moved",
        and the key places the request as it would any other."""
        tag = self._tag(decision)
        if tag is None:
            return False
        decision.cookie_ids = entries = self.codec.decode(cookie, self.wall())
        hid = held_by(entries, tag) if entries else None
        if hid is None:
            return False  # a new conversation (or one on another model): key and policy
        for host in hosts:
            if self.ids.get(host.url)[0] == hid:
                if host in pool and self._fits(host, pool, now):
                    decision.target = host
                    decision.affinity = "cookie_hit"
                    return True
                decision.affinity = "moved"
                return False
        return False

    def _tag(self, decision: Decision) -> bytes | None:
        """The conversation's tag; hashed from the prefix on first use when `user` placed it."""
        doc = decision.doc
        if decision.tag is None and doc is not None:
            decision.doc = None
            decision.tag = conversation_tag("user", 0, doc, self.settings.prefix_bytes)
        return decision.tag

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

    # --- per attempt ------------------------------------------------------------------------

    def pick(
        self,
        hosts: Sequence[Host],
        exclude: Collection[Host] = (),
        decision: Decision | None = None,
    ) -> Host | None:
        """The host for the next attempt, or None when none is left. `hosts` are the
        candidates (health.candidates), except for the decision's target: a pinned or affine
        host comes first whatever `hosts` holds, and a pinned host is tried once (if it fails,
        the request fails)."""
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
            return hosts[0]
        pool: Sequence[Host] = [h for h in hosts if h not in exclude] if exclude else hosts
        if not pool:
            return None
        if decision is None:
            return self.picker.latency(pool)
        return self.picker.pick(decision.policy, pool, decision.model, decision.rules.prices)

    # --- hedging ----------------------------------------------------------------------------

    def hedge_delay(
        self, host: Host, hosts: Sequence[Host], decision: Decision | None
    ) -> float | None:
        """How long to wait for `host`'s first byte before hedging (hedging.py); None: do not
        hedge (no decision, a pin, or hedging off for the model)."""
        if decision is None or decision.pinned or not decision.rules.hedging:
            return None
        return self.hedging.delay(host)

    def hedge_host(
        self, hosts: Sequence[Host], tried: Collection[Host], decision: Decision
    ) -> Host | None:
        """A second host for a hedge, if the budget allows one now: by policy among the
        candidates of the model's `hosts` not tried yet (this filters: unlike `pick`'s, `hosts`
        is the model's whole list)."""
        if not self.hedging.ready():
            return None
        pool = candidates(decision.model, hosts, tried)
        host = self._by_policy(pool, tried, decision)  # `tried` again: the same picks as a retry
        if host is not None:
            self.hedging.spend()
        return host

    # --- after the first byte ---------------------------------------------------------------

    def served(self, decision: Decision, host: Host, secure: bool) -> str | None:
        """Settle the affinity outcome for the host that answered; the Set-Cookie value for
        the response, or None: a turn at its key's home (the key finds it again), a pin, a
        model without affinity or with one server, a request of no conversation. Else the
        conversation's entry names `host` (after a failover, where its KV cache is now), the
        cookie's other conversations kept behind it."""
        if decision.target is not None and host is not decision.target and not decision.pinned:
            decision.affinity = "moved"
        self.outcomes[decision.affinity] += 1
        if decision.key_kind is None or decision.affinity == "key_hit":
            return None  # key_kind: None for a pin, no affinity, one server, no key
        tag = self._tag(decision)
        if tag is None:
            return None
        return self.cookies.issue(host.url, decision.cookie_ids, tag, secure)

    def __repr__(self) -> str:
        outcomes = " ".join(f"{k}={v}" for k, v in self.outcomes.items())
        picks = sum(self.policies.values())
        return (
            f"<Balancer policy={self.settings.policy} decisions={picks} {outcomes} "
            f"hedges={self.hedges}>"
        )

"""Configuration: frozen dataclasses read from TOML and CLI flags, validated once at start.

Every setting has a default here and is documented in `config/edge.toml`. Flags override the file.
Nothing reads configuration after start but through the `Config` value it was handed.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final


class ConfigError(ValueError):
    """The configuration is invalid; the message names the setting."""


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = 32 * 1024 * 1024
    drain_timeout_s: float = 30.0
    # Names the served server in each proxied response's X-Edge-Server header.
    expose_server: bool = True
    # Bounds on what one client connection may hold; each has a default that a well-behaved client
    # never meets (config/edge.toml says what each answers).
    header_timeout_s: float = 10.0  # the whole request head, from its first byte: else 408
    body_grace_s: float = 10.0  # a request body may take this long whatever its rate ...
    body_min_rate: int = 1024  # ... then must average at least this many bytes/s: else 408
    max_head_bytes: int = 64 * 1024  # request line and header fields: else 431
    max_header_fields: int = 100  # else 431
    keepalive_timeout_s: float = 75.0  # an idle keep-alive connection is closed after this
    max_connections: int = 10000  # open client connections per worker; past it: 503 and close
    tcp_keepalive: bool = True  # SO_KEEPALIVE on client sockets: dead peers are found
    # After an early answer (413, 400, 401 before the body was read) the rest of the body is read
    # and dropped, for at most linger_s and max_discard_bytes, so that the client sees the answer
    # instead of a reset; then the connection is closed.
    linger_s: float = 2.0
    max_discard_bytes: int = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ModelTimeouts:
    """Per-model overrides of [upstream]'s timeouts; 0 keeps the [upstream] value."""

    connect_timeout_s: float = 0.0
    first_byte_timeout_s: float = 0.0
    idle_timeout_s: float = 0.0
    total_timeout_s: float = 0.0
    stall_timeout_s: float = 0.0


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    connect_timeout_s: float = 3.0
    # Until the first body byte (an SSE stream's first event), not just the headers: engines send
    # headers at once and then spend the prefill silently. This is the bound for a request's
    # last chance (no other host can take it); while another host can, an attempt's first byte
    # is due within first_token_factor x the host's recent time to first byte, at least
    # first_token_floor_s (and never past first_byte_timeout_s): then the request moves on.
    first_byte_timeout_s: float = 60.0
    first_token_factor: float = 4.0
    first_token_floor_s: float = 5.0
    idle_timeout_s: float = 120.0
    # After the first byte, a stream that can be continued on another host (chat and
    # completions, see [routing] continuation) counts as dead after this long without a byte;
    # other bodies wait idle_timeout_s.
    stall_timeout_s: float = 10.0
    # A non-streamed answer is read whole before anything goes to the client, up to this many
    # bytes: a host that dies mid-body is then retried whole on another host. Past it the
    # answer is relayed as it comes (committed).
    max_buffered_body_bytes: int = 1024 * 1024
    # A 429 or 503 with Retry-After holds the host out of routing that long, at most
    # retry_after_max_s; a request that no other host can serve waits for it, at most
    # retry_after_wait_s, instead of failing.
    retry_after_max_s: float = 60.0
    retry_after_wait_s: float = 10.0
    total_timeout_s: float = 0.0  # 0: none (a generation may stream for as long as it needs)
    max_attempts: int = 3
    # Retry budget: retries (attempts after a request's first) stay within retry_ratio x requests
    # over the last retry_window_s, plus retry_min_per_s x retry_window_s, so that a failing fleet
    # does not multiply its own load.
    retry_ratio: float = 0.2
    retry_window_s: float = 10.0
    retry_min_per_s: float = 1.0
    max_connections_per_server: int = 512
    # A request waits this long for a free connection slot of a saturated server; then the attempt
    # fails (not the server's fault: no outlier count) and another server is tried.
    pool_timeout_s: float = 1.0
    keepalive_s: float = 30.0
    # A larger upstream response head (1xx heads included) is a bad answer: the attempt fails like
    # a malformed one (503 when no server is left) and the connection closes.
    max_head_bytes: int = 64 * 1024
    ca_bundle: str = ""
    verify_tls: bool = True
    models: Mapping[str, ModelTimeouts] = field(
        default_factory=dict, metadata={"entry": ModelTimeouts}
    )


@dataclass(frozen=True, slots=True)
class DiscoverySettings:
    sources: tuple[str, ...] = ()
    refresh_s: float = 10.0
    timeout_s: float = 5.0
    # The last good view of every source, kept here (written atomically) so that an edge started
    # while a registry is down still routes. "auto": one file per set of sources under the
    # service manager's CACHE_DIRECTORY or STATE_DIRECTORY, else $XDG_CACHE_HOME/edge (or
    # ~/.cache/edge); "" keeps no file.
    cache_file: str = "auto"


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """Active probes: GET `path` on every server each `interval_s`."""

    enabled: bool = True
    interval_s: float = 5.0
    # "{model}" is replaced by each model the server serves (LibertAI: /health/{model} answers
    # 200 when the model is loaded, 202 when it can be loaded on demand).
    path: str = "/health"
    timeout_s: float = 2.0
    healthy_threshold: int = 2  # probes in a row that bring a down server back
    unhealthy_threshold: int = 3  # probes in a row that take a server out


@dataclass(frozen=True, slots=True)
class OutlierSettings:
    """Passive health: attempts that fail in a row eject a server for a doubling time."""

    consecutive_failures: int = 5
    base_ejection_s: float = 1.0
    max_ejection_s: float = 60.0


AUTH_MODES = ("passthrough", "keys", "none")
FAILURE_POLICIES = ("fail_open", "fail_closed")


@dataclass(frozen=True, slots=True)
class AuthSettings:
    # passthrough: the client's key goes to the hosts unchanged (LibertAI gives keys to every
    # host); keys: the edge checks keys itself and each server gets its configured key or none;
    # none: no check, and no client key reaches a host.
    mode: str = "passthrough"
    key_store: str = ""  # JSON key file, hot-reloaded; "" with redis_url keeps keys in Redis
    redis_url: str = (
        ""  # limits (and keys) shared by all workers and replicas; "" reads EDGE_REDIS_URL
    )
    failure_policy: str = "fail_open"  # Redis unreachable: serve on local limits, or answer 503
    redis_timeout_s: float = 0.25  # per Redis call, connect included: the edge never waits longer
    reload_s: float = 2.0  # how often the key store is re-checked for changes
    token_estimate: int = 1024  # reserved against tpm when a request names no max_tokens
    lease_s: float = 900.0  # a concurrency slot a crashed edge held frees itself after this
    # server URL -> the key that server gets in keys/none mode ("env:NAME" reads a variable).
    upstream_keys: Mapping[str, str] = field(default_factory=dict)
    # model -> [prompt, completion] price per million tokens, for the usage cost counter.
    prices: Mapping[str, Any] = field(default_factory=dict)


POLICIES = ("latency", "least_inflight", "round_robin", "random", "throughput", "price")


@dataclass(frozen=True, slots=True)
class Price:
    """Per million tokens, as the operator configured it for one server and model."""

    input: float = 0.0
    output: float = 0.0


@dataclass(frozen=True, slots=True)
class ModelRouting:
    """Per-model overrides of [routing]: policy "" follows routing.policy; affinity is on when
    both say so, hedging when either does."""

    policy: str = ""
    affinity: bool = True
    hedging: bool = False
    continuation: bool = True  # off when [routing] continuation is off
    # Models tried in order when every host of this one failed, or a host answered that the
    # prompt is longer than the model's context.
    fallbacks: tuple[str, ...] = ()
    # server URL -> price; servers without one sort after every priced server.
    prices: Mapping[str, Price] = field(default_factory=dict, metadata={"entry": Price})


DRAWN_SECRET = "drawn:"  # marks a cookie secret nobody configured (kept across reloads)


def _default_secret() -> str:
    # Drawn once when the config is built, before workers are spawned, so that the workers of one
    # edge agree without configuration. Replicas must share EDGE_AFFINITY_SECRET (or the setting).
    return os.environ.get("EDGE_AFFINITY_SECRET") or DRAWN_SECRET + secrets.token_hex(32)


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    policy: str = "latency"
    affinity: bool = True
    cookie_name: str = "edge_affinity"
    cookie_secret: str = field(default_factory=_default_secret, repr=False)
    cookie_max_age_s: int = 3600
    session_header: str = "X-Session-ID"
    prefix_bytes: int = 4096  # bytes of system prompt and of first user message hashed, each
    load_factor: float = 1.5  # bounded loads: an affine server takes at most c x the mean
    decay_s: float = 10.0  # a score unrefreshed for this long is ~63% back to neutral
    hedging: bool = False
    hedge_budget: float = 0.05  # hedges per request, at most
    hedge_min_delay_s: float = 0.05
    scrape: tuple[str, ...] = ()  # server URL prefixes whose /metrics are read ("*": all)
    scrape_interval_s: float = 5.0
    scrape_timeout_s: float = 2.0
    # How long a server that answered 404/405 on a dialect's path (Anthropic's, Gemini's) is
    # taken not to speak it: requests in that dialect go to it translated to OpenAI's meanwhile.
    dialect_memory_s: float = 600.0
    # A stream that breaks after its first byte (the host died, stalled or sent an error event)
    # is continued on another host from what the client already has, at most max_continuations
    # times per request; the relayed bytes are kept for it up to continuation_keep_bytes per
    # stream (past it that stream is not continued).
    continuation: bool = True
    max_continuations: int = 2
    continuation_keep_bytes: int = 1024 * 1024
    models: Mapping[str, ModelRouting] = field(
        default_factory=dict, metadata={"entry": ModelRouting}
    )


@dataclass(frozen=True, slots=True)
class LogSettings:
    """The access log: one JSON line per proxied request; never a key, a prompt or an output."""

    mode: str = "off"  # off | stdout | file
    path: str = ""  # the file, for mode = "file" (appended to; workers share it)
    sample_rate: float = 1.0  # share of successful requests logged; errors always are


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    enabled: bool = True  # off: /metrics serves only edge_build_info (routing still measures)
    # Set by the supervisor for --workers N (a fresh temp dir): each worker shares its counts
    # there, so /metrics on any worker reports the sum over all workers.
    shared_dir: str = ""
    share_interval_s: float = 1.0


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """[tracing]: OpenTelemetry spans of each request and attempt, exported over OTLP/HTTP
    (protobuf) by a batch processor off the request's path (edge/observe/tracing.py). Off by
    default; W3C trace context passes through either way. Unset values (-1, "", 0) fall back to
    the standard OTEL_* variables, then to the SDK's defaults."""

    enabled: bool = False
    # Share of requests without a sampled parent that are traced (TraceIdRatioBased: decided
    # from the trace id); -1: OTEL_TRACES_SAMPLER(_ARG), else 1.0.
    sample_ratio: float = -1.0
    # A client's sampled traceparent is traced whatever the ratio, an unsampled one not at all
    # (parent-based, OpenTelemetry's default); false: the ratio decides from its trace id.
    parent_based: bool = True
    service_name: str = ""  # "": OTEL_SERVICE_NAME, else "edge"
    # The collector's OTLP/HTTP base URL (http://collector:4318; /v1/traces is appended), else
    # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT, else localhost:4318.
    endpoint: str = ""
    # The batch processor's bounds (0: OTEL_BSP_*, else the SDK's 2048, 512, 5 s, 30 s): spans
    # past a full queue are dropped, never waited for.
    max_queue_size: int = 0
    max_export_batch_size: int = 0
    schedule_delay_s: float = 0.0
    export_timeout_s: float = 0.0
    # The drain waits this long at most for the last spans to be exported (a collector down
    # must not hold a restart).
    flush_timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class ModelAdmission:
    """Per-model overrides of [admission]; 0 keeps the [admission] value."""

    capacity: int = 0  # requests each host of the model runs at once
    queue_length: int = 0
    deadline_ms: int = 0


@dataclass(frozen=True, slots=True)
class AdmissionSettings:
    """[admission]: capacity per host, the queue at the edge, fair shares, priorities and
    deadlines (edge/routing/admission.py). Off (today's behaviour) until a capacity is set."""

    # server URL prefix ("*": all) -> requests each of those servers runs at once.
    servers: Mapping[str, int] = field(default_factory=dict)
    models: Mapping[str, ModelAdmission] = field(
        default_factory=dict, metadata={"entry": ModelAdmission}
    )
    # Learn capacity from the engines' own /metrics (the servers routing.scrape names).
    engine_metrics: bool = False
    kv_full: float = 0.95  # an engine's KV-cache usage ratio taken as full
    queue_length: int = 1000  # waiters per model
    deadline_ms: int = 30000  # how long a request waits by default (X-Edge-Deadline-Ms)
    max_deadline_ms: int = 300000
    default_priority: int = 5  # 0..9 (X-Edge-Priority; low = 0, normal = 5, high = 9)
    max_priority: int = 5  # the cap for a request whose key sets none
    # workspace or key id -> its share of a saturated fleet (default 1): plans.
    weights: Mapping[str, float] = field(default_factory=dict)
    replicas: int = 1  # edge replicas sharing the fleet: each takes capacity // replicas
    recheck_ms: int = 20  # queued requests re-check capacity (other workers' releases)

    @property
    def enabled(self) -> bool:
        return bool(self.servers or self.engine_metrics) or any(
            m.capacity for m in self.models.values()
        )


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    outlier: OutlierSettings = field(default_factory=OutlierSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    log: LogSettings = field(default_factory=LogSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    # model id -> server URLs named in the config file itself.
    static: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # server URL prefix -> the dialects those servers speak ([dialects]); others are learnt.
    dialects: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "upstream": UpstreamSettings,
    "discovery": DiscoverySettings,
    "health": HealthSettings,
    "outlier": OutlierSettings,
    "auth": AuthSettings,
    "routing": RoutingSettings,
    "log": LogSettings,
    "metrics": MetricsSettings,
    "tracing": TracingSettings,
    "admission": AdmissionSettings,
}


def load(path: str | Path | None = None, **overrides: Any) -> Config:
    """Read the TOML file (if any), apply flag overrides (`section__name=value`), validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
    return from_mapping(raw, **overrides)


def from_mapping(raw: Mapping[str, Any], **overrides: Any) -> Config:
    unknown = set(raw) - set(_SECTIONS) - {"models", "dialects"}
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
    sections = {name: _section(cls, name, raw.get(name, {})) for name, cls in _SECTIONS.items()}
    for key, value in overrides.items():
        if value is None:
            continue
        name, _, setting = key.partition("__")
        sections[name] = _replace(sections[name], name, setting, value)
    if not sections["auth"].redis_url and os.environ.get("EDGE_REDIS_URL"):
        # The URL may carry a password: deployments keep it in a secret, not the config file.
        sections["auth"] = dataclasses.replace(
            sections["auth"], redis_url=os.environ["EDGE_REDIS_URL"]
        )
    config = Config(
        static=_static_models(raw.get("models", {})),
        dialects=_dialects(raw.get("dialects", {})),
        **sections,
    )
    validate(config)
    return config


def _section(cls: type[Any], name: str, values: Any) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{name}] must be a table")
    obj = cls()
    for key, value in values.items():
        obj = _replace(obj, name, key, value)
    return obj


def _replace(obj: Any, section: str, key: str, value: Any) -> Any:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if key not in fields:
        raise ConfigError(f"unknown setting {section}.{key}")
    current = getattr(obj, key)
    if isinstance(current, tuple):
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{section}.{key} must be a list of strings")
        value = tuple(value)
    elif isinstance(current, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"[{section}.{key}] must be a table")
        value = dict(value)
        entry = fields[key].metadata.get("entry")  # a dataclass: each value is one such table
        if entry is not None:
            value = {k: _section(entry, f'{section}.{key}."{k}"', v) for k, v in value.items()}
    elif isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{section}.{key} must be true or false")
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif type(value) is not type(current):
        raise ConfigError(f"{section}.{key} must be a {type(current).__name__}")
    return dataclasses.replace(obj, **{key: value})


def _static_models(models: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(models, Mapping):
        raise ConfigError("[models] must be a table of model ids")
    out: dict[str, tuple[str, ...]] = {}
    for model, entry in models.items():
        servers = entry.get("servers") if isinstance(entry, Mapping) else None
        if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers):
            raise ConfigError(f'models."{model}".servers must be a list of URLs')
        out[model] = tuple(servers)
    return out


DIALECTS: Final = ("openai", "anthropic", "gemini")


def _dialects(table: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(table, Mapping):
        raise ConfigError("[dialects] must be a table of server URL prefixes")
    out: dict[str, tuple[str, ...]] = {}
    for prefix, spoken in table.items():
        if not isinstance(spoken, list) or not spoken or any(d not in DIALECTS for d in spoken):
            raise ConfigError(
                f'dialects."{prefix}" must be a non-empty list of: {", ".join(DIALECTS)}'
            )
        out[prefix] = tuple(spoken)
    return out


def validate(config: Config) -> None:
    s, u, d = config.server, config.upstream, config.discovery
    checks = [
        (0 <= s.port <= 65535, "server.port must be 0..65535"),
        (1 <= s.workers <= 256, "server.workers must be 1..256"),
        (s.max_body_bytes >= 1024, "server.max_body_bytes must be at least 1024"),
        (s.drain_timeout_s >= 0, "server.drain_timeout_s must be >= 0"),
        (
            s.header_timeout_s > 0 and s.body_grace_s > 0 and s.keepalive_timeout_s > 0,
            "server.header_timeout_s, body_grace_s and keepalive_timeout_s must be > 0",
        ),
        (
            s.body_min_rate >= 0 and s.linger_s >= 0 and s.max_discard_bytes >= 0,
            "server.body_min_rate, linger_s and max_discard_bytes must be >= 0",
        ),
        (s.max_head_bytes >= 1024, "server.max_head_bytes must be at least 1024"),
        (s.max_header_fields >= 8, "server.max_header_fields must be at least 8"),
        (s.max_connections >= 1, "server.max_connections must be >= 1"),
        (u.pool_timeout_s > 0, "upstream.pool_timeout_s must be > 0"),
        (u.max_head_bytes >= 1024, "upstream.max_head_bytes must be at least 1024"),
        (u.connect_timeout_s > 0, "upstream.connect_timeout_s must be > 0"),
        (u.first_byte_timeout_s > 0, "upstream.first_byte_timeout_s must be > 0"),
        (u.idle_timeout_s > 0, "upstream.idle_timeout_s must be > 0"),
        (1 <= u.max_attempts <= 10, "upstream.max_attempts must be 1..10"),
        (u.stall_timeout_s > 0, "upstream.stall_timeout_s must be > 0"),
        (
            u.first_token_factor >= 1 and u.first_token_floor_s > 0,
            "upstream.first_token_factor must be >= 1 and first_token_floor_s > 0",
        ),
        (u.max_buffered_body_bytes >= 0, "upstream.max_buffered_body_bytes must be >= 0"),
        (
            u.retry_after_max_s >= 0 and u.retry_after_wait_s >= 0,
            "upstream.retry_after_max_s and retry_after_wait_s must be >= 0",
        ),
        (u.max_connections_per_server >= 1, "upstream.max_connections_per_server must be >= 1"),
        (d.refresh_s > 0, "discovery.refresh_s must be > 0"),
    ]
    checks += _observability_checks(config.log, config.metrics)
    checks += _failover_checks(config)
    checks += _tracing_checks(config.tracing)
    checks += _admission_checks(config.admission)
    for ok, message in checks + _auth_checks(config.auth) + _routing_checks(config.routing):
        if not ok:
            raise ConfigError(message)


def _auth_checks(a: AuthSettings) -> list[tuple[bool, str]]:
    prices = a.prices.values()
    return [
        (a.mode in AUTH_MODES, f"auth.mode must be one of {', '.join(AUTH_MODES)}"),
        (a.failure_policy in FAILURE_POLICIES, "auth.failure_policy: fail_open or fail_closed"),
        (a.mode != "keys" or bool(a.key_store or a.redis_url),
         "auth.mode = keys needs auth.key_store or auth.redis_url"),
        (not a.redis_url or a.redis_url.startswith(("redis://", "rediss://", "unix://")),
         "auth.redis_url must be a redis://, rediss:// or unix:// URL"),
        (a.redis_timeout_s > 0 and a.reload_s > 0 and a.lease_s > 0,
         "auth.redis_timeout_s, auth.reload_s and auth.lease_s must be > 0"),
        (a.token_estimate >= 0, "auth.token_estimate must be >= 0"),
        (all(isinstance(v, str) and v for v in a.upstream_keys.values()),
         "auth.upstream_keys maps server URLs to non-empty strings"),
        (all(isinstance(v, list) and len(v) == 2 and all(_price(x) for x in v) for v in prices),
         "auth.prices maps models to [prompt, completion] prices per million tokens (>= 0)"),
    ]  # fmt: skip


def _price(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _routing_checks(r: RoutingSettings) -> list[tuple[bool, str]]:
    policies = [r.policy] + [m.policy for m in r.models.values() if m.policy]
    prices = [p for m in r.models.values() for p in m.prices.values()]
    return [
        (all(p in POLICIES for p in policies), f"routing policies: {', '.join(POLICIES)}"),
        (bool(r.cookie_name) and all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in r.cookie_name),
         "routing.cookie_name must be a cookie token (letters, digits, -_.)"),
        (len(r.cookie_secret) >= 16, "routing.cookie_secret must be at least 16 characters"),
        (r.cookie_max_age_s > 0, "routing.cookie_max_age_s must be > 0"),
        (bool(r.session_header), "routing.session_header must not be empty"),
        (r.prefix_bytes >= 64, "routing.prefix_bytes must be >= 64"),
        (r.load_factor >= 1.0, "routing.load_factor must be >= 1"),
        (r.decay_s > 0 and r.scrape_interval_s > 0 and r.scrape_timeout_s > 0,
         "routing.decay_s, scrape_interval_s and scrape_timeout_s must be > 0"),
        (r.dialect_memory_s > 0, "routing.dialect_memory_s must be > 0"),
        (0 <= r.max_continuations <= 10, "routing.max_continuations must be 0..10"),
        (r.continuation_keep_bytes >= 0, "routing.continuation_keep_bytes must be >= 0"),
        (all(m not in ms.fallbacks for m, ms in r.models.items()),
         "routing.models.*.fallbacks must not name the model itself"),
        (0.0 <= r.hedge_budget <= 1.0, "routing.hedge_budget must be 0..1"),
        (r.hedge_min_delay_s >= 0, "routing.hedge_min_delay_s must be >= 0"),
        (all(p.input >= 0 and p.output >= 0 for p in prices), "routing prices must be >= 0"),
    ]  # fmt: skip


def _admission_checks(a: AdmissionSettings) -> list[tuple[bool, str]]:
    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    weights = a.weights.values()
    per_model = [v for m in a.models.values() for v in (m.capacity, m.queue_length, m.deadline_ms)]
    return [
        (all(count(v) for v in a.servers.values()),
         "admission.servers maps server URL prefixes to capacities (integers >= 0)"),
        (all(v >= 0 for v in per_model), "admission.models.* values must be >= 0"),
        (all(_price(w) and w > 0 for w in weights), "admission.weights must be numbers > 0"),
        (0 < a.kv_full <= 1, "admission.kv_full must be within (0, 1]"),
        (a.queue_length >= 0, "admission.queue_length must be >= 0"),
        (0 < a.deadline_ms <= a.max_deadline_ms,
         "admission: 0 < deadline_ms <= max_deadline_ms"),
        (0 <= a.default_priority <= 9 and 0 <= a.max_priority <= 9,
         "admission.default_priority and max_priority must be 0..9"),
        (a.replicas >= 1, "admission.replicas must be >= 1"),
        (a.recheck_ms >= 1, "admission.recheck_ms must be >= 1"),
    ]  # fmt: skip


def _tracing_checks(t: TracingSettings) -> list[tuple[bool, str]]:
    bounds = (t.max_queue_size, t.max_export_batch_size, t.schedule_delay_s, t.export_timeout_s)
    return [
        (t.sample_ratio == -1.0 or 0.0 <= t.sample_ratio <= 1.0,
         "tracing.sample_ratio must be within [0, 1] (or -1: OTEL_TRACES_SAMPLER_ARG)"),
        (all(v >= 0 for v in bounds), "tracing queue, batch and delays must be >= 0"),
        (t.flush_timeout_s > 0, "tracing.flush_timeout_s must be > 0"),
        (not t.endpoint or t.endpoint.startswith(("http://", "https://")),
         "tracing.endpoint must be an http:// or https:// URL (OTLP/HTTP)"),
    ]  # fmt: skip


def _observability_checks(log: LogSettings, m: MetricsSettings) -> list[tuple[bool, str]]:
    return [
        (log.mode in ("off", "stdout", "file"), "log.mode must be off, stdout or file"),
        (log.mode != "file" or bool(log.path), "log.mode = file needs log.path"),
        (0.0 <= log.sample_rate <= 1.0, "log.sample_rate must be within [0, 1]"),
        (m.share_interval_s > 0, "metrics.share_interval_s must be > 0"),
    ]


def _failover_checks(config: Config) -> list[tuple[bool, str]]:
    u, h, o = config.upstream, config.health, config.outlier
    per_model = [v for m in u.models.values() for v in dataclasses.astuple(m)]
    return [
        (u.total_timeout_s >= 0 and all(v >= 0 for v in per_model),
         "upstream timeouts must be >= 0 (0 in upstream.models keeps the [upstream] value)"),
        (u.retry_ratio >= 0 and u.retry_min_per_s >= 0, "upstream.retry_* must be >= 0"),
        (u.retry_window_s > 0, "upstream.retry_window_s must be > 0"),
        (h.interval_s > 0 and h.timeout_s > 0, "health.interval_s and timeout_s must be > 0"),
        (h.path.startswith("/"), "health.path must start with /"),
        (h.healthy_threshold >= 1 and h.unhealthy_threshold >= 1,
         "health thresholds must be >= 1"),
        (o.consecutive_failures >= 1, "outlier.consecutive_failures must be >= 1"),
        (0 < o.base_ejection_s <= o.max_ejection_s,
         "outlier: 0 < base_ejection_s <= max_ejection_s"),
    ]  # fmt: skip

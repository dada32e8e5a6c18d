"""The transports' keyword settings -> the edge's own Config, validated by the same code.

`transport(sources=[...], policy="latency", probes=True, max_attempts=2)`: a flat name is a
setting of the one section of the config that has it ([routing], [upstream], [discovery],
[health], [outlier]); a name two sections share (`timeout_s`, `models`) is spelled
`section__name`, as the config's own overrides are. A few names are the library's own. Unknown
names are a TypeError, as for any function; bad values the config's ConfigError (a ValueError).

What differs from `edge serve`'s defaults, and why: active probes are off (`probes=False`), so
that every user process does not probe every host every few seconds; passive outlier ejection,
which costs no request, stays on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from edge.config import Config, ConfigError, from_mapping, load, validate
from edge.routing.fleet import normalise_url

# Sections whose settings the library reads; [server], [auth], [log], [metrics] are the server's.
SECTIONS: Final = ("routing", "upstream", "discovery", "health", "outlier")
# The library's own settings (not the config's), with their defaults.
FIRST_VIEW_TIMEOUT_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class DirectSettings:
    """Everything one transport routes by: the edge's Config and the library's own few."""

    config: Config
    # model -> the only hosts (normalised URLs) its requests may go to: a TEE host, say. Never
    # a host discovery does not list: a pin to one it does not list finds no server.
    pins: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # The first request waits this long, at most, for the first view of the fleet.
    first_view_timeout_s: float = FIRST_VIEW_TIMEOUT_S


def _flat_names() -> dict[str, str]:
    """setting name -> its section, for the names exactly one section has."""
    seen: dict[str, list[str]] = {}
    defaults = Config()
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(defaults, section)):
            seen.setdefault(f.name, []).append(section)
    return {name: owners[0] for name, owners in seen.items() if len(owners) == 1}


FLAT: Final = _flat_names()
ALIASES: Final = {"probes": "health__enabled", "probe_interval_s": "health__interval_s"}


def settings_from(
    sources: Sequence[str] = (),
    models: Mapping[str, Sequence[str]] | None = None,
    config: Config | str | Path | None = None,
    pins: Mapping[str, Sequence[str]] | None = None,
    first_view_timeout_s: float = FIRST_VIEW_TIMEOUT_S,
    **settings: Any,
) -> DirectSettings:
    """The transports' keywords, validated. `sources`: registry URLs (.../libertai/models) or
    JSON files; `models`: static servers {model: [url, ...]}; `config`: a Config or the path of
    an edge TOML file, the other keywords applied over it."""
    overrides: dict[str, Any] = {"health__enabled": False} if config is None else {}
    for name, value in settings.items():
        overrides[_override_name(name)] = value
    if sources:
        if isinstance(sources, str):
            raise TypeError("sources must be a list of registry URLs or files, not one string")
        overrides["discovery__sources"] = tuple(sources)
    raw = {"models": {m: {"servers": list(urls)} for m, urls in (models or {}).items()}}
    if isinstance(config, Config):
        built = _over(config, overrides)
        if models:
            built = dataclasses.replace(built, static=from_mapping(raw).static)
    elif config is not None:
        built = load(config, **overrides)
    else:
        built = from_mapping(raw, **overrides)
    if not built.discovery.sources and not built.static:
        raise ConfigError("edge.direct needs sources=[...] (registries or files) or models={...}")
    if first_view_timeout_s < 0:
        raise ConfigError("first_view_timeout_s must be >= 0")
    return DirectSettings(built, _pins(pins or {}), float(first_view_timeout_s))


def _override_name(name: str) -> str:
    if name in ALIASES:
        return ALIASES[name]
    section, sep, setting = name.partition("__")
    if sep and section in SECTIONS and setting:
        return name
    owner = FLAT.get(name)
    if owner is None:
        raise TypeError(f"edge.direct: unknown setting {name!r}")
    return f"{owner}__{name}"


def _over(config: Config, overrides: Mapping[str, Any]) -> Config:
    """`config` with `section__name` overrides, each checked by the config's own rules."""
    fresh = from_mapping({}, **overrides)  # each value's type, as the config checks them
    changed: dict[str, dict[str, Any]] = {}
    for key in overrides:
        section, _, name = key.partition("__")
        changed.setdefault(section, {})[name] = getattr(getattr(fresh, section), name)
    replaced = {s: dataclasses.replace(getattr(config, s), **v) for s, v in changed.items()}
    built = dataclasses.replace(config, **replaced)
    validate(built)
    return built


def _pins(pins: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for model, urls in pins.items():
        if isinstance(urls, str) or not urls:
            raise ConfigError(f"pins[{model!r}] must be a non-empty list of server URLs")
        try:
            out[model] = tuple(normalise_url(u) for u in urls)
        except ValueError as exc:
            raise ConfigError(f"pins[{model!r}]: {exc}") from None
    return out

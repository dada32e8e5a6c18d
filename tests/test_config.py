"""config/edge.toml is the documented example: every setting of every section, at its default.

A setting added to edge/config.py without a line in the example fails here, and so does a default
changed in one place and not the other. Bad values are refused with an error naming the setting.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from edge.config import Config, ConfigError, from_mapping, load

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "edge.toml"
# Settings with no fixed default: documented in the example, never given a value there.
SECRETS = {("routing", "cookie_secret")}
# A commented-out example table: `# [table]` and the `# key = value` lines right below it.
_EXAMPLE_LINE = re.compile(r'^# (\[[^\]]+\]|(?:[A-Za-z_][\w-]*|"[^"]+") = .+)$')


def sections(config: Config) -> dict[str, Any]:
    """Section name -> its settings dataclass ([models] is `static`, and [dialects] a table of
    server URL prefixes: neither is a settings section)."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in ("static", "dialects")
    }


def without_secrets(config: Config) -> Config:
    routing = dataclasses.replace(config.routing, cookie_secret="")
    return dataclasses.replace(config, routing=routing)


def commented_examples(text: str) -> dict[str, Any]:
    """The tables the example shows commented out, uncommented and parsed."""
    lines: list[str] = []
    in_block = False
    for line in text.splitlines():
        match = _EXAMPLE_LINE.match(line)
        starts = match is not None and match.group(1).startswith("[")
        in_block = starts or (in_block and match is not None)
        if in_block:
            lines.append(line[2:])
    return tomllib.loads("\n".join(lines))


def undocumented(cls: type[Any], shown: list[Mapping[str, Any]], where: str) -> list[str]:
    """Fields of `cls` that none of the `shown` tables names, recursing into per-entry tables."""
    missing = []
    for f in dataclasses.fields(cls):
        values = [table[f.name] for table in shown if f.name in table]
        if not values:
            missing.append(f"{where}.{f.name}")
        entry = f.metadata.get("entry")
        if entry is not None and values:
            entries = [e for value in values for e in value.values()]
            missing += undocumented(entry, entries, f'{where}.{f.name}."*"')
    return missing


def test_example_sets_every_setting_to_its_default():
    example, defaults = load(EXAMPLE), from_mapping({})
    for name, settings in sections(without_secrets(example)).items():
        assert settings == sections(without_secrets(defaults))[name], f"[{name}] drifted"
    assert example.static == {} and example.dialects == {}
    assert without_secrets(example) == without_secrets(defaults)
    assert '# [dialects]\n# "http://10.0.1." = ["openai"]' in EXAMPLE.read_text(encoding="utf-8")


def test_every_setting_is_documented_in_the_example():
    text = EXAMPLE.read_text(encoding="utf-8")
    given, shown = tomllib.loads(text), commented_examples(text)
    missing: list[str] = []
    for name, settings in sections(from_mapping({})).items():
        assert name in given, f"[{name}] is missing from {EXAMPLE.name}"
        here, examples = given[name], shown.get(name, {})
        for f in dataclasses.fields(settings):
            if (name, f.name) in SECRETS:
                if f.name in here or not re.search(rf"^# {f.name} = ", text, re.MULTILINE):
                    missing.append(f"{name}.{f.name} (commented out, never given: a secret)")
            elif not isinstance(getattr(settings, f.name), Mapping):
                if f.name not in here:
                    missing.append(f"{name}.{f.name}")
            elif f.name not in examples:
                missing.append(f"[{name}.{f.name}] (as a commented-out example table)")
            entry = f.metadata.get("entry")
            if entry is not None:
                # Per-model tables: every field of their entries is shown at least once.
                tables = [*here.get(f.name, {}).values(), *examples.get(f.name, {}).values()]
                missing += undocumented(entry, tables, f'{name}.{f.name}."*"')
    assert not missing, f"undocumented in {EXAMPLE.name}: {missing}"


def test_example_tables_shown_commented_out_are_valid_config():
    shown = commented_examples(EXAMPLE.read_text(encoding="utf-8"))
    assert {"upstream", "auth", "routing", "models"} <= set(shown)
    config = from_mapping(shown)
    assert config.upstream.models["qwen3.6-27b"].first_byte_timeout_s == 300.0
    routing = config.routing.models["hermes-3-8b-tee"]
    assert routing.policy == "price" and len(routing.prices) == 2
    assert config.auth.prices == {"hermes-3-8b-tee": [0.1, 0.3]}
    assert config.static == {"hermes-3-8b-tee": ("https://hermes-3-8b-2.tee.models.libertai.io",)}


def test_cookie_secret_comes_from_the_environment_not_the_example(monkeypatch):
    assert "cookie_secret" not in tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))["routing"]
    assert "EDGE_AFFINITY_SECRET" in EXAMPLE.read_text(encoding="utf-8")
    monkeypatch.setenv("EDGE_AFFINITY_SECRET", "shared-by-every-replica")
    assert load(EXAMPLE).routing.cookie_secret == "shared-by-every-replica"
    monkeypatch.delenv("EDGE_AFFINITY_SECRET")
    # Without it, each edge draws its own: two loads disagree (so replicas would too).
    assert load(EXAMPLE).routing.cookie_secret != load(EXAMPLE).routing.cookie_secret


BAD: list[tuple[dict[str, Any], tuple[str, ...]]] = [
    ({"server": {"port": 70000}}, ("server.port",)),
    ({"server": {"workers": 0}}, ("server.workers",)),
    ({"server": {"max_body_bytes": 100}}, ("server.max_body_bytes",)),
    ({"server": {"drain_timeout_s": -1}}, ("server.drain_timeout_s",)),
    ({"server": {"expose_server": "yes"}}, ("server.expose_server",)),
    ({"upstream": {"connect_timeout_s": 0}}, ("upstream.connect_timeout_s",)),
    ({"upstream": {"first_byte_timeout_s": "120"}}, ("upstream.first_byte_timeout_s",)),
    ({"upstream": {"max_attempts": 11}}, ("upstream.max_attempts",)),
    ({"upstream": {"retry_window_s": 0}}, ("upstream.retry_window_s",)),
    ({"upstream": {"max_connections_per_server": 0}}, ("upstream.max_connections_per_server",)),
    ({"upstream": {"models": {"m": {"idle_timeout_s": -1}}}}, ("upstream.models",)),
    ({"upstream": {"models": {"m": {"read_timeout_s": 1}}}}, ('upstream.models."m".read_',)),
    ({"discovery": {"refresh_s": 0}}, ("discovery.refresh_s",)),
    ({"discovery": {"sources": "https://registry"}}, ("discovery.sources",)),
    ({"discovery": {"cache_file": 1}}, ("discovery.cache_file",)),
    ({"health": {"enabled": 1}}, ("health.enabled",)),
    ({"health": {"interval_s": 0}}, ("health.interval_s",)),
    ({"health": {"path": "health"}}, ("health.path",)),
    ({"health": {"unhealthy_threshold": 1.5}}, ("health.unhealthy_threshold",)),
    ({"outlier": {"consecutive_failures": 0}}, ("outlier.consecutive_failures",)),
    ({"outlier": {"base_ejection_s": 120}}, ("outlier", "base_ejection_s", "max_ejection_s")),
    ({"auth": {"mode": "open"}}, ("auth.mode",)),
    ({"auth": {"mode": "keys"}}, ("auth.mode", "auth.key_store", "auth.redis_url")),
    ({"auth": {"redis_url": "http://redis:6379"}}, ("auth.redis_url",)),
    ({"auth": {"failure_policy": "maybe"}}, ("auth.failure_policy",)),
    ({"auth": {"lease_s": 0}}, ("auth.lease_s",)),
    ({"auth": {"token_estimate": -1}}, ("auth.token_estimate",)),
    ({"auth": {"upstream_keys": {"https://h": ""}}}, ("auth.upstream_keys",)),
    ({"auth": {"prices": {"m": [0.1]}}}, ("auth.prices",)),
    ({"routing": {"affinity": "on"}}, ("routing.affinity",)),
    ({"routing": {"cookie_name": "edge affinity"}}, ("routing.cookie_name",)),
    ({"routing": {"cookie_max_age_s": 0}}, ("routing.cookie_max_age_s",)),
    ({"routing": {"session_header": ""}}, ("routing.session_header",)),
    ({"routing": {"prefix_bytes": 8}}, ("routing.prefix_bytes",)),
    ({"routing": {"load_factor": 0.5}}, ("routing.load_factor",)),
    ({"routing": {"hedge_budget": 2.0}}, ("routing.hedge_budget",)),
    ({"routing": {"scrape": "*"}}, ("routing.scrape",)),
    ({"routing": {"models": {"m": {"hedging": "yes"}}}}, ('routing.models."m".hedging',)),
    (
        {"routing": {"models": {"m": {"prices": {"https://h": {"input": -1}}}}}},
        ("routing", "price"),
    ),
    ({"routing": {"polcy": "latency"}}, ("routing.polcy",)),
    ({"log": {"mode": "syslog"}}, ("log.mode",)),
    ({"log": {"mode": "file"}}, ("log.mode", "log.path")),
    ({"log": {"sample_rate": 1.5}}, ("log.sample_rate",)),
    ({"metrics": {"enabled": "no"}}, ("metrics.enabled",)),
    ({"metrics": {"share_interval_s": 0}}, ("metrics.share_interval_s",)),
    ({"limits": {}}, ("limits",)),
]


@pytest.mark.parametrize(("raw", "named"), BAD, ids=[repr(raw) for raw, _ in BAD])
def test_bad_values_are_refused_naming_the_setting(raw: dict[str, Any], named: tuple[str, ...]):
    with pytest.raises(ConfigError) as refused:
        from_mapping(raw)
    for name in named:
        assert name in str(refused.value)


def test_a_short_cookie_secret_is_refused_without_being_echoed():
    for refuse in (
        lambda: from_mapping({"routing": {"cookie_secret": "hunter2"}}),
        lambda: from_mapping({}, routing__cookie_secret="hunter2"),
    ):
        with pytest.raises(ConfigError, match=r"routing\.cookie_secret") as refused:
            refuse()
        assert "hunter2" not in str(refused.value)


def test_an_unreadable_config_file_is_refused_naming_it(tmp_path: Path):
    broken, missing = tmp_path / "broken.toml", tmp_path / "missing.toml"
    broken.write_text("[server\nport = 1\n", encoding="utf-8")
    for path in (broken, missing):
        with pytest.raises(ConfigError, match="cannot read config") as refused:
            load(path)
        assert str(path) in str(refused.value)


def test_redis_url_comes_from_the_environment_when_the_file_leaves_it_empty(monkeypatch):
    monkeypatch.setenv("EDGE_REDIS_URL", "redis://:pw@127.0.0.1:6390/0")
    assert from_mapping({}).auth.redis_url == "redis://:pw@127.0.0.1:6390/0"
    assert load(EXAMPLE).auth.redis_url == "redis://:pw@127.0.0.1:6390/0"
    configured = from_mapping({"auth": {"redis_url": "redis://127.0.0.1:1/0"}})
    assert configured.auth.redis_url == "redis://127.0.0.1:1/0"  # the file wins when it names one


def test_dialects_table_names_known_apis_per_server_prefix():
    config = from_mapping({"dialects": {"http://10.0.1.": ["openai"]}})
    assert config.dialects == {"http://10.0.1.": ("openai",)}
    bads: list[Any] = [{"http://a": "openai"}, {"http://a": []}, {"http://a": ["grpc"]}, []]
    for bad in bads:
        with pytest.raises(ConfigError, match="dialects"):
            from_mapping({"dialects": bad})
    with pytest.raises(ConfigError, match="dialect_memory_s"):
        from_mapping({"routing": {"dialect_memory_s": 0.0}})

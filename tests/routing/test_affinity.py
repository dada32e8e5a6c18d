"""Affinity units: cookie signing and issuing, affinity keys per dialect, rendezvous hashing."""

from __future__ import annotations

import base64
import random
from collections import Counter
from types import SimpleNamespace

import pytest

from edge.routing.affinity import (
    MAX_IDS,
    CookieCodec,
    CookieIssuer,
    HostIds,
    affinity_key,
    cookie_value,
    host_id,
    prefix_material,
    ranked,
    set_cookie,
    weight,
)

NOW = 1_700_000_000.0
SECRET = "s3cret-s3cret-s3cret"


def test_cookie_round_trip_keeps_ids_in_order():
    codec = CookieCodec(SECRET, max_age_s=600)
    ids = (host_id("http://a:1"), host_id("http://b:2"))
    value = codec.encode(ids, NOW)
    assert codec.decode(value, NOW + 599) == ids
    assert set(value) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_cookie_holds_at_most_max_ids():
    codec = CookieCodec(SECRET, max_age_s=600)
    ids = tuple(host_id(f"http://h{i}") for i in range(MAX_IDS + 3))
    assert codec.decode(codec.encode(ids, NOW), NOW) == ids[:MAX_IDS]


def test_expired_cookie_is_ignored():
    codec = CookieCodec(SECRET, max_age_s=600)
    value = codec.encode((host_id("http://a:1"),), NOW)
    assert codec.decode(value, NOW + 600) == ()


def test_other_secret_or_tampered_cookie_is_ignored():
    codec = CookieCodec(SECRET, max_age_s=600)
    value = codec.encode((host_id("http://a:1"),), NOW)
    assert CookieCodec("another-secret-entirely", 600).decode(value, NOW) == ()
    raw = bytearray(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    for index in (0, 3, 6, len(raw) - 1):  # version, expiry, id, mac
        forged = bytearray(raw)
        forged[index] ^= 0x01
        text = base64.urlsafe_b64encode(bytes(forged)).rstrip(b"=").decode()
        assert codec.decode(text, NOW) == (), index


@pytest.mark.parametrize(
    "value", ["", "x", "!!!!", "A" * 500, "AAAA", "a.b.c", base64.b64encode(b"\0" * 40).decode()]
)
def test_garbage_cookie_decodes_to_nothing(value):
    assert CookieCodec(SECRET, 600).decode(value, NOW) == ()


def test_cookie_header_parsing_and_set_cookie_attributes():
    header = 'a=1; edge_affinity=VALUE; other="x"'
    assert cookie_value(header, "edge_affinity") == "VALUE"
    assert cookie_value(header, "missing") is None
    assert cookie_value(None, "edge_affinity") is None
    assert cookie_value("xedge_affinity=1", "edge_affinity") is None
    plain = set_cookie("edge_affinity", "V", 60, secure=False)
    assert plain == "edge_affinity=V; Max-Age=60; Path=/; HttpOnly; SameSite=Lax"
    assert set_cookie("edge_affinity", "V", 60, secure=True).endswith("; Secure")


class Wall:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def test_issued_cookie_names_the_host_that_answered_first_then_the_others_held():
    codec, wall = CookieCodec(SECRET, max_age_s=600), Wall()
    issuer = CookieIssuer(codec, "edge_affinity", HostIds(), wall)
    a, b, c = (host_id(f"http://{n}:1") for n in "abc")
    issued = issuer.issue("http://b:1", (a, b, c), secure=False)
    name, value = issued.split(";", 1)[0].split("=", 1)
    assert name == "edge_affinity" and codec.decode(value, NOW + 599) == (b, a, c)
    assert codec.decode(value, NOW + 600) == ()  # expires max_age after the second it was signed
    assert issued.endswith("SameSite=Lax") and "Max-Age=600" in issued
    only = issuer.issue("http://a:1", (), secure=True)
    assert only.endswith("; Secure") and codec.decode(only.split(";")[0][14:], NOW) == (a,)


def test_issued_cookies_are_signed_once_per_second_and_value():
    wall = Wall()
    issuer = CookieIssuer(CookieCodec(SECRET, 600), "edge_affinity", HostIds(), wall)
    first = issuer.issue("http://a:1", (), secure=False)
    wall.now += 0.9
    assert issuer.issue("http://a:1", (), secure=False) is first  # cached: no HMAC
    assert issuer.issue("http://a:1", (), secure=True) != first  # Secure is part of the key
    assert issuer.issue("http://b:1", (), secure=False) != first
    wall.now += 0.1  # the next second: a later expiry, so signed again
    assert issuer.issue("http://a:1", (), secure=False) != first
    assert "cached=1" in repr(issuer)  # the old second's values were dropped


# --- keys -----------------------------------------------------------------------------------

SYSTEM = "You are terse."


def openai_turns():
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "first"}]
    yield {"model": "m", "messages": list(history)}
    history += [{"role": "assistant", "content": "a1"}, {"role": "user", "content": "second"}]
    yield {"model": "m", "messages": list(history)}


def anthropic_turns():
    history = [{"role": "user", "content": [{"type": "text", "text": "first"}]}]
    yield {"model": "m", "system": SYSTEM, "messages": list(history)}
    history += [{"role": "assistant", "content": "a1"}, {"role": "user", "content": "second"}]
    yield {"model": "m", "system": SYSTEM, "messages": list(history)}


def gemini_turns():
    history = [{"role": "user", "parts": [{"text": "first"}]}]
    system = {"parts": [{"text": SYSTEM}]}
    yield {"systemInstruction": system, "contents": list(history)}
    history += [{"role": "model", "parts": [{"text": "a1"}]}, {"parts": [{"text": "second"}]}]
    yield {"systemInstruction": system, "contents": list(history)}


@pytest.mark.parametrize("turns", [openai_turns, anthropic_turns, gemini_turns])
def test_prefix_key_is_stable_as_history_grows(turns):
    first, second = (affinity_key(doc, None, 4096) for doc in turns())
    assert first is not None and first[0] == "prefix"
    assert first == second


@pytest.mark.parametrize("turns", [openai_turns, anthropic_turns, gemini_turns])
def test_prefix_key_differs_by_first_message_and_system(turns):
    docs = list(turns())
    base = affinity_key(docs[0], None, 4096)
    changed = repr(docs[0]).replace("first", "other")
    assert affinity_key(eval(changed), None, 4096) != base  # noqa: S307 - test data only
    assert affinity_key(eval(repr(docs[0]).replace("terse", "wordy")), None, 4096) != base


def test_key_precedence_session_then_user_then_prefix():
    doc = {"messages": [{"role": "user", "content": "hi"}], "user": "u-1"}
    assert affinity_key(doc, "sess-9", 4096)[0] == "session"  # type: ignore[index]
    assert affinity_key(doc, None, 4096)[0] == "user"  # type: ignore[index]
    anthropic = {"messages": [{"role": "user", "content": "hi"}], "metadata": {"user_id": "x"}}
    assert affinity_key(anthropic, None, 4096)[0] == "user"  # type: ignore[index]
    assert affinity_key({"messages": []}, None, 4096) is None
    assert affinity_key({"input": "embed me"}, None, 4096) is None
    assert affinity_key({"prompt": "Once upon"}, None, 4096)[0] == "prefix"  # type: ignore[index]


def test_prefix_is_bounded_and_skips_huge_parts_cheaply():
    huge = "x" * 5_000_000
    doc = {"messages": [{"role": "system", "content": huge}, {"role": "user", "content": huge}]}
    material = prefix_material(doc, 1000)
    assert material is not None and len(material) <= 2 * 1000 + 16
    # Beyond the bound, content does not matter: one conversation, one key.
    longer = {"messages": [{"role": "system", "content": huge + "y"}, doc["messages"][1]]}
    assert affinity_key(longer, None, 1000) == affinity_key(doc, None, 1000)


# --- rendezvous -------------------------------------------------------------------------------


def _hosts(n, base=0):
    return [SimpleNamespace(url=f"http://10.0.0.{base + i}:8000") for i in range(n)]


@pytest.mark.parametrize("n", [3, 5, 8, 13, 20])
def test_rendezvous_spreads_keys_within_ten_percent_of_even(n):
    ids = HostIds()
    points = [ids.get(h.url)[1] for h in _hosts(n)]
    keys = 2500 * n
    rng = random.Random(n)

    def home(key: int) -> int:
        return max(points, key=lambda p: weight(key, p))

    counts = Counter(home(rng.getrandbits(64)) for _ in range(keys))
    even = keys / n
    assert len(counts) == n
    assert all(abs(c - even) <= 0.1 * even for c in counts.values()), counts


@pytest.mark.parametrize("n", [3, 10, 20])
def test_rendezvous_join_or_leave_moves_only_that_share(n):
    ids, hosts = HostIds(), _hosts(n)
    rng = random.Random(7)
    keys = [rng.getrandbits(64) for _ in range(6000)]
    home = {k: ranked(k, hosts, ids)[0].url for k in keys}
    joined = hosts + _hosts(1, base=200)
    moved_join = [k for k in keys if ranked(k, joined, ids)[0].url != home[k]]
    assert all(ranked(k, joined, ids)[0].url == joined[-1].url for k in moved_join)
    assert len(moved_join) <= 1.25 * len(keys) / (n + 1)
    gone = hosts[1]
    left = [h for h in hosts if h is not gone]
    moved_leave = [k for k in keys if ranked(k, left, ids)[0].url != home[k]]
    assert all(home[k] == gone.url for k in moved_leave)
    assert len(moved_leave) <= 1.25 * len(keys) / n


def test_rendezvous_order_is_the_same_in_any_process_and_input_order():
    hosts = _hosts(6)
    key = 0x1234_5678_9ABC_DEF0
    first = [h.url for h in ranked(key, hosts, HostIds())]
    assert [h.url for h in ranked(key, list(reversed(hosts)), HostIds())] == first
    # Pinned values: replicas and versions must agree, whatever PYTHONHASHSEED says.
    assert host_id("http://a:1").hex() == "87ae7ce40c7b2855"
    assert [u[-6:] for u in first] == ["0:8000", "1:8000", "5:8000", "4:8000", "3:8000", "2:8000"]

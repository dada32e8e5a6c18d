"""Affinity units: cookie signing and issuing, affinity keys per dialect, rendezvous hashing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import struct
from collections import Counter
from types import SimpleNamespace

import pytest

from edge.routing.affinity import (
    ENTRY_BYTES,
    MAX_IDS,
    MAX_VALUE_CHARS,
    TAG_BYTES,
    CookieCodec,
    CookieIssuer,
    HostIds,
    affinity_key,
    conversation_tag,
    cookie_value,
    entry_at,
    held_by,
    host_id,
    prefix_material,
    ranked,
    set_cookie,
    split_entries,
    weight,
)

NOW = 1_700_000_000.0
SECRET = "s3cret-s3cret-s3cret"


def tag(n: int) -> bytes:
    return n.to_bytes(TAG_BYTES, "big")


def entry(url: str, n: int) -> bytes:
    return host_id(url) + tag(n)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def test_cookie_round_trip_keeps_entries_in_order():
    codec = CookieCodec(SECRET, max_age_s=600)
    entries = entry("http://a:1", 1) + entry("http://b:2", 2)
    value = codec.encode(entries, NOW)
    assert codec.decode(value, NOW + 599) == entries
    assert split_entries(entries) == [
        (host_id("http://a:1"), tag(1)),
        (host_id("http://b:2"), tag(2)),
    ]
    assert set(value) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_cookie_holds_at_most_max_ids_and_its_longest_value_is_read():
    codec = CookieCodec(SECRET, max_age_s=600)
    entries = b"".join(entry(f"http://h{i}", i) for i in range(MAX_IDS + 3))
    value = codec.encode(entries, NOW)
    assert codec.decode(value, NOW) == entries[: MAX_IDS * ENTRY_BYTES]
    assert len(value) == MAX_VALUE_CHARS  # the bound is the longest genuine value, not less


def test_encode_refuses_what_is_not_whole_entries():
    codec = CookieCodec(SECRET, max_age_s=600)
    for bad in (b"", host_id("http://a:1"), entry("http://a:1", 1) + b"x"):
        with pytest.raises(ValueError, match="host_id"):
            codec.encode(bad, NOW)


def test_expired_cookie_is_ignored():
    codec = CookieCodec(SECRET, max_age_s=600)
    value = codec.encode(entry("http://a:1", 1), NOW)
    assert codec.decode(value, NOW + 600) == b""


def test_other_secret_or_tampered_cookie_is_ignored():
    codec = CookieCodec(SECRET, max_age_s=600)
    value = codec.encode(entry("http://a:1", 1), NOW)
    assert CookieCodec("another-secret-entirely", 600).decode(value, NOW) == b""
    raw = bytearray(unb64(value))
    for index in (0, 3, 6, 5 + 9, len(raw) - 1):  # version, expiry, id, tag, mac
        forged = bytearray(raw)
        forged[index] ^= 0x01
        assert codec.decode(b64(bytes(forged)), NOW) == b"", index


def test_a_signed_value_longer_than_max_ids_entries_is_refused():
    codec = CookieCodec(SECRET, max_age_s=600)
    entries = b"".join(entry(f"http://h{i}", i) for i in range(MAX_IDS + 1))
    payload = struct.pack(">BI", 2, int(NOW) + 600) + entries
    value = b64(payload + codec._mac(payload))  # genuine, but one entry too many
    assert len(value) > MAX_VALUE_CHARS and codec.decode(value, NOW) == b""
    assert codec.decode(value[:MAX_VALUE_CHARS], NOW) == b""  # cut: neither


def test_old_version_cookies_decode_to_nothing():
    # Version 1, as it was signed: one 8-byte id per model, HMAC-SHA256 with the v1 key.
    key = hashlib.sha256(b"edge-affinity-cookie\0" + SECRET.encode()).digest()
    for ids in (host_id("http://a:1"), host_id("http://a:1") * 3):  # 3 ids: 24 = 2 entries
        payload = struct.pack(">BI", 1, int(NOW) + 600) + ids
        v1 = b64(payload + hmac.new(key, payload, hashlib.sha256).digest()[:16])
        assert CookieCodec(SECRET, 600).decode(v1, NOW) == b""
    # Nor is a version other than this one's accepted under this MAC.
    codec = CookieCodec(SECRET, 600)
    payload = struct.pack(">BI", 1, int(NOW) + 600) + entry("http://a:1", 1)
    assert codec.decode(b64(payload + codec._mac(payload)), NOW) == b""


@pytest.mark.parametrize(
    "value",
    ["", "x", "!!!!", "A" * 500, "AAAA", "a.b.c", base64.b64encode(b"\0" * 40).decode(),
     "A" * (MAX_VALUE_CHARS + 1)],
)  # fmt: skip
def test_garbage_cookie_decodes_to_nothing(value):
    assert CookieCodec(SECRET, 600).decode(value, NOW) == b""


def test_entries_are_found_by_tag_only_where_a_tag_sits():
    a, b = host_id("http://a:1"), host_id("http://b:1")
    inside = b[2:6]  # bytes of b's host id, 14 bytes in: a tag's length, not a tag's place
    assert held_by(a + tag(7) + b + tag(8), inside) is None
    entries = a + tag(7) + b + inside  # ... and as the second entry's tag, found past it
    assert entries.find(inside, 8) == ENTRY_BYTES + 2
    assert held_by(entries, inside) == b and entry_at(entries, inside) == ENTRY_BYTES
    assert held_by(entries, tag(7)) == a and entry_at(entries, tag(7)) == 0
    assert held_by(entries, tag(8)) is None and held_by(b"", tag(7)) is None


def test_cookie_header_parsing_and_set_cookie_attributes():
    header = 'a=1; edge_affinity=VALUE; other="x"'
    assert cookie_value(header, "edge_affinity") == "VALUE"
    assert cookie_value(header, "missing") is None
    assert cookie_value(None, "edge_affinity") is None
    assert cookie_value("xedge_affinity=1", "edge_affinity") is None
    assert cookie_value("a=b edge_affinity=c", "edge_affinity") is None  # inside a value
    assert cookie_value("a=edge_affinity=3;edge_affinity=4", "edge_affinity") == "4"
    assert cookie_value('edge_affinity="q" ; b=2', "edge_affinity") == "q"
    assert cookie_value("edge_affinity;b=2", "edge_affinity") is None
    plain = set_cookie("edge_affinity", "V", 60, secure=False)
    assert plain == "edge_affinity=V; Max-Age=60; Path=/; HttpOnly; SameSite=Lax"
    assert set_cookie("edge_affinity", "V", 60, secure=True).endswith("; Secure")


class Wall:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def value_of(issued: str) -> str:
    return issued.split(";", 1)[0].split("=", 1)[1]


def test_issued_cookie_puts_the_conversation_first_and_keeps_the_others():
    codec, wall = CookieCodec(SECRET, max_age_s=600), Wall()
    issuer = CookieIssuer(codec, "edge_affinity", HostIds(), wall)
    a, b, c = (entry(f"http://{n}:1", i) for i, n in enumerate("abc"))
    issued = issuer.issue("http://b:1", a + c, tag(9), secure=False)
    assert issued.startswith("edge_affinity=")
    assert codec.decode(value_of(issued), NOW + 599) == entry("http://b:1", 9) + a + c
    assert codec.decode(value_of(issued), NOW + 600) == b""  # max_age after its second
    assert issued.endswith("SameSite=Lax") and "Max-Age=600" in issued
    assert issued == set_cookie("edge_affinity", value_of(issued), 600, secure=False)
    # The same conversation moved (a failover): its older entry goes, the others stay in order.
    moved = issuer.issue("http://c:1", a + entry("http://b:1", 9) + c, tag(9), secure=True)
    assert moved.endswith("; Secure")
    assert codec.decode(value_of(moved), NOW) == entry("http://c:1", 9) + a + c


def test_issued_cookie_keeps_the_most_recent_max_ids_conversations():
    codec, wall = CookieCodec(SECRET, max_age_s=600), Wall()
    issuer = CookieIssuer(codec, "edge_affinity", HostIds(), wall)
    held = b""
    for n in range(MAX_IDS + 3):
        held = codec.decode(value_of(issuer.issue(f"http://h{n % 3}:1", held, tag(n), False)), NOW)
    tags = [t for _, t in split_entries(held)]
    assert tags == [tag(n) for n in range(MAX_IDS + 2, 2, -1)]  # newest first, oldest dropped


def test_issued_cookies_are_signed_once_per_second_and_value():
    wall = Wall()
    issuer = CookieIssuer(CookieCodec(SECRET, 600), "edge_affinity", HostIds(), wall)
    first = issuer.issue("http://a:1", b"", tag(1), secure=False)
    wall.now += 0.9
    assert issuer.issue("http://a:1", b"", tag(1), secure=False) is first  # cached: no MAC
    assert issuer.issue("http://a:1", b"", tag(1), secure=True) != first  # Secure: in the key
    assert issuer.issue("http://b:1", b"", tag(1), secure=False) != first
    assert issuer.issue("http://a:1", b"", tag(2), secure=False) != first  # another conversation
    wall.now += 0.1  # the next second: a later expiry, so signed again
    assert issuer.issue("http://a:1", b"", tag(1), secure=False) != first
    assert "cached=1" in repr(issuer)  # the old second's values were dropped


def test_the_signing_cache_is_bounded_within_a_second():
    wall = Wall()
    issuer = CookieIssuer(CookieCodec(SECRET, 600), "edge_affinity", HostIds(), wall, limit=4)
    values = [issuer.issue("http://a:1", b"", tag(n), secure=False) for n in range(10)]
    assert len(set(values)) == 10 and "cached=2" in repr(issuer)  # full at 4: started over
    again = issuer.issue("http://a:1", b"", tag(9), secure=False)
    assert again is values[9]  # a recent value is still served from it


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


def tag_of(doc, session=None, limit=4096):
    kind, key = affinity_key(doc, session, limit)  # type: ignore[misc]
    return conversation_tag(kind, key, doc, limit)


@pytest.mark.parametrize("turns", [openai_turns, anthropic_turns, gemini_turns])
def test_a_conversation_keeps_its_tag_as_history_grows_and_others_differ(turns):
    docs = list(turns())
    first, second = (tag_of(doc) for doc in docs)
    assert first == second and len(first) == TAG_BYTES
    other = eval(repr(docs[0]).replace("first", "other"))  # noqa: S307 - test data only
    assert tag_of(other) != first
    # A `user` places all of one user's conversations alike, but they stay apart in the cookie:
    # their tag is their prefix's, as if no `user` were sent.
    for doc in (docs[0], other):
        with_user = {**doc, "user": "u-1"}
        assert affinity_key(with_user, None, 4096)[0] == "user"  # type: ignore[index]
        assert tag_of(with_user) == tag_of(doc)


def test_the_session_header_is_the_conversation_whatever_the_prompt():
    one = {"messages": [{"role": "user", "content": "a"}], "user": "u"}
    two = {"messages": [{"role": "user", "content": "b"}]}
    assert tag_of(one, "sess-1") == tag_of(two, "sess-1") != tag_of(two, "sess-2")
    assert tag_of(one, "sess-1") != tag_of(one)


def test_a_request_of_no_conversation_has_no_tag():
    # Placed by `user`, but no user turn: no conversation to remember.
    assert conversation_tag("user", 1, {"input": "embed me", "user": "u"}, 4096) is None
    assert conversation_tag("user", 1, {"messages": []}, 4096) is None


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

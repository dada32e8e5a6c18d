"""edge/http/heads.py's `render`: the one renderer of header fields the edge makes up, which
refuses anything that would break a line (a smuggled field, a second message); and
`retry_after_s`, a 429's or 503's Retry-After read as a delay."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.http.heads import MAX_RETRY_AFTER_S, BadField, decode, render, retry_after_s

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def test_fields_render_as_lines_in_order_and_read_back():
    block = render([("Authorization", "Bearer k"), ("X-A", ""), ("X-A", "ü é")])
    assert block == "Authorization: Bearer k\r\nX-A: \r\nX-A: ü é\r\n".encode()
    assert decode(block).getall("X-A") == ["", "ü é"]
    assert render([]) == b""
    assert render(iter([("Retry-After", "3")])) == b"Retry-After: 3\r\n"  # any iterable


@pytest.mark.parametrize(
    "value",
    ["1\r\nX-Injected: yes", "1\nX-Injected: yes", "1\rX", "a\x00b", "\r\n\r\nGET / HTTP/1.1"],
)
def test_a_value_with_cr_lf_or_nul_is_refused(value):
    with pytest.raises(BadField, match="CR, LF or NUL"):
        render([("X-Ok", "fine"), ("X-A", value)])


@pytest.mark.parametrize("name", ["", "X A", "X-A:", "X:A", "X-A\r\nY", "Ünicode", "X\x00", "(x)"])
def test_a_name_that_is_not_a_token_is_refused(name):
    with pytest.raises(BadField, match="not a token"):
        render([(name, "v")])


def test_refused_is_a_value_error():
    # Callers that render what a config or a key store supplied may catch it as bad input.
    assert issubclass(BadField, ValueError)


@given(st.lists(st.tuples(st.text(min_size=1), st.text()), max_size=4))
def test_whatever_is_rendered_is_one_line_per_field_of_token_names(fields):
    try:
        block = render(fields)
    except BadField:
        names_ok = all(set(n) <= set(TCHAR) for n, _ in fields)
        values_ok = not any(c in v for _, v in fields for c in "\r\n\x00")
        assert not (names_ok and values_ok), "refused a field that breaks nothing"
        return
    lines = block.split(b"\r\n")
    assert lines[-1] == b"" and len(lines) == len(fields) + 1
    for line, (name, _) in zip(lines, fields, strict=False):
        assert b"\n" not in line and b"\r" not in line and b"\x00" not in line
        assert line.split(b": ", 1)[0] == name.encode()


# RFC 9110's own example date, Sun, 06 Nov 1994 08:49:37 GMT, as seconds since the epoch.
EXAMPLE = 784111777.0


@pytest.mark.parametrize(
    ("value", "delay"),
    [
        ("0", 0.0),
        ("120", 120.0),
        (" 7\t", 7.0),  # optional whitespace around the value
        ("0030", 30.0),
        (str(int(MAX_RETRY_AFTER_S)), MAX_RETRY_AFTER_S),
        ("Sun, 06 Nov 1994 08:49:37 GMT", 3.0),  # IMF-fixdate
        ("Sunday, 06-Nov-94 08:49:37 GMT", 3.0),  # obsolete RFC 850
        ("Sun Nov  6 08:49:37 1994", 3.0),  # obsolete asctime
        ("Sun, 06 Nov 1994 08:50:00 GMT", 26.0),
        ("Sun, 06 Nov 1994 08:49:60 GMT", 25.0),  # a leap second, read as :59
        ("Sun, 06 Nov 1994 08:49:30 GMT", 0.0),  # a date past: now
        ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0),
    ],
)
def test_retry_after_reads_delta_seconds_and_each_http_date_form(value, delay):
    assert retry_after_s(value, EXAMPLE - 3.0) == delay


@pytest.mark.parametrize(
    "value",
    [
        "", " ", "-1", "+5", "1.5", "1e3", "5 s", "0x10", "٣", "²",  # not delta-seconds
        "99999999999", "9" * 5000,  # absurd, and not worth converting
        str(int(MAX_RETRY_AFTER_S) + 1),
        "Sun, 06 Nov 1994 08:49:37 UTC", "Sun, 06 Nov 1994 08:49:37", "06 Nov 1994 08:49:37 GMT",
        "sun, 06 nov 1994 08:49:37 gmt", "Sun, 6 Nov 1994 08:49:37 GMT",
        "Sun, 06 Foo 1994 08:49:37 GMT", "Sun, 31 Feb 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 24:00:00 GMT", "Sun, 06 Nov 1994 08:61:00 GMT",
        "Sun, 06 Nov 1994 08:49:37 GMT, 5", "Sun, 06-Nov-94 08:49:37 GMT",
        "Sun Nov 6 08:49:37 1994", "Sun, 06 Nov 1994 08:49:61 GMT",
        "Sun, \u0660\u0666 Nov 1994 08:49:37 GMT",  # Arabic-Indic digits: not HTTP's
        "Sun, 07 Nov 1994 08:49:38 GMT",  # a day and a second away: over the bound
    ],
)  # fmt: skip
def test_retry_after_junk_negative_or_absurd_is_none(value):
    assert retry_after_s(value, EXAMPLE - 3.0) is None


def test_rfc850_two_digit_years_are_never_more_than_fifty_years_ahead():
    now = 4102444800.0  # Fri, 01 Jan 2100 00:00:00 GMT
    assert retry_after_s("Friday, 01-Jan-00 00:00:05 GMT", now) == 5.0  # 2100, not 2000
    assert retry_after_s("Friday, 01-Jan-99 00:00:05 GMT", now) == 0.0  # 2099: past
    assert retry_after_s("Sunday, 06-Nov-94 08:49:40 GMT", EXAMPLE) == 3.0  # 1994, not 2094


@given(st.text(max_size=40), st.floats(min_value=0, max_value=4e9))
def test_retry_after_is_none_or_a_bounded_delay_for_any_text(value, now):
    delay = retry_after_s(value, now)
    assert delay is None or 0.0 <= delay <= MAX_RETRY_AFTER_S

"""edge/http/heads.py's `render`: the one renderer of header fields the edge makes up, which
refuses anything that would break a line (a smuggled field, a second message)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.http.heads import BadField, decode, render

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

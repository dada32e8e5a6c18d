"""Which APIs a host speaks: configured by URL prefix (the longest wins), else learnt from a 404 and
forgotten after `memory_s`; OpenAI's is spoken by every host."""

from __future__ import annotations

from edge.routing.speaks import Speaks
from tests.routing.test_health import Clock


def test_configured_prefixes_decide_and_the_longest_wins():
    speaks = Speaks(
        {"http://10.0.1.": ("openai",), "http://10.0.1.7": ("openai", "anthropic")}, 600.0
    )
    assert not speaks.native("http://10.0.1.5:8000", "anthropic")
    assert speaks.native("http://10.0.1.7:8000", "anthropic")
    assert not speaks.native("http://10.0.1.7:8000", "gemini")
    assert speaks.native("http://10.0.1.5:8000", "openai")  # every host speaks OpenAI's
    assert not speaks.learnable("http://10.0.1.5:8000") and speaks.learnable("http://10.0.2.1")
    speaks.reconfigure({}, 600.0)
    assert speaks.native("http://10.0.1.5:8000", "anthropic")  # a reload forgets the old table


def test_a_refusal_is_learnt_per_dialect_and_forgotten_after_memory_s():
    clock = Clock()
    speaks = Speaks({}, 60.0, clock=clock)
    url = "http://10.0.2.1:8000"
    assert speaks.native(url, "gemini") and speaks.learnable(url)
    speaks.refused(url, "gemini")
    assert not speaks.native(url, "gemini") and speaks.native(url, "anthropic")
    assert speaks.native("http://10.0.2.2:8000", "gemini")  # per host
    clock.now += 59.0
    assert not speaks.native(url, "gemini")
    clock.now += 2.0
    assert speaks.native(url, "gemini")  # asked in its own API again
    assert speaks.learnt == 1 and "learnt=1" in repr(speaks)

"""Which APIs each host speaks: configured by server URL prefix, else learnt from the hosts.

Every host speaks OpenAI's API. Whether it also speaks Anthropic's or Gemini's decides how a
request in those dialects reaches it: as it came (bytes passed through, zero-copy), or translated
to OpenAI's chat completions (edge/proxy/translate.py). The `[dialects]` table names what servers
speak by URL prefix, the longest prefix winning; a host no prefix names is taken to speak
everything until it answers 404 or 405 on a dialect's path, and is then taken not to speak that
dialect for `memory_s` (it may be upgraded, or the answer may have been about the model).

Cost: an OpenAI request asks nothing here. Another dialect's costs a dictionary lookup or two per
attempt.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Final

from edge.dialects.paths import OPENAI

_MAX_LEARNT: Final = 10_000  # (host, dialect) pairs remembered; a bound, cleared whole when full


class Speaks:
    """The dialects of the hosts of one worker."""

    __slots__ = ("configured", "memory_s", "clock", "_prefixes", "_learnt", "learnt")

    def __init__(
        self,
        configured: Mapping[str, tuple[str, ...]],
        memory_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.configured = dict(configured)
        self.memory_s = memory_s
        self.clock = clock
        self._prefixes: dict[str, tuple[str, ...] | None] = {}  # url -> its configured dialects
        self._learnt: dict[tuple[str, str], float] = {}  # (url, dialect) -> not spoken until
        self.learnt = 0

    def reconfigure(self, configured: Mapping[str, tuple[str, ...]], memory_s: float) -> None:
        self.configured = dict(configured)
        self.memory_s = memory_s
        self._prefixes.clear()

    def native(self, url: str, dialect: str) -> bool:
        """Whether a request in `dialect` goes to the host at `url` as it came."""
        if dialect == OPENAI:
            return True
        spoken = self._configured(url)
        if spoken is not None:
            return dialect in spoken
        until = self._learnt.get((url, dialect))
        if until is None:
            return True
        if until > self.clock():
            return False
        del self._learnt[(url, dialect)]  # forgotten: try the host's own API again
        return True

    def learnable(self, url: str) -> bool:
        """No prefix says what this host speaks: its answers teach it."""
        return self._configured(url) is None

    def refused(self, url: str, dialect: str) -> None:
        """The host answered 404/405 on `dialect`'s path: it does not speak it, for a while."""
        if len(self._learnt) >= _MAX_LEARNT:
            self._learnt.clear()
        self._learnt[(url, dialect)] = self.clock() + self.memory_s
        self.learnt += 1

    def _configured(self, url: str) -> tuple[str, ...] | None:
        if url in self._prefixes:
            return self._prefixes[url]
        best: str | None = None
        for prefix in self.configured:
            if url.startswith(prefix) and (best is None or len(prefix) > len(best)):
                best = prefix
        spoken = self.configured[best] if best is not None else None
        if len(self._prefixes) >= _MAX_LEARNT:
            self._prefixes.clear()
        self._prefixes[url] = spoken
        return spoken

    def __repr__(self) -> str:
        return f"<Speaks prefixes={len(self.configured)} learnt={self.learnt}>"

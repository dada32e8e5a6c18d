"""The edge's routing as a client library: requests go straight from the user's process to a
host of their model, routed by the same code as `edge serve` (README: "Direct to the hosts").

    import httpx2, edge.direct
    from openai import OpenAI
    client = OpenAI(base_url="http://direct/v1", api_key=KEY, http_client=httpx2.Client(
        transport=edge.direct.transport(sources=["https://api.libertai.io/libertai/models"])))

The transports need the `direct` extra (`pip install 'edge[direct]'`): httpx2, the HTTP client
the current openai (3.x) and anthropic (2.x) SDKs are built on (google-genai takes an httpx2
client too). They are imported on first use, so the router (and `edge route`) work without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edge.direct.router import Router
from edge.direct.settings import DirectSettings, settings_from

if TYPE_CHECKING:
    from edge.direct.aio import AsyncDirectTransport, async_transport
    from edge.direct.transports import DirectTransport, transport

_TRANSPORTS = {
    "AsyncDirectTransport": "aio", "async_transport": "aio",
    "DirectTransport": "transports", "transport": "transports",
}  # fmt: skip

__all__ = [
    "AsyncDirectTransport",
    "DirectSettings",
    "DirectTransport",
    "Router",
    "async_transport",
    "settings_from",
    "transport",
]


def __getattr__(name: str) -> Any:
    if name in _TRANSPORTS:
        try:
            module = importlib.import_module(f"edge.direct.{_TRANSPORTS[name]}")
        except ImportError as exc:
            raise ImportError(
                f"edge.direct.{name} needs httpx2: pip install 'edge[direct]' ({exc})"
            ) from exc
        return getattr(module, name)
    raise AttributeError(f"module 'edge.direct' has no attribute {name!r}")

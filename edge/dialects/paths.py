"""Which dialect a path speaks, and a Liara workspace's prefix: read per request, so compiled
(setup.py's HOT list; the package's `__init__` re-exports them and stays interpreted)."""

from __future__ import annotations

import re
from typing import Final

OPENAI: Final = "openai"
ANTHROPIC: Final = "anthropic"
GEMINI: Final = "gemini"

_WORKSPACE_ID = re.compile(r"[0-9a-f]{24}")  # Liara's workspace ids


def split_workspace(path: str) -> tuple[str, str]:
    """(workspace id, the plain path) for `/api/{24 hex}/v1...` paths; ("", path) otherwise."""
    if path.startswith("/api/") and path.startswith("/v1", 29):
        workspace = path[5:29]
        if _WORKSPACE_ID.fullmatch(workspace):
            return workspace, path[29:]
    return "", path


def is_gemini(path: str) -> bool:
    """Gemini's paths: /v1beta/models/{model}:{method}, and /v1/models/{model}:{method} (the
    google-genai SDK's default API version since 2.0; OpenAI's /v1/models/{id} has no colon)."""
    if path.startswith("/v1beta/"):
        return True
    return path.startswith("/v1/models/") and ":" in path.rpartition("/")[2]


def dialect_of(path: str) -> str:
    """Which API's error shape a path speaks, decided from the path alone."""
    if path.startswith("/api/"):
        path = split_workspace(path)[1]
    if is_gemini(path):
        return GEMINI
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return ANTHROPIC
    return OPENAI

"""Classify a proxied request, read its body once (bounded) and parse it once.

The parsed document is only looked at (model, stream flag, later affinity keys); the original
bytes are what goes upstream, unchanged. The dialect decides the error shape the client gets.
"""

from __future__ import annotations

import re
from typing import Any, Final
from urllib.parse import quote

import orjson

from edge.dialects.paths import GEMINI, dialect_of, is_gemini, split_workspace
from edge.errors import BadRequest, MethodNotAllowed, NotFound, Unprocessable
from edge.http.server import Request

# Path -> route label for metrics; any other POST /v1/... with a model is "other".
_ROUTES: Final = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/rerank": "rerank",
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "count_tokens",
    "/v1/images/generations": "images",
}
_GEMINI_PREFIX: Final = "/v1beta/models/"
_GEMINI_V1_PREFIX: Final = "/v1/models/"
# method -> (route, streams)
_GEMINI_METHODS: Final = {
    "generateContent": ("gemini", False),
    "streamGenerateContent": ("gemini", True),
    "countTokens": ("count_tokens", False),
}
# Percent-encoded '.', '/', '\\', '%' and control characters: what a host could decode into a
# path other than the one routed here (one decoding pass or two).
_ENCODED: Final = re.compile(r"%(?:2[eEfF5]|5[cC]|[01][0-9a-fA-F]|7[fF])")
_UNSAFE_PATH: Final = (
    "The request path must not contain '.' or '..' segments, empty segments, backslashes, or "
    "percent-encoded '.', '/', '\\', '%' or control characters."
)


class ProxyRequest:
    """What the rest of the path needs to know about one proxied request."""

    __slots__ = ("dialect", "route", "model", "stream", "body", "target", "doc", "workspace")

    def __init__(
        self, dialect: str, route: str, model: str, stream: bool, body: bytes, target: str,
        doc: dict[str, Any],
    ) -> None:  # fmt: skip
        self.dialect = dialect
        self.route = route
        self.model = model
        self.stream = stream
        self.body = body
        self.target = target  # path and query string, as sent upstream
        self.doc = doc
        self.workspace = ""  # from an /api/{workspace}/v1/... path

    def __repr__(self) -> str:
        return f"<ProxyRequest {self.route} model={self.model!r} stream={self.stream}>"


def is_proxied(path: str) -> bool:
    if path.startswith("/api/"):
        path = split_workspace(path)[1]
    return path.startswith("/v1/") or path.startswith(_GEMINI_PREFIX)


async def parse(request: Request) -> ProxyRequest:
    workspace, path = split_workspace(request.path)
    preq = await _parse(request, path)
    if workspace:
        # Upstream gets the plain /v1/... path; a prefix sent percent-encoded is not ours.
        prefix = f"/api/{workspace}"
        if not preq.target.startswith(prefix + "/"):
            raise NotFound(f"No route for {request.path}.")
        preq.target = preq.target[len(prefix) :]
        preq.workspace = workspace
    return preq


def retarget(preq: ProxyRequest, model: str) -> ProxyRequest | None:
    """The same request for another model (a fallback: edge/proxy/fallback.py). OpenAI's and
    Anthropic's dialects name the model in the body, re-serialised with the new `model` (the
    rest of the document as it came, `models` list included: the engines ignore fields they do
    not know); Gemini's names it in the path, rewritten (the body as it came). None when the
    model cannot be named in a safe path."""
    if preq.dialect != GEMINI:
        doc = dict(preq.doc)
        doc["model"] = model
        found = ProxyRequest(
            preq.dialect, preq.route, model, preq.stream, orjson.dumps(doc), preq.target, doc
        )
    else:
        prefix = _GEMINI_PREFIX if preq.target.startswith(_GEMINI_PREFIX) else _GEMINI_V1_PREFIX
        path, sep, query = preq.target.partition("?")
        method = path.rpartition(":")[2]
        named = quote(model, safe="/:@")
        if not path.startswith(prefix) or not safe_path(prefix + model, named):
            return None
        target = f"{prefix}{named}:{method}{sep}{query}"
        found = ProxyRequest(
            preq.dialect, preq.route, model, preq.stream, preq.body, target, preq.doc
        )
    found.workspace = preq.workspace
    return found


def safe_path(path: str, target: str) -> bool:
    """Whether a host resolves this path where it was routed. `path` is decoded, `target` as
    sent (and as forwarded). A dot-segment (`/v1/../admin`), an empty one (`//`) or a backslash
    could take a normalising host elsewhere than the /v1/ path the edge checked: such paths are
    refused, not normalised, so that what the host gets is byte for byte what was checked."""
    if "/." in path and any(s.partition(";")[0] in (".", "..") for s in path.split("/")):
        return False  # ';' too: some hosts read "..;" as ".." with a parameter
    if "//" in path or "\\" in path:
        return False
    return "%" not in target or _ENCODED.search(target.partition("?")[0]) is None


async def _parse(request: Request, path: str) -> ProxyRequest:
    if request.method != "POST":
        raise MethodNotAllowed(request.method, "POST")
    route = _ROUTES.get(path)
    if route is None:
        # Not one of the exact API paths (whose decoded form is itself safe): checked before
        # it is forwarded as it came.
        if not safe_path(path, request.target):
            raise BadRequest(_UNSAFE_PATH)
        if is_gemini(path) and path.startswith((_GEMINI_PREFIX, _GEMINI_V1_PREFIX)):
            return await _parse_gemini(request, path)
        route = "other"
    body = await request.read()
    doc = _json_object(body)
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise Unprocessable("The request body must name a 'model' (a string).", param="model")
    stream = doc.get("stream") is True
    return ProxyRequest(dialect_of(path), route, model, stream, body, request.target, doc)


async def _parse_gemini(request: Request, path: str) -> ProxyRequest:
    prefix = _GEMINI_PREFIX if path.startswith(_GEMINI_PREFIX) else _GEMINI_V1_PREFIX
    model, _, method = path[len(prefix) :].rpartition(":")
    found = _GEMINI_METHODS.get(method)
    if not model or found is None:
        raise NotFound(
            f"Unknown Gemini method {method[:100]!r}; use :generateContent, "
            ":streamGenerateContent or :countTokens."
        )
    body = await request.read()
    doc = _json_object(body)
    route, stream = found
    return ProxyRequest(GEMINI, route, model, stream, body, request.target, doc)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("The request body is not valid JSON.") from None
    if not isinstance(doc, dict):
        raise Unprocessable("The request body must be a JSON object.", param="model")
    return doc

"""Every error body the edge writes, in the shape of the API the client spoke: the one renderer.

A JSON answer (`error_body`, `error_json`) for errors before a response started, and the final
SSE event (`error_event`) for a stream that ends early. OpenAI's shape also carries `detail`, the
key LibertAI clients read. Messages are client-safe by contract (edge.errors): never a key, a
prompt or upstream output.

A request that carries a W3C trace (its own `traceparent`, or one the edge started) gets its trace
id in the error object as `trace_id`, beside the fields each SDK reads (an extra field in the
error object is what OpenAI's, Anthropic's and Google's own APIs add too: the SDKs keep it in the
raw body and parse the rest as before), so that a user's report leads to the trace.
"""

from __future__ import annotations

from typing import Final

import orjson

from edge.dialects.paths import ANTHROPIC, GEMINI
from edge.errors import EdgeError

_GOOGLE_STATUS: Final = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    405: "UNIMPLEMENTED", 408: "DEADLINE_EXCEEDED", 413: "INVALID_ARGUMENT", 501: "UNIMPLEMENTED",
    422: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE",
}  # fmt: skip
_ANTHROPIC_TYPE: Final = {
    401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
}  # fmt: skip
STREAM_FAILED: Final = "The model server failed while streaming this response."


def error_body(err: EdgeError, dialect: str, trace_id: str | None = None) -> bytes:
    """An EdgeError as the JSON body of its status."""
    return error_json(err.status, err.message, err.kind, dialect, err.param, err.code, trace_id)


def error_json(
    status: int, message: str, kind: str, dialect: str, param: str | None = None,
    code: str | None = None, trace_id: str | None = None,
) -> bytes:  # fmt: skip
    """The error body for `status`; `kind` is OpenAI's error.type (the other shapes map from
    the status). `trace_id`: the request's W3C trace id (32 hex), when it has one."""
    error: dict[str, object]
    if dialect == ANTHROPIC:
        atype = _ANTHROPIC_TYPE.get(status, "invalid_request_error")
        if status >= 500 and status != 503:
            atype = "api_error"
        error = {"type": atype, "message": message}
        if trace_id is not None:
            error["trace_id"] = trace_id
        return orjson.dumps({"type": "error", "error": error})
    if dialect == GEMINI:
        gstatus = _GOOGLE_STATUS.get(status, "INTERNAL")
        error = {"code": status, "message": message, "status": gstatus}
        if trace_id is not None:
            error["trace_id"] = trace_id
        return orjson.dumps({"error": error})
    error = {"message": message, "type": kind, "param": param, "code": code}
    if trace_id is not None:
        error["trace_id"] = trace_id
    return orjson.dumps({"error": error, "detail": message})


def error_event(dialect: str, message: str = STREAM_FAILED, trace_id: str | None = None) -> bytes:
    """The final SSE event that tells a streaming client its answer ended early (with the
    request's trace id, as in error bodies, when it has one)."""
    error: dict[str, object]
    if dialect == ANTHROPIC:
        error = {"type": "api_error", "message": message}
        if trace_id is not None:
            error["trace_id"] = trace_id
        return b"event: error\ndata: " + orjson.dumps({"type": "error", "error": error}) + b"\n\n"
    if dialect == GEMINI:
        error = {"code": 502, "message": message, "status": "UNAVAILABLE"}
        if trace_id is not None:
            error["trace_id"] = trace_id
        return b"data: " + orjson.dumps({"error": error}) + b"\n\n"
    error = {"message": message, "type": "server_error", "param": None, "code": "upstream_error"}
    if trace_id is not None:
        error["trace_id"] = trace_id
    return b"data: " + orjson.dumps({"error": error}) + b"\n\n"

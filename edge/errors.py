"""The EdgeError family: every failure the edge answers itself.

Exceptions are translated once, at the boundary where they happen (route parsing, the upstream
call), into this small flat family. `edge/dialects/errors.py` renders them in the error shape of
the API the client spoke; nothing else decides what a client sees.
"""

from __future__ import annotations


class EdgeError(Exception):
    """A failure answered by the edge with `status` and a client-safe `message`.

    `message` is shown to clients: it must never contain a key, a prompt or upstream output.
    """

    status = 500
    kind = "server_error"  # OpenAI's error.type family; other shapes map from it

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers: dict[str, str] = {}


class BadRequest(EdgeError):
    status = 400
    kind = "invalid_request_error"


class Unauthorized(EdgeError):
    """Missing, unknown or revoked API key. The message never repeats the key."""

    status = 401
    kind = "authentication_error"


class Forbidden(EdgeError):
    """A valid key used outside its grant: another workspace, a model it may not use."""

    status = 403
    kind = "permission_error"


class TooManyRequests(EdgeError):
    """Over a key's rate limit; `headers` carry Retry-After and the x-ratelimit-* fields."""

    status = 429
    kind = "rate_limit_error"

    def __init__(self, message: str, headers: dict[str, str], *, code: str | None = None):
        super().__init__(message, code=code)
        self.headers.update(headers)


class NotFound(EdgeError):
    status = 404
    kind = "invalid_request_error"


class MethodNotAllowed(EdgeError):
    status = 405
    kind = "invalid_request_error"

    def __init__(self, method: str, allowed: str):
        super().__init__(f"Method {method} is not allowed here; use {allowed}.")
        self.headers["Allow"] = allowed


class RequestTimeout(EdgeError):
    """The client took longer than its bound to send a request head or body."""

    status = 408
    kind = "invalid_request_error"


class PayloadTooLarge(EdgeError):
    status = 413
    kind = "invalid_request_error"


class Unprocessable(EdgeError):
    status = 422
    kind = "invalid_request_error"


class Unsupported(EdgeError):
    """A call the model's servers cannot serve: of the client's API, only message generation is
    translated for servers that speak only OpenAI's."""

    status = 501
    kind = "invalid_request_error"


class Unavailable(EdgeError):
    """No server could take the request: none known, none healthy, or every attempt failed."""

    status = 503
    kind = "service_unavailable"
    attempts = 0  # attempts made on servers before giving up (for the access log and metrics)


class UpstreamFailure(Exception):
    """One attempt on one host failed before the first byte reached the client.

    Internal: the forwarder collects these and turns them into an `Unavailable` when no attempt
    is left. `reason` is short, client-safe text ("connect refused", "HTTP 503", "timeout").
    `counts` is False for failures that say nothing about the host's health (a pooled
    keep-alive connection the host had already closed).
    """

    def __init__(self, reason: str, *, counts: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.counts = counts

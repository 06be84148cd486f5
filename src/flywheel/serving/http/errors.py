"""The one error type of the servers: each answer other than success is an `HttpError` carrying
its status, a stable machine-readable `code` and the detail; routes raise, and one handler
(`Endpoint` for Starlette routes, `error_answer` for the raw ASGI hot path) answers, logs and
counts it. Anything else a route raises is a logged, counted 500 with no internals in the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from flywheel.core.errors import FlywheelError

log = logging.getLogger("flywheel.serving")


class HttpError(Exception):
    """An answer with `status` (and `code`, `detail`, extra `headers`) instead of a result."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, detail: Any, headers: dict[str, str] | None = None, *, status: int | None = None,
                 code: str | None = None):
        super().__init__(detail if isinstance(detail, str) else repr(detail))
        self.detail = detail
        self.headers = headers or {}
        if status is not None:
            self.status = status  # type: ignore[misc]
        if code is not None:
            self.code = code  # type: ignore[misc]


class BodyTooLarge(HttpError):
    status, code = 413, "body_too_large"

    def __init__(self, limit: int):
        super().__init__(f"body larger than {limit} bytes")


class UnsupportedMediaType(HttpError):
    status, code = 415, "unsupported_media_type"


class Unavailable(HttpError):
    """Nothing to serve yet, or a store the request needs is down: retry later."""

    status, code = 503, "unavailable"


class TooBusy(HttpError):
    status, code = 429, "too_busy"

    def __init__(self, detail: str, retry_after_s: int = 1):
        super().__init__(detail, {"retry-after": str(retry_after_s)})


class NotFound(HttpError):
    status, code = 404, "not_found"


def refused(status: int, detail: str) -> HttpError:
    """A caller without a valid token (401) or without the scope it needs (403)."""
    if status == 401:
        return HttpError(detail, {"www-authenticate": "Bearer"}, status=401, code="unauthenticated")
    return HttpError(detail, status=status, code="forbidden")


@dataclass(frozen=True)
class FieldError:
    loc: tuple[str | int, ...]
    msg: str
    type: str

    def as_dict(self) -> dict[str, Any]:
        return {"loc": list(self.loc), "msg": self.msg, "type": self.type}


MAX_ERRORS = 50  # per answer: a small wrong request must not get a large answer


class RequestInvalid(HttpError, FlywheelError):
    """A request that fails validation (422); `errors` name the fields that are wrong (the first
    MAX_ERRORS of them, then one entry that counts the rest). Also what `flywheel predict` raises
    for a file's bad rows (a `FlywheelError`)."""

    status, code = 422, "invalid_request"

    def __init__(self, errors: list[FieldError], more: int = 0):
        """`more`: errors found beyond `errors` and not built (a caller that stops collecting)."""
        if len(errors) > MAX_ERRORS or more:
            more += max(0, len(errors) - MAX_ERRORS)
            errors = [*errors[:MAX_ERRORS],
                      FieldError(("body",), f"{more:,} more errors not shown", "too_many_errors")]
        HttpError.__init__(self, [e.as_dict() for e in errors])
        self.args = ("; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in errors),)
        self.errors = errors

    def __str__(self) -> str:
        return str(self.args[0])


INTERNAL = "internal error; see the server log"


def error_answer(exc: BaseException, request_id: str, endpoint: str
                 ) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON payload, headers) of what a route raised: its own answer for an `HttpError`,
    a logged 500 for anything else. Refusals a client can do something about are logged too."""
    if isinstance(exc, HttpError):
        if exc.status >= 500 or exc.status == 413:
            log.warning("request refused", extra={"event": "request_error", "status": exc.status,
                                                   "request_id": request_id, "endpoint": endpoint})
        return exc.status, {"detail": exc.detail, "code": exc.code, "request_id": request_id}, exc.headers
    log.error("request failed", exc_info=exc, extra={"event": "request_error", "status": 500,
                                                     "request_id": request_id, "endpoint": endpoint})
    return 500, {"detail": INTERNAL, "code": HttpError.code, "request_id": request_id}, {}


ErrorBody = Callable[[int, dict[str, Any], BaseException], dict[str, Any]]
Handler = Callable[..., Awaitable[Any]]

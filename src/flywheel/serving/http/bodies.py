"""Request bodies: read whole and bounded (413 past the limit, declared or streamed), checked for
JSON's content type, parsed with orjson (an invalid body is a 422 that says where)."""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.requests import Request

from flywheel.core.trees import first_path
from flywheel.serving.http.errors import BodyTooLarge, FieldError, RequestInvalid


def is_json(content_type: str) -> bool:
    """application/json (any parameters), or a +json type such as application/merge-patch+json."""
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


async def receive_body(scope: Any, receive: Any, limit: int) -> bytes:
    """The whole body of a raw ASGI request, refused (BodyTooLarge) past `limit` bytes: declared
    (content-length) or streamed."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > limit:
                raise BodyTooLarge(limit)
            break
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_body(request: Request, limit: int) -> bytes:
    return await receive_body(request.scope, request.receive, limit)


def parse_json_body(raw: bytes) -> Any:
    """Parse a body with orjson; on failure, explain where (NaN and Infinity are named by field)."""
    import orjson

    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # Only a body with such a literal is parsed again (with the slower stdlib parser) to name
        # its field; any other invalid body is answered from orjson's message.
        suspect = b"NaN" in raw or b"Infinity" in raw or "infinity" in str(exc)  # 1e999 too
        nonfinite = _find_nonfinite(raw) if suspect else None
        if nonfinite is not None:
            raise RequestInvalid([FieldError(nonfinite, "must be a finite number (no NaN or infinity)",
                                             "finite_number")]) from None
        raise RequestInvalid([FieldError(("body",), f"invalid JSON: {exc}", "json_invalid")]) from None


def _find_nonfinite(raw: bytes) -> tuple[str | int, ...] | None:
    """The path of the first NaN/Infinity literal, which orjson (rightly) refuses as JSON."""
    try:
        body = json.loads(raw, parse_constant=lambda c: _NonFinite())
    except (ValueError, RecursionError):
        return None
    return first_path(body, _nonfinite, ("body",))


class _NonFinite:
    pass


def _nonfinite(value: Any) -> bool:
    return isinstance(value, _NonFinite) or (isinstance(value, float) and not math.isfinite(value))

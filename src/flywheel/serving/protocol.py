"""uvicorn's httptools protocol with the limits it lacks: header size and read deadlines.

httptools buffers a request's headers without a cap, and uvicorn waits for headers and body with
no deadline of its own (its keep-alive timer runs only between requests), so one client holding
many half-sent requests ties up a worker's connections indefinitely (slow loris). ASGI middleware
never sees headers being read, so the limits live here, in the protocol uvicorn is given as
`http=`. Each closed connection is logged and counted by reason.

The limits come from the environment (`flywheel serve` writes them from `serving.connections`),
since uvicorn builds this class in each worker process with its own arguments.
"""

from __future__ import annotations

import json
import logging
import os
from asyncio import TimerHandle
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

LIMITS_ENV = "FLYWHEEL_HTTP_LIMITS"
log = logging.getLogger("flywheel.serving")


def limits_from_env() -> dict[str, float]:
    """{max_header_bytes, header_timeout_s, body_timeout_s}; safe defaults when unset."""
    limits = {"max_header_bytes": 32_768.0, "header_timeout_s": 10.0, "body_timeout_s": 30.0}
    limits.update({k: float(v) for k, v in json.loads(os.environ.get(LIMITS_ENV) or "{}").items()
                   if k in limits})
    return limits


_counter: Any = None


def _closed(reason: str) -> None:
    """Count a closed connection; with `flywheel serve` the sample goes to the workers' shared
    metric files (nothing registers it in this process), so /metrics shows it."""
    global _counter  # noqa: PLW0603 - made on first use, after PROMETHEUS_MULTIPROC_DIR is set
    if _counter is None:
        from prometheus_client import Counter

        _counter = Counter("flywheel_http_connections_closed_total",
                           "Connections closed by a limit (header size, header or body deadline)",
                           ["reason"], registry=None)
    _counter.labels(reason=reason).inc()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """Closes a connection whose request headers are too large (431) or arrive too slowly, or
    whose body arrives too slowly (408)."""

    limits: dict[str, float] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if GuardedHttpToolsProtocol.limits is None:
            GuardedHttpToolsProtocol.limits = limits_from_env()
        limits = GuardedHttpToolsProtocol.limits
        self.max_header_bytes = int(limits["max_header_bytes"])
        self.header_timeout = limits["header_timeout_s"]
        self.body_timeout = limits["body_timeout_s"]
        self.reading_headers = True
        self.header_bytes = 0
        self.deadline: TimerHandle | None = None

    def _arm(self, seconds: float, reason: str) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline = self.loop.call_later(seconds, self._expire, reason)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expire(self, reason: str) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        responding = self.cycle is not None and self.cycle.response_started
        self._refuse(408, "Request Timeout", reason, write=not responding)

    def _refuse(self, status: int, phrase: str, reason: str, write: bool = True) -> None:
        log.warning("closed a connection from %s: %s", self.client[0] if self.client else "?", reason)
        _closed(reason.split(":", 1)[0])
        if write:
            body = f'{{"detail": "{reason}"}}'.encode()
            self.transport.write(
                f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        self.transport.close()

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout, "header_timeout: headers not received in time")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.reading_headers:
            self.header_bytes += len(data)
        super().data_received(data)
        # Still inside the headers after this chunk and already over the cap: stop buffering.
        if self.reading_headers and self.header_bytes > self.max_header_bytes \
                and not self.transport.is_closing():
            self._refuse(431, "Request Header Fields Too Large",
                         f"header_too_large: request headers over {self.max_header_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.reading_headers = True
        self._arm(self.header_timeout, "header_timeout: headers not received in time")

    def on_headers_complete(self) -> None:
        self.reading_headers = False
        self.header_bytes = 0
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.max_header_bytes:
            self._disarm()
            self._refuse(431, "Request Header Fields Too Large",
                         f"header_too_large: request headers over {self.max_header_bytes} bytes")
            return
        self._arm(self.body_timeout, "body_timeout: request body not received in time")
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self.transport.is_closing():  # refused above: the rest of the chunk is dropped
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            super().on_message_complete()

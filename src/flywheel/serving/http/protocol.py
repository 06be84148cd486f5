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


HEADER_TIMEOUT = "header_timeout: headers not received in time"
BODY_TIMEOUT = "body_timeout: request body not received in time"
NO_DEADLINE = float("inf")


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """Closes a connection whose request headers are too large (431) or arrive too slowly, or
    whose body arrives too slowly (408).

    A request costs two float stores, not timers: each connection keeps the loop time by which
    its current phase must end, and one sweep per worker (a few times per deadline) closes those
    past it. Timers per request cost the hot path about a sixth of its throughput.
    """

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
        self.deadline = NO_DEADLINE
        self.deadline_reason = HEADER_TIMEOUT
        _Sweeper.ensure(self.loop, self.connections, min(self.header_timeout, self.body_timeout))

    def expire_if_late(self, now: float) -> None:
        if now < self.deadline or self.transport.is_closing():
            return
        self.deadline = NO_DEADLINE
        responding = self.cycle is not None and self.cycle.response_started
        self._refuse(408, "Request Timeout", self.deadline_reason, write=not responding)

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
        self.deadline, self.deadline_reason = self.loop.time() + self.header_timeout, HEADER_TIMEOUT

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
        self.deadline, self.deadline_reason = self.loop.time() + self.header_timeout, HEADER_TIMEOUT

    def on_headers_complete(self) -> None:
        self.reading_headers = False
        if len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers) > self.max_header_bytes:
            self.deadline = NO_DEADLINE
            self._refuse(431, "Request Header Fields Too Large",
                         f"header_too_large: request headers over {self.max_header_bytes} bytes")
            return
        self.header_bytes = 0
        self.deadline, self.deadline_reason = self.loop.time() + self.body_timeout, BODY_TIMEOUT
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self.transport.is_closing():  # refused above: the rest of the chunk is dropped
            super().on_body(body)

    def on_message_complete(self) -> None:
        self.deadline = NO_DEADLINE  # computing the answer has no deadline here
        self.reading_headers, self.header_bytes = True, 0  # what comes next is the next request
        if not self.transport.is_closing():
            super().on_message_complete()


class _Sweeper:
    """One per event loop: every quarter of the shortest deadline, close the connections past
    theirs."""

    # keyed by the ids of the loop and of the server's connection set, both held (so neither id
    # can be reused while its entry exists)
    running: dict[tuple[int, int], _Sweeper] = {}

    def __init__(self, loop: Any, connections: set[Any], every: float):
        self.loop, self.connections, self.every = loop, connections, every

    @classmethod
    def ensure(cls, loop: Any, connections: set[Any], shortest: float) -> None:
        key = (id(loop), id(connections))
        if key not in cls.running:
            sweeper = cls.running[key] = cls(loop, connections, min(max(shortest / 4, 0.05), 1.0))
            loop.call_later(sweeper.every, sweeper.sweep)

    def sweep(self) -> None:
        if self.loop.is_closed():
            return
        now = self.loop.time()
        for conn in list(self.connections):
            if isinstance(conn, GuardedHttpToolsProtocol):
                conn.expire_if_late(now)
        self.loop.call_later(self.every, self.sweep)

"""The connection limits of the HTTP protocol, at the socket level, on a real uvicorn server.

A tiny ASGI app stands behind the protocol: the limits act before any app code runs, and the
wiring from `serving.connections` into `flywheel serve` is tested against the real server in
test_app.py.
"""

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from flywheel.serving.http.protocol import GuardedHttpToolsProtocol, limits_from_env
from flywheel.serving.process import free_port

LIMITS = {"max_header_bytes": 4096.0, "header_timeout_s": 1.0, "body_timeout_s": 1.0}
seen: dict[str, int] = {"disconnects": 0}


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            seen["disconnects"] += 1
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/slow":  # an answer slower than every deadline, after the body arrived
        await asyncio.sleep(LIMITS["body_timeout_s"] * 2)
    reply = b"%d" % len(body)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"%d" % len(reply))]})
    await send({"type": "http.response.body", "body": reply})


@pytest.fixture(scope="module")
def address() -> Iterator[tuple[str, int]]:
    GuardedHttpToolsProtocol.limits = dict(LIMITS)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=GuardedHttpToolsProtocol,
                            loop="asyncio", timeout_keep_alive=1, limit_concurrency=3,
                            log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield ("127.0.0.1", port)
    server.should_exit = True
    thread.join(10)
    GuardedHttpToolsProtocol.limits = None


def connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=10)
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    started, data = time.monotonic(), b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - started


def read_response(sock: socket.socket) -> bytes:
    """One whole response (its head and content-length bytes of body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def request(path: str = "/", body: bytes = b"", extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n%s\r\n" % (path.encode(), len(body), extra)
            + body)


def test_a_client_sending_headers_too_slowly_is_closed_at_the_header_deadline(address):
    with connect(address) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nhost: t\r\n")  # and never the blank line
        data, waited = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408 ") and b"header_timeout" in data
    assert 0.8 < waited < 3


def test_a_silent_connection_is_closed_at_the_header_deadline(address):
    with connect(address) as sock:
        data, waited = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408 ")
    assert 0.8 < waited < 3


def test_oversized_headers_get_431_before_the_client_has_sent_them_all(address):
    with connect(address) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: t\r\n")
        sent = 0
        with pytest.raises(OSError):  # the server closes while megabytes are still to come
            for _ in range(8 * 1024):
                sock.sendall(b"x-pad: " + b"a" * 1015 + b"\r\n")
                sent += 1024
        assert sent < 4 * 1024 * 1024  # what the kernel's socket buffers took before the reset
        data, _ = read_until_closed(sock)
    assert data == b"" or data.startswith(b"HTTP/1.1 431 ")


def test_headers_over_the_cap_in_one_packet_get_431(address):
    with connect(address) as sock:
        sock.sendall(request(extra=b"x-pad: " + b"a" * 5000 + b"\r\n"))
        data, _ = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 431 ") and b"header_too_large" in data


def test_headers_under_the_cap_are_served(address):
    with connect(address) as sock:
        sock.sendall(request(body=b"abc", extra=b"x-pad: " + b"a" * 3000 + b"\r\n"))
        reply = read_response(sock)
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"\r\n\r\n3")


def test_a_body_that_stops_arriving_is_closed_at_the_body_deadline_and_the_app_sees_a_disconnect(address):
    before = seen["disconnects"]
    with connect(address) as sock:
        sock.sendall(request(body=b"0123456789")[:-5])  # half the body
        data, waited = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408 ") and b"body_timeout" in data
    assert 0.8 < waited < 3
    deadline = time.monotonic() + 5
    while seen["disconnects"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen["disconnects"] == before + 1


def test_deadlines_never_cut_a_slow_answer_or_a_busy_keep_alive_connection(address):
    with connect(address) as sock:
        sock.sendall(request("/slow", body=b"abcd"))
        reply = read_response(sock)
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"4")
        started = time.monotonic()
        for i in range(40):  # many requests on one connection over more than every deadline
            sock.sendall(request(body=b"x" * i))
            reply = read_response(sock)
            assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"%d" % i)
            time.sleep(0.05)
        assert time.monotonic() - started > LIMITS["header_timeout_s"]


def test_an_idle_keep_alive_connection_is_closed(address):
    with connect(address) as sock:
        sock.sendall(request(body=b"a"))
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        data, waited = read_until_closed(sock)
    assert data == b"" and waited < 3


def test_beyond_the_connection_limit_requests_get_503(address):
    held = [connect(address) for _ in range(3)]
    try:
        with connect(address) as sock:
            sock.sendall(request(body=b"a"))
            assert read_response(sock).startswith(b"HTTP/1.1 503 ")
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # the held connections go; the server answers again
        with connect(address) as sock:
            sock.sendall(request(body=b"a"))
            if read_response(sock).startswith(b"HTTP/1.1 200 "):
                break
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_limits_come_from_the_environment_with_safe_defaults(monkeypatch):
    monkeypatch.delenv("FLYWHEEL_HTTP_LIMITS", raising=False)
    assert limits_from_env() == {"max_header_bytes": 32768.0, "header_timeout_s": 10.0,
                                 "body_timeout_s": 30.0}
    monkeypatch.setenv("FLYWHEEL_HTTP_LIMITS", '{"header_timeout_s": 2, "other": 1}')
    assert limits_from_env()["header_timeout_s"] == 2.0 and "other" not in limits_from_env()

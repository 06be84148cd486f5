"""The room finds the prediction server where `flywheel serve` says it listens."""

import json
import subprocess
import sys

from flywheel.room.app import SERVING_ADDRESS, Room, record_serving_address


def test_the_room_follows_the_port_serve_was_given_while_that_server_lives(make_project):
    project = make_project()
    room = Room(project)
    assert room.serving_url == "http://127.0.0.1:8000"  # serving.host and serving.port
    record_serving_address(project.home, "0.0.0.0", 8123)  # flywheel serve --host 0.0.0.0 --port 8123
    assert room.serving_url == "http://127.0.0.1:8123"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (project.home / SERVING_ADDRESS).write_text(json.dumps({"url": "http://127.0.0.1:9", "pid": int(gone)}))
    assert room.serving_url == "http://127.0.0.1:8000"  # that server is gone


def test_flywheel_room_has_serves_header_cap(make_project):
    """`flywheel room` ran on plain uvicorn, with no header cap or read deadline."""
    import socket

    from tests.room.test_room import RoomProcess

    project = make_project({"serving": {"connections": {"max_header_bytes": 4096}}})
    room = RoomProcess(project).wait()
    try:
        with socket.create_connection(("127.0.0.1", room.port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n")
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    finally:
        room.stop()

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

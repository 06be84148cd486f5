"""The docs' "Your own data in ten minutes" (docs/own-data.md; the README shows the same commands),
run line by line as a newcomer would type it: make the data, init, train, serve (in the
background), send traffic and labels, monitor 2023 by event time, switch retraining to learn from
the labels too, retrain, status. The server must hot-swap to the retrained champion."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from flywheel.serving.process import wait_ready
from tests.conftest import REPO

SECTION = "# Your own data in ten minutes"  # the page's title; a section of the README


def walkthrough_commands(page: Path = REPO / "docs" / "own-data.md") -> list[str]:
    text = page.read_text()
    block = text.split(SECTION, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [re.sub(r"\s+#[^'\"]*$", "", line).strip() for line in block.splitlines()]
    return [c for c in commands if c]


def test_the_readme_shows_the_same_walkthrough_as_the_docs():
    assert walkthrough_commands(REPO / "README.md") == walkthrough_commands()


def test_walkthrough_runs_as_written(tmp_path):
    commands = walkthrough_commands()
    assert commands[0].startswith("python examples/churn/make_data.py") and len(commands) >= 8
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "COLUMNS": "200", "FLYWHEEL_RETRAINING__ORCHESTRATOR": "local"}  # Prefect: tested elsewhere
    env.pop("FLYWHEEL_HOME", None)
    server: subprocess.Popen[str] | None = None
    said: dict[str, str] = {}
    try:
        for command in commands:
            command = command.replace("examples/", f"{REPO}/examples/")
            if command.endswith("&"):
                server = subprocess.Popen(command.rstrip("& "), shell=True, cwd=tmp_path, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True)
                wait_ready("http://127.0.0.1:8000", server, 90)
                continue
            done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True,
                                  text=True, timeout=600)
            assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            said[command.split()[1] if command.startswith("flywheel") else command] = \
                " ".join(done.stdout.split())
        assert "champion → v1" in said["train"]
        assert "(1,614 from feedback)" in said["retrain"] and "PROMOTED" in said["retrain"], said["retrain"]
        assert "1,614 predictions with event time in [2023-01-01, 2024-01-01)" in said["monitor"]
        deadline = time.monotonic() + 60
        while httpx.get("http://127.0.0.1:8000/v1/models").json()["models"][0]["version"] != 2:
            assert time.monotonic() < deadline, "the server did not hot-swap to v2"
            time.sleep(0.3)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.communicate(timeout=60)


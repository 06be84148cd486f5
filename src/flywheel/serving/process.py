"""`flywheel serve` as a child process: what `flywheel run` and the replay demo start and stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from flywheel.config import ProjectBase


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[Any], timeout: float = 120,
               tail: Any = lambda: "") -> None:
    """Until `url`/ready answers 200; an error (with `tail()`, the server's last output) if the
    process exits first or the timeout passes."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail()}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {timeout:.0f}s:\n{tail()}")


class ServerProcess:
    """A server on 127.0.0.1 in a child process, ready when /ready answers 200."""

    def __init__(self, project: ProjectBase, port: int | None = None, workers: int = 1,
                 env: dict[str, str] | None = None, log_path: Path | None = None):
        self.project = project
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or project.home / f"server-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[str] = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flywheel.cli", "serve", "--config", str(project.path),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)],
            env={**os.environ, "FLYWHEEL_HOME": str(project.home), **(env or {})},
            stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        """Until ready; a server that never gets there is stopped before the error goes up (no
        caller would hold it to stop it later)."""
        try:
            wait_ready(self.url, self.proc, timeout, self.tail)
        except BaseException:
            self.stop()
            raise

    def served_version(self) -> int | None:
        import httpx

        try:
            body: dict[str, Any] = httpx.get(f"{self.url}/v1/models", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return None
        models = body.get("models") or []
        return int(models[0]["version"]) if models else None

    def wait_for_version(self, version: int, timeout: float = 60) -> None:
        """Until the server answers with `version` (it hot-swaps when champion moves)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.served_version() == version:
                return
            time.sleep(0.2)
        raise RuntimeError(f"server still not serving v{version} after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text()[-chars:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the server and wait; SIGKILL it if it has not exited in `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Where a change came from: the code's commit, and who (user, host, process) made it."""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
from pathlib import Path

CRASH_ENV = "FLYWHEEL_CRASH_AT"  # fault injection for the crash tests: SIGKILL at this point


def git_sha(where: Path) -> str:
    """The commit the code was trained from, '+dirty' if the tree has changes, or 'unknown'."""
    try:
        found = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=where,
                               capture_output=True, text=True, timeout=10)
        sha = found.stdout.strip()
        if found.returncode != 0 or not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def actor() -> str:
    """`user@host:pid` of this process: recorded with every alias move."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def crash_point(name: str) -> None:
    """Die here, as a SIGKILL would, when the crash tests ask for it (FLYWHEEL_CRASH_AT=name)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)

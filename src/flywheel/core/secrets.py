"""Passwords never printed: URLs shown with the password replaced, and free text scrubbed of any
URL's password (exception messages, alert texts, logs). Secrets read from files: every
FLYWHEEL_* variable may be given as NAME_FILE, the path of a file that holds its value (a
Kubernetes or Docker secret mounted as a file, which no child process or /proc/PID/environ sees)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from flywheel.core.errors import FlywheelError

HIDDEN = "***"
# scheme://user:password@host — the password is whatever lies between the user's colon and the @
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@]*:)(?P<password>[^\s@/]+)(?=@)")


def has_password(text: str) -> bool:
    """Whether `text` holds a URL with a password in it."""
    return _USERINFO.search(text) is not None


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***."""
    return _USERINFO.sub(lambda m: m.group("head") + HIDDEN, text)


FILE_SUFFIX = "_FILE"


def env_secret(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The value of `name`, else the contents of the file `name`_FILE points at (one trailing
    newline dropped), else None."""
    env = os.environ if env is None else env
    if env.get(name):
        return env[name]
    path = env.get(name + FILE_SUFFIX)
    if not path:
        return None
    try:
        return Path(path).read_text().removesuffix("\n")
    except OSError as exc:
        raise FlywheelError(f"{name}{FILE_SUFFIX}={path}: cannot read the file ({exc.strerror})") from None


def with_file_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """`env` where every FLYWHEEL_*_FILE variable is replaced by the variable it names, read from
    its file (a variable set directly wins)."""
    out = {k: v for k, v in env.items() if not (k.startswith("FLYWHEEL_") and k.endswith(FILE_SUFFIX))}
    for key in env:
        if key.startswith("FLYWHEEL_") and key.endswith(FILE_SUFFIX):
            name = key.removesuffix(FILE_SUFFIX)
            value = env_secret(name, env)
            if value is not None:
                out[name] = value
    return out

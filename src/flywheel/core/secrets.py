"""Passwords never printed: URLs shown with the password replaced, and free text scrubbed of any
URL's password (exception messages, alert texts, logs)."""

from __future__ import annotations

import re

HIDDEN = "***"
# scheme://user:password@host — the password is whatever lies between the user's colon and the @
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@]*:)(?P<password>[^\s@/]+)(?=@)")


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***."""
    return _USERINFO.sub(lambda m: m.group("head") + HIDDEN, text)

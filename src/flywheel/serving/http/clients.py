"""Who is calling: the clients `serving.clients` declares, each with a bearer token and scopes.

With none declared the server is open as it always was (the quick start has no token), every
caller is the anonymous client "", and /admin takes FLYWHEEL_ADMIN_TOKEN. With clients declared,
/v1/predict and the platform routes need a token with `predict`, /v1/feedback one with `feedback`
(and a record id is accepted only from the client it was issued to: `records.RecordIds`), and
/admin one with `admin` (FLYWHEEL_ADMIN_TOKEN still works). Tokens are looked up by their SHA-256,
so no comparison leaks how much of a guess was right.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flywheel.config import ConfigError, ServingClient
from flywheel.core.secrets import env_secret
from flywheel.serving.http.errors import refused

ANONYMOUS = ""


@dataclass(frozen=True)
class Refusal:
    status: int
    detail: str

    @property
    def headers(self) -> dict[str, str]:
        return {"www-authenticate": "Bearer"} if self.status == 401 else {}


UNAUTHENTICATED = Refusal(401, "a client token is required: send it as Authorization: Bearer <token>")


class Clients:
    """The declared clients, by the digest of their token."""

    def __init__(self, declared: Iterable[ServingClient], env: Mapping[str, str] | None = None):
        self.by_digest: dict[bytes, tuple[str, frozenset[str]]] = {}
        for client in declared:
            token = env_secret(client.token_env, env)
            if not token:
                raise ConfigError(f"serving.clients: {client.name}'s token is not set: export "
                                  f"{client.token_env} (or {client.token_env}_FILE, a file holding it)")
            self.by_digest[_digest(token)] = (client.name, frozenset(client.scopes))
        self.enabled = bool(self.by_digest)

    def identify(self, authorization: str, scope: str) -> tuple[str, Refusal | None]:
        """The client an `Authorization` header names, and the refusal when it may not do
        `scope` (None: it may). Without declared clients everyone is the anonymous client."""
        if not self.enabled:
            return ANONYMOUS, None
        kind, _, token = authorization.strip().partition(" ")
        found = self.by_digest.get(_digest(token.strip())) if kind.lower() == "bearer" else None
        if found is None:
            return ANONYMOUS, UNAUTHENTICATED
        name, scopes = found
        if scope not in scopes:
            return name, Refusal(403, f"client '{name}' may not {scope} (its scopes: "
                                      f"{', '.join(sorted(scopes))})")
        return name, None

    def from_asgi(self, scope: Any, wanted: str) -> tuple[str, Refusal | None]:
        """`identify` for a raw ASGI request (the hot path reads no header when none are declared)."""
        if not self.enabled:
            return ANONYMOUS, None
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                return self.identify(value.decode("latin-1"), wanted)
        return ANONYMOUS, UNAUTHENTICATED


    def caller(self, authorization: str, scope: str) -> str:
        """The client an `Authorization` header names; raises its 401/403 when it may not do `scope`."""
        name, refusal = self.identify(authorization, scope)
        if refusal is not None:
            raise refused(refusal.status, refusal.detail)
        return name

    def caller_of(self, asgi_scope: Any, wanted: str) -> str:
        """`caller` for a raw ASGI request (the hot path reads no header when none are declared)."""
        name, refusal = self.from_asgi(asgi_scope, wanted)
        if refusal is not None:
            raise refused(refusal.status, refusal.detail)
        return name


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()

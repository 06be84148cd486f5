"""Record ids that only this deployment can mint, so that only a caller who got a prediction can
label it.

A record id is `<request id><tag>.<count>-<n>`: the n-th of the `count` records one request
was answered for. The tag is a keyed BLAKE2b MAC (64 bits, 16 hex digits; BLAKE2b's keyed mode is
a MAC by design, a third of HMAC-SHA256's cost on the hot path) of the request id, the count and
the name of the client that asked (empty when `serving.clients` declares none), under a key kept
in the state database (`server_keys`), shared by every worker and replica on that database and
stable across restarts. `/v1/feedback` checks the tag with no database read: an id is accepted
only from the client it was issued to, and only for n < count (one prediction buys one label, not
any number of suffixes). Ids it did not issue are refused unless
`serving.accept_unsigned_feedback` is set.

Ids issued before the count was part of the tag (`<request id><tag>-<n>`) stay valid for
anonymous feedback with n below `legacy_max` (the server's `max_records`): the most one request
could have held.
"""

from __future__ import annotations

import hashlib
import hmac

import sqlalchemy as sa

from flywheel.state.db import server_key

KEY_NAME = "record_ids"
TAG_CHARS = 16


class RecordIds:
    def __init__(self, key: bytes, legacy_max: int = 1000):
        self.key = key
        self.legacy_max = legacy_max

    @classmethod
    def from_state(cls, engine: sa.Engine, legacy_max: int = 1000) -> RecordIds:
        return cls(server_key(engine, KEY_NAME), legacy_max)

    def tag(self, message: str) -> str:
        return hashlib.blake2b(message.encode(), key=self.key, digest_size=8).hexdigest()

    def mint(self, request_id: str, count: int, client: str = "") -> list[str]:
        base = f"{request_id}{self.tag(f'{request_id}.{count}.{client}')}.{count}"
        return [f"{base}-{i}" for i in range(count)] if count > 1 else [base + "-0"]

    def issued(self, record_id: str, client: str = "") -> bool:
        """Whether this deployment minted `record_id` for `client` (constant-time in the tag)."""
        base, dash, number = record_id.rpartition("-")
        if not (dash and number.isdigit() and number.isascii()):
            return False
        head, dot, count = base.rpartition(".")
        if not dot:
            return self._legacy(base, int(number), client)
        request_id, tag = head[:-TAG_CHARS], head[-TAG_CHARS:]
        if not (request_id and count.isdigit() and count.isascii() and int(number) < int(count)):
            return False
        # compare_digest refuses str with non-ASCII characters (a TypeError, once a 500): bytes
        return hmac.compare_digest(tag.encode(), self.tag(f"{request_id}.{count}.{client}").encode())

    def _legacy(self, base: str, number: int, client: str) -> bool:
        request_id, tag = base[:-TAG_CHARS], base[-TAG_CHARS:]
        if client or not request_id or number >= self.legacy_max:
            return False
        return hmac.compare_digest(tag.encode(), self.tag(request_id).encode())

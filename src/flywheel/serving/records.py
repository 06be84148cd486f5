"""Record ids that only this deployment can mint, so that only a caller who got a prediction can
label it.

A record id is `<request id><tag>-<n>`: the tag is a keyed BLAKE2b MAC of the request id (64
bits, 16 hex digits; BLAKE2b's keyed mode is a MAC by design, a third of HMAC-SHA256's cost on
the hot path) under a key kept in the state database (`server_keys`), shared by every worker and
replica on that database and stable across restarts. `/v1/feedback` checks the tag with no database read;
ids it did not issue are refused unless `serving.accept_unsigned_feedback` is set.
"""

from __future__ import annotations

import hashlib
import hmac

import sqlalchemy as sa

from flywheel.state.db import server_key

KEY_NAME = "record_ids"
TAG_CHARS = 16


class RecordIds:
    def __init__(self, key: bytes):
        self.key = key

    @classmethod
    def from_state(cls, engine: sa.Engine) -> RecordIds:
        return cls(server_key(engine, KEY_NAME))

    def tag(self, request_id: str) -> str:
        return hashlib.blake2b(request_id.encode(), key=self.key, digest_size=8).hexdigest()

    def mint(self, request_id: str, count: int) -> list[str]:
        base = request_id + self.tag(request_id)
        return [f"{base}-{i}" for i in range(count)] if count > 1 else [base + "-0"]

    def issued(self, record_id: str) -> bool:
        """Whether this deployment minted `record_id` (constant-time in the tag)."""
        base, dash, number = record_id.rpartition("-")
        request_id, tag = base[:-TAG_CHARS], base[-TAG_CHARS:]
        if not (dash and number.isdigit() and request_id):
            return False
        return hmac.compare_digest(tag, self.tag(request_id))
